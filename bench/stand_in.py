#!/usr/bin/env python3
"""The GPU check's cases on a stand-in GPU, before a session has a real one.

    python bench/stand_in.py [--arch 90] [--only REGEX] [--timings]

Every correctness case of ``gpu_check.py check`` (op × shape × dtype, fc1's LayerNorm folded, the cuBLAS
engine), every block it times, on sm_90 its tiles part (every token-tile candidate warmed up at once, then
each launched once: none may compile again) and, with ``--timings``, the triton providers of each of its
timing groups (their kernels warmed up at once, then each provider's calls run once: the same rule),
forward and backward on the triton backend, launched in
compiled mode for a GPU of compute capability ``--arch`` that is not there (tests/fake_cuda.py): each kernel is
specialised and compiled as its launch on that GPU would be, with the ptxas the backend would use, and
none runs. What fails here (a launcher's compiled-mode branch, which Triton's interpreter never takes; a
kernel that does not compile at a real launch's specialisation; an import) would fail on the GPU too, and
costs no device time. Nothing is checked against a reference: nothing is computed (outputs are whatever
memory held). Every other MIXER_FAST_ variable is cleared: mixer_fast's defaults, as the check's processes
have them. GEMM configs come from the shipped table, else each site's first that fits the stand-in's shared
memory (MIXER_FAST_AUTOTUNE=none):
the tuner's other candidates compile in the tune stage, whose path tests/test_matmul.py runs the same way.

One JSON line per case ({"case", "compiles", "seconds", "error"}), then a summary line; exit status 1 if a
case failed. Needs a fresh process (it sets TRITON_INTERPRET=0 before triton loads); about 3.5 minutes on
two cores with a cold Triton cache, and about 12 more with ``--timings`` (their cuBLAS-engine GEMMs run on
this CPU, at batch 16).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SHAPES = ("mixer_b16", "resmlp_24", "gmlp_s16")  # the blocks gpu_check.py times
BLOCK_BATCH = 2
# The tiles part's and the timing groups' shapes (gpu_check.TILE_GROUPS, TIMING_GROUPS) at a batch that, like
# their 256, is a multiple of 16: Triton specialises integer arguments on that
TILES_BATCH = TIMING_BATCH = 16


_installed: Optional[int] = None
COMPILED: List[int] = []  # one entry per Triton compile in this process (run() counts them)


def _setup(arch: int) -> None:
    """The stand-in ``arch`` GPU for this process (once; a second call must name the same arch)."""
    global _installed
    if _installed is not None:
        if _installed != arch:
            raise RuntimeError(f"arch: this process has a stand-in sm_{_installed} already, got {arch}")
        return
    os.environ["TRITON_INTERPRET"] = "0"
    # the GPU check's processes run with mixer_fast's defaults; each case sets its own LN, GEMM and TOKEN
    for name in [n for n in os.environ if n.startswith("MIXER_FAST_")]:
        del os.environ[name]
    # block pointers still compile to wgmma on sm_90a (pyproject.toml's filter, for pytest, says why)
    warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
    os.environ["MIXER_FAST_AUTOTUNE"] = "none"  # the stand-in cannot time a config
    sys.path.insert(0, str(ROOT / "bench"))
    import tune_table

    tune_table.import_paths()  # tests/ first, as gpu_check's workers have it (its conftest, not bench/'s)
    import fake_cuda

    fake_cuda.install(arch)
    _installed = arch


def cases(timings: bool = False) -> Iterator[Tuple[str, Dict[str, str], Callable[[], object]]]:
    """(name, environment, build) per case, gpu_check.py's names, the timing groups' only with ``timings``;
    ``build()`` returns a function that runs the forward and the backward."""
    import torch

    import gpu_check

    for case in gpu_check.check_cases(False):
        def build(case=case):
            dims = gpu_check.SHAPES[case.shape]
            args, call = gpu_check._op_inputs(case.op, dims, case.batch, drop_path=dims.drop_path)
            leaves = gpu_check._leaves(args, gpu_check._torch_dtype(case.dtype), "cpu")
            return lambda: call(leaves, "triton").backward(torch.randn_like(leaves["x"]))

        yield case.name, {"MIXER_FAST_LN": case.ln, **gpu_check.ENGINE_ENV[case.gemm]}, build
    for shape in BLOCK_SHAPES:
        def build_block(shape=shape):
            dims = gpu_check.SHAPES[shape]
            reference = gpu_check._reference_block(dims)
            block = gpu_check._fused_block(dims, reference.state_dict()).to(torch.bfloat16)
            x = torch.randn(BLOCK_BATCH, dims.seq_len, dims.dim, dtype=torch.bfloat16, requires_grad=True)
            return lambda: block(x).backward(torch.randn_like(x))

        yield f"block {shape} bf16", dict(gpu_check.ENGINE_ENV["fused"], MIXER_FAST_LN="load"), build_block
    for group in gpu_check.TIMING_GROUPS if timings else ():
        if group.what != "peak":
            yield (group.name, {}, lambda group=group: lambda: timing(group.what, group.shape, group.dtype))
    from mixer_fast.kernels.triton.token_mixing import WGMMA_CAPABILITY

    # the tiles part is for an H100 / H200 (tile_candidates): its candidates are Hopper's
    for group in gpu_check.TILE_GROUPS if _installed == WGMMA_CAPABILITY else ():
        yield (f"tiles {group.shape} {group.dtype}", dict(gpu_check.ENGINE_ENV["fused"], MIXER_FAST_LN="load"),
               lambda group=group: lambda: tiles(group.shape, group.dtype))


def tiles(shape: str, dtype: str) -> None:
    """The tiles part as its worker runs it, without the timing: every candidate warmed up at once
    (gpu_check.warm_tiles), then each launched once under its override_plan, which must compile nothing
    more (else the warm-up missed its key, and the GPU would compile it while timing)."""
    import gpu_check

    modes, candidates = gpu_check.tile_modes(shape, dtype, TILES_BATCH, "cpu"), gpu_check.tile_candidates()
    warmed = gpu_check.warm_tiles(modes, candidates)
    if "warm_up_error" in warmed:
        raise RuntimeError(f"the warm-up failed: {warmed['warm_up_error']}")
    late = [f"{kernel} {launch.label()}: {n}"
            for kernel, launch, n in compiles_per_candidate(modes, candidates, COMPILED) if n]
    if late:
        raise RuntimeError(f"compiled after the warm-up (kernel, candidate: compiles): {'; '.join(late)}")


def timing(what: str, shape: str, dtype: str) -> None:
    """A timing group's triton providers as its worker runs them, without the timing: their kernels warmed
    up at once (gpu_check.warm_providers), then each provider's calls run once, which must compile nothing
    more (else a warm-up missed its launch's key, and the GPU would compile it while timing). Each
    provider pins its own engine and LayerNorm placement (gpu_check._env_modes)."""
    import gpu_check

    providers = gpu_check.timing_providers(what, shape, dtype, TIMING_BATCH, "cpu")
    calls = {f"{p} {m}": providers[p][m] for p in gpu_check.fused_providers(providers)
             for m in gpu_check.MODES["timing"]}
    warmed = gpu_check.warm_providers(list(calls.values()))
    if "warm_up_error" in warmed:
        raise RuntimeError(f"the warm-up failed: {warmed['warm_up_error']}")
    late = []
    for name, fn in calls.items():
        before = len(COMPILED)
        fn()
        if len(COMPILED) > before:
            late.append(f"{name}: {len(COMPILED) - before}")
    if late:
        raise RuntimeError(f"compiled after the warm-up (provider mode: compiles): {'; '.join(late)}")


def compiles_per_candidate(modes, candidates, compiled: list) -> List[Tuple[str, object, int]]:
    """Each tile candidate launched once under its override_plan, in the mode the tiles part times it in:
    (kernel, launch, how many entries ``compiled``, a list Triton's compiles append to, gained meanwhile)."""
    import gpu_check
    from mixer_fast.kernels.triton import token_mixing

    counts = []
    for kernel, launches in candidates.items():
        for launch in launches:
            before = len(compiled)
            with token_mixing.override_plan(kernel, launch):
                modes[gpu_check.TILE_MODES[kernel]]()
            counts.append((kernel, launch, len(compiled) - before))
    return counts


def run(only: Optional[str] = None, timings: bool = False) -> List[Dict[str, object]]:
    """Runs the cases ``only`` selects (a regular expression searched in their names; all without it), the
    timing groups' too with ``timings``, and prints and returns a record per case."""
    import triton.compiler

    compiled = COMPILED
    compile_ = triton.compiler.compile

    def counted(*args, **kwargs):
        compiled.append(1)
        return compile_(*args, **kwargs)

    triton.compiler.compile = counted  # Triton's JIT looks it up when it first compiles a kernel
    pattern = re.compile(only) if only else None
    records = []
    for name, env, build in cases(timings):
        if pattern is not None and not pattern.search(name):
            continue
        os.environ.update(env)
        before, start, error = len(compiled), time.perf_counter(), None
        try:
            build()()
        except Exception as e:  # noqa: BLE001 - the finding, recorded; the other cases still run
            error = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
        record = {"case": name, "compiles": len(compiled) - before,
                  "seconds": round(time.perf_counter() - start, 1), "error": error}
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90)")
    parser.add_argument("--only", default=None, help="a regular expression: the cases whose names match")
    parser.add_argument("--timings", action="store_true",
                        help="also the timing groups' triton providers (about 12 minutes more on two cores)")
    opts = parser.parse_args(argv)
    _setup(opts.arch)
    start = time.perf_counter()
    records = run(opts.only, opts.timings)
    failed = [r["case"] for r in records if r["error"]]
    print(json.dumps({"arch": opts.arch, "cases": len(records), "failed": failed,
                      "compiles": sum(r["compiles"] for r in records),
                      "seconds": round(time.perf_counter() - start, 1)}))
    if not records:
        print(f"--only {opts.only!r} selects no case", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
