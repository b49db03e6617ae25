#!/usr/bin/env python3
"""The fused GEMM's per-GPU table of tuned configs (mixer_fast/tuned_gemm.json; kernels/triton/matmul.py: Tuner).

    python bench/tune_table.py run --out DIR [--batches 256,128,64] [--dtypes bf16]        (on a GPU)
    python bench/tune_table.py write DIR [DIR ...]                                      (anywhere)

``run`` times every config of every fused-GEMM launch the ops make at the named models' shapes (forward and
backward, MIXER_FAST_AUTOTUNE=1 so that nothing comes from the table; each op and shape's candidates all
compiled first, at once) and writes DIR/tuned.json (and DIR/timings.json: every config's median
milliseconds per key, e.g. TMA against pointer loads):
{"sm_90": {tune_key: [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages(, "tma")]}}. ``write`` merges such files into
the shipped table (later files win on a key), so that a first call on that GPU does not tune; commit it with
the run's folder under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "mixer_fast" / "tuned_gemm.json"
# (op, shape in gpu_check.SHAPES): every fused-GEMM launch site at the named models' sizes.
CASES = (("channel_mixing", "mixer_b16"), ("channel_mixing", "mixer_l16"), ("channel_mixing", "resmlp_24"),
         ("token_mixing", "resmlp_24"), ("spatial_gating", "gmlp_s16"))
# The ops whose fc1 GEMM takes its LayerNorm on load or folded (matmul.ln_placement): tuned both ways, so
# that timings.json compares the two at the same shapes (their keys differ in A_PRO).
LN_PLACEMENTS = {"channel_mixing": ("load", "fold"), "spatial_gating": ("load", "fold")}


def import_paths() -> None:
    """gpu_check and the tests' input makers importable: tests/ first, as gpu_check's workers have it, since
    test_gmlp (the gMLP case's inputs) imports tests/'s conftest, which bench/'s would shadow (the gMLP case
    failed so, found on a stand-in GPU on 2026-11-29: bench/NOTES.md)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]


def run(out: Path, batches: List[int], dtypes: List[str], cases: Sequence[Tuple[str, str]] = CASES) -> int:
    os.environ["MIXER_FAST_AUTOTUNE"] = "1"
    import_paths()
    import torch

    import gpu_check
    from mixer_fast.kernels.triton import matmul

    if not torch.cuda.is_available():
        print("run: needs a CUDA device", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        # Only the first dtype of each key family is compiled ahead: the others' sites are tuned by the time
        # they run, and compile only the config chosen for them.
        ahead = {key_family(dtype): dtype for dtype in reversed(dtypes)}.values()
        for op, shape in cases:
            steps = {(dtype, batch): [training_step(op, shape, dtype, batch, placement)
                                      for placement in LN_PLACEMENTS.get(op, ("load",))]
                     for dtype in dtypes for batch in batches}
            # Every candidate of every site of this op and shape compiles first, all at once: a site's own
            # warm-up (Tuner.config) compiles only its 4-8 candidates at a time, and 29 sites one after
            # another left most of the machine's cores idle (bench/NOTES.md).
            warmed = gpu_check.recorded_warm_up([step for (dtype, _), group in steps.items() if dtype in ahead
                                                 for step in group])
            print(f"compiled {op} {shape} ahead: {json.dumps(warmed)}", flush=True)
            for (dtype, batch), group in steps.items():
                for step in group:
                    step()
                # written after every case: a run cut short by its time budget keeps what it tuned
                (out / "tuned.json").write_text(json.dumps(matmul.TUNER.timed, indent=1, sort_keys=True) + "\n")
                (out / "timings.json").write_text(json.dumps(matmul.TUNER.times, indent=1, sort_keys=True) + "\n")
                print(f"tuned {op} {shape} {dtype} batch {batch}", flush=True)
    except KeyboardInterrupt:
        print("interrupted (time budget): tuned.json has the cases finished so far", flush=True)
        return 1
    print(f"{sum(map(len, matmul.TUNER.timed.values()))} keys -> {out / 'tuned.json'}")
    return 0


def key_family(dtype: str) -> str:
    """The tune keys ``dtype``'s sites share (matmul.tune_key): bf16 and fp16 the same ones (their tiles hold
    the same bytes), fp32 its own (",fp32")."""
    return "fp32" if dtype == "fp32" else "16-bit"


def training_step(op: str, shape: str, dtype: str, batch: int, placement: str) -> Callable[[], None]:
    """One forward and backward of ``op`` on the triton backend at ``shape`` (gpu_check.SHAPES), as the timing
    groups' triton providers run it: on the fused engine (the GEMMs tuned are the fused kernel's), with fc1's
    LayerNorm placed as ``placement`` (MIXER_FAST_LN). Every fused-GEMM site it meets is tuned (or, while
    launches are recorded, has its candidates' compiles recorded)."""
    import torch

    import gpu_check

    args, call = gpu_check._op_inputs(op, gpu_check.SHAPES[shape], batch, drop_path=False)
    leaves = gpu_check._leaves(args, gpu_check._torch_dtype(dtype), "cuda")
    modes = gpu_check._modes(lambda: call(leaves, "triton"), leaves.values(), torch.randn_like(leaves["x"]))
    training = gpu_check._pinned(modes["training"], "fused", placement)

    def step() -> None:
        training()
        torch.cuda.synchronize()

    return step


def merge(table: Dict, runs: List[Dict]) -> Dict:
    """``table`` with every run's entries added (later runs win on a key)."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    for r in runs:
        for device_class, entries in r.items():
            merged.setdefault(device_class, {}).update({k: list(v) for k, v in entries.items()})
    return merged


def write(dirs: List[Path]) -> int:
    runs = [json.loads((d / "tuned.json").read_text()) for d in dirs]
    table = merge(json.loads(TABLE.read_text()), runs)
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{TABLE}: " + ", ".join(f"{k} {len(v)} keys" for k, v in table.items() if isinstance(v, dict)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="tune on this GPU, write DIR/tuned.json")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--batches", default="256,128,64")
    r.add_argument("--dtypes", default="bf16",
                   help="bf16 tunes fp16's keys too (key_family); fp32's sites are keyed apart")
    w = sub.add_parser("write", help="merge DIR/tuned.json files into mixer_fast/tuned_gemm.json")
    w.add_argument("dirs", nargs="+", type=Path)
    opts = parser.parse_args(argv)
    if opts.command == "run":
        return run(opts.out, [int(b) for b in opts.batches.split(",")], opts.dtypes.split(","))
    return write(opts.dirs)


if __name__ == "__main__":
    sys.exit(main())
