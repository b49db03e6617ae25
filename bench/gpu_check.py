#!/usr/bin/env python3
"""One prepared command for a lent GPU: the triton backend's correctness, a CUDA graph and timings, as JSON lines.

    python bench/gpu_check.py check --out DIR [--quick] [--jobs 6] [--budget 225] [--check-budget 150]
                                    [--parts checks,graph,timings,tiles,jax] [--only REGEX] [--max-sanitize 4]
    python bench/gpu_check.py tests --out DIR [--jobs 12] [--budget 260]

GPU time is scarce (DESIGN.md, "Checking on a GPU"), so ``check`` fits one device call of at most 4 minutes:

1. Correctness: every op × dtype × shape (OPS, SHAPES) with ``backend="triton"`` against the reference under the
   numerics rule of tests/tolerances.py, forward (the output) and backward (the gradients of x and of every
   parameter), at a small batch. ``ref64`` and ``eager`` run on the same device as the fused op. Each
   (op, shape, dtype) runs in its own process with CUDA_LAUNCH_BLOCKING=1, ``--jobs`` at once: a CUDA fault
   poisons its process and nothing else. A process that faults is re-run once under compute-sanitizer.
2. A CUDA-graph capture and replay of a mixer_fast MixerBlock (Mixer-B/16, bf16, batch 8), bitwise against eager.
3. Timings at batch 256 with ``triton.testing.do_bench`` (median ms): per op and per block, forward (no_grad) and
   training (forward + backward), providers reference, compile (blocks, bf16), triton (the fused kernels),
   triton_cublas (the cuBLAS engine), triton_ln_folded (channel mixing and gMLP) and, for channel mixing,
   the bare cuBLAS GEMMs; the FLOP floor from a measured 8192³ bf16 matmul peak; the training step's peak
   memory. Groups (TIMING_GROUPS) run one at a time, each in its own process, in priority order while their
   estimated cost fits in what is left of ``--budget``; the others are named as skipped. In each, the triton
   providers' kernels compile at once before any of them is timed (warm_providers).

Files in DIR (at most 8 come back from a lent machine): check.jsonl (the records below), check.log (each
process: how long it ran, its exit status, the end of its stderr when it failed), sanitizer.txt (only when
something faulted). Record schema, one JSON object a line (non-finite floats written as "inf" / "nan"):

    {"kind": "env", "date", "commit", "gpu", "device_class": "sm_90" | "cpu", "driver", "versions", "ptxas"}
    {"kind": "check", "op", "mode": "forward" | "backward", "dtype", "shape", "batch",
     "ln": "load" | "fold" (fc1's LayerNorm, MIXER_FAST_LN), "gemm": "fused" | "cublas" (the engine:
     MIXER_FAST_GEMM and MIXER_FAST_TOKEN), "ok",
     "errors": {name: [max_err, bound]}, "error": str | null, "sanitizer": str | null,
     "without_tma": str | null (a failed case of an op that runs the fused GEMM, rerun with
     MIXER_FAST_TMA=0: "ok", or its error)}
    {"kind": "graph", "ok", "max_diff", "error"}
    {"kind": "timing", "op", "block", "shape", "batch", "mode": "forward" | "training", "dtype", "device_class",
     "ms": {provider: ms}, "errors": {provider: str} (only when one failed), "floor_ms", "peak_mib" (training),
     "compile_threads", "compile_s" (the process's warm_providers: the triton providers' kernels compiled at
     once before any provider is timed; 0 threads where nothing was compiled ahead), "warm_up_error" (only
     where a run of that warm-up failed)}
    {"kind": "tiles", "kernel", "plan", "shape", "batch", "mode", "dtype", "ms": float | null, "error": str | null,
     "compile_threads", "compile_s", "warm_up_error" (as the timing records', from the process's warm_tiles:
     each candidate's recorded run, then every kernel those runs launch compiled)}
    {"kind": "summary", "checks", "failed", "faulted", "timings", "skipped", "seconds"}

The exit status is non-zero when a check failed, faulted or was not run, or the graph check failed. Without
CUDA, ``check --quick`` runs the same harness in Triton's interpreter on tiny shapes (tests/test_gpu_check.py);
graph and timings are then skipped, and named so in the summary.

4. Tiles (only when ``--parts`` names it): the token kernels' candidate launches (tile_candidates; the first of
   each is the one token_mixing.gpu_config plans), each timed in token mixing at batch 256, bf16, Mixer-B/16
   and Mixer-L/16: the forward for token_mlp_fwd's, a training step for token_mlp_dx's and _dw's (the
   other kernels at their planned launches), on the flash kernels whatever TOKEN_ENGINE ships. Every
   candidate compiles first, at once (warm_tiles); a candidate that does not fit the GPU's shared memory is
   recorded with its error, never timed on the cuBLAS engine in its place. The fastest spill-free one
   belongs in gpu_config.

5. JAX (only when ``--parts`` names it; bench/gpu_check_jax.py, whose docstring has its records): the JAX
   triton backend through jax-triton, its ops and the Flax MixerBlock against XLA under the same rule, each
   case in its own process after the torch checks, and its timings against XLA (with and without the
   integer hints the fused GEMM is given) as timing groups after the torch ones.

Within 4 minutes the correctness part (about 2 minutes with a cold Triton cache) leaves time for the first
timing groups only; ``check --parts timings --budget 540`` in a second device call times all of them, and
``check --parts tiles --budget 300`` the tiles.

``tests`` runs the triton test files and the gpu-marked tests with pytest-xdist, verbose, and interrupts
pytest with SIGINT when ``--budget`` runs out so that it still prints its summary; log in DIR/tests.log.

The project must be importable: ``pip install --no-deps --no-build-isolation -e .`` (bench/gpu_suite.sh; it
also builds the C++ extension), or ``ln -s ../kernels mixer_fast/kernels`` and ``PYTHONPATH=$PWD``. The
numerics code is imported from tests/ (op_cases.py, test_gmlp.py, tolerances.py), not copied.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RECORD_PREFIX = "@gpu_check-record "  # marks a worker's records among whatever else it prints
FAULT_EXIT = 3  # a worker's exit status after it caught a CUDA fault (its context is poisoned)
DEVICE_FAULT = re.compile(r"CUDA error|Triton Error \[CUDA\]|illegal memory access|unspecified launch failure|"
                          r"misaligned address|device-side assert|illegal instruction")
MODES = {"check": ("forward", "backward"), "timing": ("forward", "training")}
CHECK_KINDS = ("check", "jax_check")  # the JAX records: bench/gpu_check_jax.py
TIMING_KINDS = ("timing", "jax_timing")
JAX_TIMING_WHAT = ("jax", "jax_no_hints")
# Correctness processes: kernel faults reported at the launch that made them, and outputs filled with NaN
# before each launch (the test suite's MIXER_FAST_POISON), so that an element a kernel never writes shows;
# no GEMM tuning (MIXER_FAST_AUTOTUNE=none: the shipped table's config, else the site's first TMA config,
# else its first), so that a process compiles one config a site instead of timing all of them (some 40
# compiles for channel mixing with a cold table), and the TMA loads are what it checks first (a failure is
# rerun without them: without_tma).
CHECK_ENV = {"CUDA_LAUNCH_BLOCKING": "1", "MIXER_FAST_POISON": "1", "MIXER_FAST_AUTOTUNE": "none"}
CASE_TIMEOUT = 150  # s, one correctness process (cold Triton cache: compiles every kernel it runs)
SANITIZE_TIMEOUT = 150  # s, the same under compute-sanitizer (slower CUDA calls, same compiles)
INTERRUPT_GRACE = 40  # s that pytest gets after SIGINT to stop its xdist workers and print its summary


# ---------------------------------------------------------------------------------------------------------
# What is checked and timed.

@dataclass(frozen=True)
class Dims:
    """One block's sizes: S tokens × C channels; token_hidden D_S (ResMLP: S, its single S×S linear);
    channel_hidden D_C (gMLP: H, split into u and the gate's v of H/2 each)."""

    seq_len: int
    dim: int
    token_hidden: int
    channel_hidden: int
    family: str  # "mixer" | "resmlp" | "gmlp": the block kind, and the timing record's "block"
    approximate: str = "none"  # GELU
    drop_path: bool = False  # the checks pass per-sample drop-path factors (one sample dropped)


SHAPES = {
    "mixer_b16": Dims(196, 768, 384, 3072, "mixer"),
    "mixer_l16": Dims(196, 1024, 512, 4096, "mixer"),
    "resmlp_24": Dims(196, 384, 196, 1536, "resmlp", drop_path=True),
    "gmlp_s16": Dims(196, 256, 196, 1536, "gmlp"),  # timm gmlp_s16_224: mlp_ratio 6, the gate on 768
    # S = 49 (/32 models), C = 100 and D_S = 24 not multiples of 16, tanh GELU, drop path
    "awkward": Dims(49, 100, 24, 200, "mixer", approximate="tanh", drop_path=True),
}
# --quick (Triton's interpreter on a CPU): the same cases in miniature.
QUICK_SHAPES = {
    "mixer_b16": Dims(16, 32, 16, 64, "mixer"),
    "resmlp_24": Dims(16, 32, 16, 64, "resmlp", drop_path=True),
    "gmlp_s16": Dims(16, 32, 16, 48, "gmlp"),
    "awkward": Dims(7, 20, 6, 40, "mixer", approximate="tanh", drop_path=True),
}
DTYPES = ("bf16", "fp16", "fp32")
OPS = {"token_mixing": ("mixer_b16", "resmlp_24", "awkward"), "channel_mixing": ("mixer_b16", "resmlp_24", "awkward"),
       "spatial_gating": ("gmlp_s16",)}
# Batch 4 makes B·S a multiple of 16 as at batch 256, so the timing groups find many of the kernels the
# checks compiled in Triton's cache (it specialises integer arguments on divisibility by 16); 3 is awkward.
# --quick uses 2: with one image the drop-path cases would drop the whole batch (factor 0 on image 0).
CHECK_BATCH = {"mixer_b16": 4, "resmlp_24": 4, "gmlp_s16": 4, "awkward": 3}
QUICK_BATCH = 2
# Every op, dtype and code path (LayerNorm, affine + layer scale, drop path, tanh GELU) at least once.
QUICK_CASES = (("token_mixing", "mixer_b16", "bf16"), ("token_mixing", "resmlp_24", "fp32"),
               ("token_mixing", "awkward", "fp16"), ("channel_mixing", "resmlp_24", "bf16"),
               ("channel_mixing", "awkward", "fp32"), ("spatial_gating", "gmlp_s16", "fp16"))
# fc1's LayerNorm folded (MIXER_FAST_LN=fold; the default places it on load until a GPU times both): checked
# too, so that a session can switch the default on the strength of one call (LayerNorm, the affine with
# layer scale and drop path, the awkward shape, gMLP).
FOLDED_CASES = (("channel_mixing", "mixer_b16", "bf16"), ("channel_mixing", "resmlp_24", "bf16"),
                ("channel_mixing", "awkward", "fp32"), ("spatial_gating", "gmlp_s16", "bf16"))
QUICK_FOLDED_CASES = (("channel_mixing", "mixer_b16", "bf16"),)
# Every GEMM on cuBLAS with the Triton passes around them (MIXER_FAST_GEMM=cublas and MIXER_FAST_TOKEN=cublas;
# cublas_engine.py, the fused kernels' fallback until a GPU times both): LayerNorm with the residual folded
# into the GEMM, the affine with layer scale and drop path, ResMLP's token linear, the awkward shape's token
# MLP, gMLP (six processes, each a handful of small kernels to compile).
CUBLAS_CASES = (("token_mixing", "mixer_b16", "bf16"), ("token_mixing", "resmlp_24", "bf16"),
                ("token_mixing", "awkward", "fp32"), ("channel_mixing", "mixer_b16", "bf16"),
                ("channel_mixing", "resmlp_24", "bf16"), ("spatial_gating", "gmlp_s16", "bf16"))
QUICK_CUBLAS_CASES = (("token_mixing", "mixer_b16", "bf16"), ("channel_mixing", "resmlp_24", "bf16"))
TIMING_BATCH = 256
GRAPH_BATCH = 8


@dataclass(frozen=True)
class CheckCase:
    """One correctness process: the op's forward, then its backward, at ``shape`` in ``dtype``."""

    op: str
    shape: str
    dtype: str
    batch: int
    quick: bool = False
    ln: str = "load"  # MIXER_FAST_LN for the process
    gemm: str = "fused"  # the engines for the process: "fused" (flash / fused kernels) or "cublas" (ENGINE_ENV)

    @property
    def name(self) -> str:
        return (f"{self.op} {self.shape} {self.dtype}" + ("" if self.ln == "load" else f" ln {self.ln}")
                + ("" if self.gemm == "fused" else f" gemm {self.gemm}"))

    @property
    def uses_gemm(self) -> bool:
        """Whether the op runs the fused GEMM (Mixer's flash-MLP token kernels do not; on the cuBLAS engine
        only gMLP's gate does)."""
        if self.gemm == "cublas":
            return self.op == "spatial_gating"
        dims = (QUICK_SHAPES if self.quick else SHAPES)[self.shape]
        return self.op != "token_mixing" or dims.family == "resmlp"

    def task(self) -> Dict[str, Any]:
        return {"task": "check", **asdict(self)}


@dataclass(frozen=True)
class TimingGroup:
    """One timing process. ``what``: an op, "block", "peak" (the 8192³ bf16 matmul the floors divide by), or
    "tiles" (tile_candidates).
    ``estimate_s``: its expected wall time on an H100/H200 with a cold Triton cache (see TIMING_GROUPS)."""

    what: str
    shape: Optional[str]
    dtype: str
    estimate_s: float

    @property
    def name(self) -> str:
        return "timing peak" if self.what == "peak" else f"timing {self.what} {self.shape} {self.dtype}"


# Priority order: the ops the dispatch table chooses between first, then the blocks, then the other dtypes.
# Estimates (not yet measured: this file was written without a GPU; check.log records each group's real
# time, so replace them from a run): ~6 s to start a process and import torch (+2 s timm) and initialise CUDA;
# ~1-2 s per Triton compile with ~10-20 compiles per op and mode at a batch-256 specialisation (fewer when
# the checks left them in the cache; since 2026-11-29 they compile at once, warm_providers: not counted
# on here yet, and a group that ends sooner leaves its time to the next); autotuning and do_bench
# ~0.2-0.5 s a measurement; torch.compile of a Mixer-B/16 block ~9 s forward + ~12 s training (measured on
# the H200, shared/gpu/2026-11-27-H200). Every op
# and block times the cuBLAS engine too (CUBLAS_PROVIDER): ~10 s more each (a few small Triton kernels to
# compile, and two more modes timed).
TIMING_GROUPS = (
    TimingGroup("peak", None, "bf16", 10),
    TimingGroup("token_mixing", "mixer_b16", "bf16", 45),
    TimingGroup("channel_mixing", "mixer_b16", "bf16", 50),
    TimingGroup("token_mixing", "mixer_l16", "bf16", 45),
    TimingGroup("spatial_gating", "gmlp_s16", "bf16", 50),
    TimingGroup("token_mixing", "resmlp_24", "bf16", 40),
    TimingGroup("channel_mixing", "resmlp_24", "bf16", 45),
    TimingGroup("block", "mixer_b16", "bf16", 55),
    TimingGroup("block", "resmlp_24", "bf16", 50),
    TimingGroup("block", "gmlp_s16", "bf16", 55),
    TimingGroup("token_mixing", "mixer_b16", "fp16", 45),
    TimingGroup("channel_mixing", "mixer_b16", "fp16", 50),
    TimingGroup("token_mixing", "mixer_b16", "fp32", 45),
    TimingGroup("channel_mixing", "mixer_b16", "fp32", 50),
)


# ``--parts tiles``: one process a shape; ~2 s to compile and ~1 s to time each candidate (estimates).
TILE_GROUPS = (TimingGroup("tiles", "mixer_b16", "bf16", 60), TimingGroup("tiles", "mixer_l16", "bf16", 60))


def tile_candidates() -> Dict[str, List[Any]]:
    """kernel → the token_mixing.Launch candidates timed by ``--parts tiles`` at S = 196, Hopper's planned
    one first (the tiles part is for an H100 / H200: below Hopper, and on sm_120, the plans differ).
    Spill-free in the static report (triton 3.6 with CUDA 13's ptxas, sm_90a, bf16) except where marked;
    bench/NOTES.md has the sweep they come from."""
    from mixer_fast.kernels.triton.token_mixing import DW1, DW2, Launch, s_pieces

    p, wide, both = s_pieces(196), (256, 0, 0), (DW1, DW2)
    return {
        # 128 channels a program halve the weight pieces' L2 traffic (bench/NOTES.md, 2026-11-28): the
        # forward's spill 112 / 16 B in triton 3.8, none in 3.6; dx's are clean in both
        "token_mlp_fwd": [Launch(p, 64, 32, 8, 2), Launch(p, 64, 32, 4, 2),  # 4 warps: 120 B spills in triton 3.8
                          Launch(p, 64, 16, 4, 2), Launch(p, 64, 16, 8, 2), Launch(p, 128, 32, 8, 2),
                          Launch(p, 128, 16, 8, 2)],
        "token_mlp_dx": [Launch(p, 64, 32, 4, 2), Launch(p, 64, 16, 4, 2), Launch(p, 64, 32, 8, 2),
                         Launch(p, 128, 32, 8, 2), Launch(p, 128, 16, 8, 2)],
        "token_mlp_dw": [Launch(wide, 16, 64, 8, 3, both), Launch(wide, 16, 64, 8, 2, both),  # 72 B spills
                         Launch(wide, 32, 64, 8, 2, both),  # 136 B spills (dW1)
                         Launch(p, 32, 64, 8, 3, both)],  # 152 B spills (dW1)
    }


def check_cases(quick: bool) -> List[CheckCase]:
    """The correctness processes, the biggest first (they take longest, so the pool ends evenly)."""
    if quick:
        return ([CheckCase(op, shape, dtype, QUICK_BATCH, quick=True) for op, shape, dtype in QUICK_CASES]
                + [CheckCase(op, shape, dtype, QUICK_BATCH, quick=True, ln="fold")
                   for op, shape, dtype in QUICK_FOLDED_CASES]
                + [CheckCase(op, shape, dtype, QUICK_BATCH, quick=True, gemm="cublas")
                   for op, shape, dtype in QUICK_CUBLAS_CASES])
    return ([CheckCase(op, shape, dtype, CHECK_BATCH[shape])
             for shape in ("mixer_b16", "gmlp_s16", "resmlp_24", "awkward")
             for op, shapes in OPS.items() if shape in shapes for dtype in DTYPES]
            + [CheckCase(op, shape, dtype, CHECK_BATCH[shape], ln="fold") for op, shape, dtype in FOLDED_CASES]
            + [CheckCase(op, shape, dtype, CHECK_BATCH[shape], gemm="cublas") for op, shape, dtype in CUBLAS_CASES])


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/test_gpu_check.py).

def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as the strings "inf", "-inf", "nan" (strict JSON has no Infinity/NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def dumps(record: Dict[str, Any]) -> str:
    return json.dumps(jsonable(record), allow_nan=False)


def forward_flops(what: str, dims: Dims, batch: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward of ``what`` (an op or "block"); training is 3×."""
    B, S, C = batch, dims.seq_len, dims.dim
    if dims.family == "gmlp":  # fc1 (C → H), the gate's S×S linear on H/2 channels, fc2 (H/2 → C)
        H = dims.channel_hidden
        return 2.0 * B * S * C * H + 2.0 * B * (H // 2) * S * S + 2.0 * B * S * (H // 2) * C
    token = (2.0 if dims.family == "resmlp" else 4.0) * B * C * S * dims.token_hidden  # one or two GEMMs
    channel = 4.0 * B * S * C * dims.channel_hidden
    return {"token_mixing": token, "channel_mixing": channel, "block": token + channel}[what]


def floor_ms(what: str, dims: Dims, batch: int, mode: str, peak_tflops: Optional[float]) -> Optional[float]:
    """The compute floor: the mode's FLOPs at the measured matmul peak (None without a peak)."""
    if not peak_tflops:
        return None
    flops = forward_flops(what, dims, batch) * (3.0 if mode == "training" else 1.0)
    return flops / (peak_tflops * 1e12) * 1e3


def timing_record(what: str, shape: str, batch: int, mode: str, dtype: str, device_class: str,
                  ms: Dict[str, float], errors: Dict[str, str], floor: Optional[float],
                  peak_mib: Dict[str, float]) -> Dict[str, Any]:
    """One timing record (schema in the module docstring): "errors" only when a provider failed, "peak_mib"
    only for training."""
    record = {"kind": "timing", "op": what, "block": SHAPES[shape].family if what == "block" else None,
              "shape": shape, "batch": batch, "mode": mode, "dtype": dtype, "device_class": device_class,
              "ms": dict(ms), "floor_ms": floor}
    if errors:
        record["errors"] = dict(errors)
    if mode == "training":
        record["peak_mib"] = dict(peak_mib)
    return record


class Budget:
    """Seconds left until a deadline (``clock`` is injectable for tests)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds

    def left(self) -> float:
        return max(0.0, self._end - self._clock())


def run_in_budget(groups: Sequence[TimingGroup], budget: Budget,
                  run: Callable[[TimingGroup, float], None]) -> List[str]:
    """Run ``groups`` in order, each only if its estimate fits in what is left of ``budget``, with the rest of
    the budget as its timeout; a group that does not fit is skipped (a later, cheaper one may still run).
    Returns the skipped groups with the reason."""
    skipped = []
    for group in groups:
        left = budget.left()
        if group.estimate_s > left:
            skipped.append(f"{group.name}: budget (needs ~{group.estimate_s:.0f} s, {left:.0f} s left)")
            continue
        run(group, left)
    return skipped


def sanitizer_excerpt(output: str, lines: int = 40) -> str:
    """The first ``lines`` lines of compute-sanitizer's report (its lines start with "========="), or the
    end of the output when it printed no report (it did not run, or found nothing)."""
    report = [line for line in output.splitlines() if line.startswith("=========")]
    return "\n".join(report[:lines] if report else output.splitlines()[-lines:])


def is_device_fault(text: str) -> bool:
    """Whether an error text is a CUDA fault (which poisons the process's context), not a plain failure."""
    return bool(DEVICE_FAULT.search(text))


def error_text(e: BaseException, limit: int = 2000) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " …"


# ---------------------------------------------------------------------------------------------------------
# Worker side: one process per case; prints its records on stdout (RECORD_PREFIX) as soon as each is known.

def emit(record: Dict[str, Any]) -> None:
    print(RECORD_PREFIX + dumps(record), flush=True)


def _setup_worker() -> None:
    """Imports for a worker: Triton's interpreter without CUDA (chosen before triton is imported), and
    tests/ first on sys.path (its conftest, not bench/'s; op_cases, test_gmlp and tolerances are reused)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    from mixer_fast import dispatch

    dispatch.load("triton")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_class() -> str:
    """"sm_90" for compute capability 9.0; "cpu" without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _op_inputs(op: str, dims: Dims, batch: int, *, drop_path: bool):
    """(arguments by name: float64 CPU tensors or None, ``call(leaves, backend) → (B, S, C)``) of ``op``.
    Arguments come from the tests' own makers (random, at a trained block's scales)."""
    from mixer_fast import ops

    if op == "spatial_gating":
        from test_gmlp import NAMES as GATING_NAMES, _gating_args

        args = _gating_args(batch, dims.seq_len, dims.dim, dims.channel_hidden)

        def call_gating(leaves, backend):
            return ops.spatial_gating(*(leaves[n] for n in GATING_NAMES), approximate=dims.approximate,
                                      backend=backend)

        return args, call_gating
    from op_cases import NAMES, make_args

    token = op == "token_mixing"
    variant = "resmlp" if dims.family == "resmlp" else ("droppath" if drop_path else "mixer")
    args = make_args("token" if token else "channel", batch, dims.seq_len, dims.dim,
                     dims.token_hidden if token else dims.channel_hidden, variant=variant)
    sample_scale = args.pop("sample_scale")  # (B,) per-sample factors, or None
    if not drop_path:
        sample_scale = None
    fn = ops.token_mixing if token else ops.channel_mixing

    def call(leaves, backend):
        x = leaves["x"]
        ss = None if sample_scale is None else sample_scale.to(device=x.device, dtype=x.dtype)
        return fn(*(leaves[n] for n in NAMES[:7]), scale=leaves["scale"], sample_scale=ss,
                  norm="affine" if dims.family == "resmlp" else "layernorm", approximate=dims.approximate,
                  backend=backend)

    return args, call


def _leaves(args, dtype, device: str):
    """The arguments cast to ``dtype`` on ``device`` as fresh leaves that require grad (None stays None)."""
    return {n: None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_()
            for n, t in args.items()}


def _forward_backward(call, args, dtype, backend: str, dout, device: str):
    """(output, gradients by name) of ``call`` on ``backend``; used for ref64 and eager."""
    leaves = _leaves(args, dtype, device)
    out = call(leaves, backend)
    out.backward(dout.to(device=device, dtype=dtype))
    return out.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


def _compare(results: Dict[str, Tuple[Any, Any, Any]], dtype) -> Tuple[Dict[str, List[float]], List[str]]:
    """{name: [max|fused − ref64|, bound]} under the numerics rule, and what else is wrong (a missing
    gradient, a wrong dtype), from {name: (fused, eager, ref64)}."""
    from tolerances import bound, max_err

    errors, problems = {}, []
    for name, (fused, eager, ref64) in results.items():
        if fused is None:
            problems.append(f"{name}: no result")
            continue
        if fused.dtype != dtype or fused.shape != ref64.shape:
            problems.append(f"{name}: {fused.dtype} {tuple(fused.shape)}, expected {dtype} {tuple(ref64.shape)}")
            continue
        errors[name] = [max_err(fused, ref64), bound(eager, ref64, dtype)]
    return errors, problems


def _check_record(case: Dict[str, Any], mode: str, errors=None, problems=(), error: Optional[str] = None):
    errors = errors or {}
    problem_text = "; ".join(problems) or None
    ok = error is None and problem_text is None and all(err <= lim for err, lim in errors.values())
    return {"kind": "check", "op": case["op"], "mode": mode, "dtype": case["dtype"], "shape": case["shape"],
            "batch": case["batch"], "ln": case["ln"], "gemm": case["gemm"], "ok": ok, "errors": errors,
            "error": error or problem_text, "sanitizer": None, "without_tma": None}


def check_worker(op: str, shape: str, dtype: str, batch: int, quick: bool, ln: str = "load",
                 gemm: str = "fused") -> bool:
    """Forward then backward of ``op`` on the triton backend against eager and float64 on the same device,
    with fc1's LayerNorm placed by ``ln`` (MIXER_FAST_LN) and the GEMMs run by ``gemm`` ("fused" or "cublas":
    ENGINE_ENV); emits one record per mode. Returns whether a CUDA fault was caught."""
    import torch

    os.environ["MIXER_FAST_LN"] = ln
    os.environ.update(ENGINE_ENV[gemm])
    case = {"op": op, "shape": shape, "dtype": dtype, "batch": batch, "ln": ln, "gemm": gemm}
    dims, dt, device = (QUICK_SHAPES if quick else SHAPES)[shape], _torch_dtype(dtype), _device()
    args, call = _op_inputs(op, dims, batch, drop_path=dims.drop_path)
    dout = torch.randn(args["x"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # The references first: a fault in the fused op would leave the context unusable for them.
    out64, g64 = _forward_backward(call, args, torch.float64, "reference", dout, device)
    eager, g_eager = _forward_backward(call, args, dt, "reference", dout, device)
    leaves = _leaves(args, dt, device)
    mode = "forward"
    try:
        out = call(leaves, "triton")
        _sync()
        emit(_check_record(case, mode, *_compare({"out": (out.detach(), eager, out64)}, dt)))
        mode = "backward"
        out.backward(dout.to(device=device, dtype=dt))
        _sync()
        grads = {n: (leaves[n].grad, g_eager[n], g64[n]) for n in g64}
        emit(_check_record(case, mode, *_compare(grads, dt)))
    except Exception as e:  # noqa: BLE001 - any failure of the fused op is the finding, recorded as such
        emit(_check_record(case, mode, error=error_text(e)))
        if mode == "forward":
            emit(_check_record(case, "backward", error="not run: the forward failed"))
        return is_device_fault(error_text(e))
    return False


def graph_worker() -> bool:
    """Capture a Mixer-B/16 MixerBlock (triton, bf16, inference) in a CUDA graph, replay it on new input and
    compare bitwise with the block run eagerly on that input."""
    import torch

    import mixer_fast
    from tolerances import max_err

    dims = SHAPES["mixer_b16"]
    torch.manual_seed(0)
    block = mixer_fast.MixerBlock(dims.dim, dims.seq_len, backend="triton", device="cuda",
                                  dtype=torch.bfloat16).eval()
    x = torch.randn(GRAPH_BATCH, dims.seq_len, dims.dim, device="cuda", dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            # Compiling and autotuning launch work that cannot be captured: warm up first, on a side stream
            # as torch.cuda.graph's documentation asks.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    block(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = block(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            eager = block(x)
        emit({"kind": "graph", "ok": torch.equal(captured, eager), "max_diff": max_err(captured, eager),
              "error": None})
    except Exception as e:  # noqa: BLE001
        emit({"kind": "graph", "ok": False, "max_diff": None, "error": error_text(e)})
        return is_device_fault(error_text(e))
    return False


def _measure(fn: Callable[[], Any]) -> float:
    """Median ms of ``fn`` by triton.testing.do_bench, after two calls that compile, autotune and
    torch.compile outside the timed region (do_bench sizes its repetitions from its first call)."""
    import torch
    from triton.testing import do_bench

    fn()
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, return_mode="median"))


def _peak_mib(fn: Callable[[], Any]) -> float:
    """torch.cuda.max_memory_allocated over one call of ``fn``, in MiB (everything alive in the process
    counts: the inputs and parameters, the same for every provider of a group)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def peak_worker() -> bool:
    """The bf16 matmul peak the floors divide by: an 8192³ cuBLAS GEMM."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _measure(lambda: torch.mm(a, b))
    emit({"kind": "peak", "tflops": 2.0 * n**3 / (ms * 1e-3) / 1e12})
    return False


def _modes(run: Callable[[], Any], grads_of: Iterable[Any], dout) -> Dict[str, Callable[[], Any]]:
    """The timed calls of one provider: forward under no_grad, and a training step (forward + backward,
    gradients cleared first so none is accumulated)."""
    import torch

    grads_of = [t for t in grads_of if t is not None]

    def forward():
        with torch.no_grad():
            return run()

    def training():
        for t in grads_of:
            t.grad = None
        run().backward(dout)

    return {"forward": forward, "training": training}


def _cublas_modes(x, w1, w2, dout) -> Dict[str, Callable[[], Any]]:
    """Channel mixing's bare GEMMs (M = B·S rows): forward h = x·W1ᵀ, y = h·W2ᵀ; training adds
    dH = dY·W2, dW2 = dYᵀ·h, dX = dH·W1, dW1 = dHᵀ·x (six in all)."""
    x2, d2 = x.detach().reshape(-1, x.shape[-1]), dout.reshape(-1, x.shape[-1])
    w1, w2 = w1.detach(), w2.detach()

    def forward():
        return (x2 @ w1.t()) @ w2.t()

    def training():
        h = x2 @ w1.t()
        h @ w2.t()
        dh = d2 @ w2
        return d2.t() @ h, dh @ w1, dh.t() @ x2

    return {"forward": forward, "training": training}


def _op_providers(op: str, dims: Dims, dtype, batch: int, device: str) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """provider → mode → timed call, for one op (triton last: a fault there cannot spoil the others)."""
    import torch

    args, call = _op_inputs(op, dims, batch, drop_path=False)
    leaves = _leaves(args, dtype, device)
    dout = torch.randn_like(leaves["x"])
    providers = {"reference": _modes(lambda: call(leaves, "reference"), leaves.values(), dout)}
    if op == "channel_mixing":
        providers["cublas"] = _cublas_modes(leaves["x"], leaves["fc1_weight"], leaves["fc2_weight"], dout)
    modes = _modes(lambda: call(leaves, "triton"), leaves.values(), dout)
    providers["triton"] = _env_modes(modes, "fused", "load")
    if op in LN_FOLD_OPS:
        # The other LayerNorm placement of fc1's GEMM (matmul.ln_placement), side by side with the default
        providers[FOLDED_PROVIDER] = _env_modes(modes, "fused", "fold")
    providers[CUBLAS_PROVIDER] = _env_modes(modes, "cublas", "load")
    return providers


# The ops whose fc1 GEMM can take its LayerNorm folded, timed both ways (issue 17: "on load or folded into
# the epilogue, say which, and why, measured"); their records carry ms[FOLDED_PROVIDER] too.
LN_FOLD_OPS = ("channel_mixing", "spatial_gating")
FOLDED_PROVIDER = "triton_ln_folded"
# Every op and block runs on either engine, the fused Triton kernels (the flash-MLP token kernels and the fused
# GEMMs) or cuBLAS with Triton passes around it (cublas_engine.py), timed both ways (issue 17: "measure cuBLAS
# plus fused Triton element-wise kernels and use whichever is faster"; issue 16's kernels against the same).
CUBLAS_PROVIDER = "triton_cublas"
ENGINE_ENV = {"fused": {"MIXER_FAST_GEMM": "fused", "MIXER_FAST_TOKEN": "flash"},
              "cublas": {"MIXER_FAST_GEMM": "cublas", "MIXER_FAST_TOKEN": "cublas"}}


def _env_modes(modes: Dict[str, Callable[[], Any]], engine: str, ln: str) -> Dict[str, Callable[[], Any]]:
    """Each of ``modes`` run whole (forward and backward) with ``engine``'s variables (ENGINE_ENV) and
    MIXER_FAST_LN=``ln``, so that a provider times one engine and placement whatever the process's defaults."""
    return {mode: _pinned(fn, engine, ln) for mode, fn in modes.items()}


def _pinned(fn: Callable[[], Any], engine: str, ln: str) -> Callable[[], Any]:
    """``fn`` run with ``engine``'s variables (ENGINE_ENV) and MIXER_FAST_LN=``ln``."""
    for name, value in (("MIXER_FAST_LN", ln), *ENGINE_ENV[engine].items()):
        fn = _with_env(fn, name, value)
    return fn


def _with_env(fn: Callable[[], Any], name: str, value: str) -> Callable[[], Any]:
    """``fn`` run with the environment variable ``name`` set to ``value`` (restored afterwards)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def _reference_block(dims: Dims):
    """timm's block of this family (the eager baseline users have), or mixer_fast.reference's without timm."""
    try:
        from timm.layers import GatedMlp
        from timm.models.mlp_mixer import MixerBlock, ResBlock, SpatialGatingBlock
    except ImportError:
        from mixer_fast.reference import GatedMlp, MixerBlock, ResMLPBlock as ResBlock, SpatialGatingBlock
    C, S = dims.dim, dims.seq_len
    if dims.family == "mixer":
        return MixerBlock(C, S, mlp_ratio=(dims.token_hidden / C, dims.channel_hidden / C))
    if dims.family == "resmlp":
        return ResBlock(C, S, mlp_ratio=dims.channel_hidden / C, init_values=1e-5)
    return SpatialGatingBlock(C, S, mlp_ratio=dims.channel_hidden / C, mlp_layer=GatedMlp)


def _fused_block(dims: Dims, state_dict):
    """mixer_fast's block of this family on the triton backend, loaded strictly with ``state_dict``."""
    import mixer_fast

    C, S = dims.dim, dims.seq_len
    if dims.family == "mixer":
        block = mixer_fast.MixerBlock(C, S, mlp_ratio=(dims.token_hidden / C, dims.channel_hidden / C),
                                      backend="triton")
    elif dims.family == "resmlp":
        block = mixer_fast.ResMLPBlock(C, S, mlp_ratio=dims.channel_hidden / C, backend="triton")
    else:
        block = mixer_fast.SpatialGatingBlock(C, S, mlp_ratio=dims.channel_hidden / C, backend="triton")
    block.load_state_dict(state_dict, strict=True)
    return block


def _block_providers(dims: Dims, dtype, batch: int, with_compile: bool,
                     device: str) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """provider → mode → timed call, for one block: the eager reference block, torch.compile of it (default
    mode), and mixer_fast's block with the same weights (triton last)."""
    import torch

    reference = _reference_block(dims).to(device=device, dtype=dtype).eval()
    fused = _fused_block(dims, reference.state_dict()).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, dims.seq_len, dims.dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(x)
    modules = {"reference": reference}
    if with_compile:
        modules["compile"] = torch.compile(reference)
    modules["triton"] = fused
    providers = {name: _modes(lambda m=m: m(x), [x, *m.parameters()], dout) for name, m in modules.items()}
    providers["triton"] = _env_modes(providers["triton"], "fused", "load")
    providers[CUBLAS_PROVIDER] = _env_modes(_modes(lambda: fused(x), [x, *fused.parameters()], dout), "cublas",
                                            "load")
    return providers


def timing_providers(what: str, shape: str, dtype: str, batch: int,
                     device: str) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """provider → mode → timed call, for one timing group (torch.compile of a block in bf16 only)."""
    dims, dt = SHAPES[shape], _torch_dtype(dtype)
    if what == "block":
        return _block_providers(dims, dt, batch, with_compile=dtype == "bf16", device=device)
    return _op_providers(what, dims, dt, batch, device)


def fused_providers(providers: Dict[str, Any]) -> List[str]:
    """The providers that run mixer_fast's Triton kernels (timed last; their kernels warmed up first)."""
    return [p for p in providers if p.startswith("triton")]


def timing_worker(what: str, shape: str, dtype: str, batch: int, peak_tflops: Optional[float]) -> bool:
    """Times every provider of one op or block in both modes; emits one record per mode. Returns whether a
    CUDA fault was caught."""
    dims = SHAPES[shape]
    providers = timing_providers(what, shape, dtype, batch, _device())
    results = {mode: ({}, {}, {}) for mode in MODES["timing"]}  # mode → (ms, errors, peak_mib)
    # Every other provider in both modes before the triton ones, so that a triton fault spoils nothing else;
    # the triton ones' warm-up too (it runs none of their kernels, but whatever else they do). After a fault
    # the CUDA context is lost: the triton providers still to come are not run, and say so ("not run: ..."),
    # rather than fail and have their error taken for their own (wins_table skips them).
    fused = fused_providers(providers)
    order = [(p, m) for p in providers if p not in fused for m in MODES["timing"]]
    order += [(p, m) for p in fused for m in MODES["timing"]]
    faulted_by, warmed = None, {"compile_threads": 0, "compile_s": 0.0}
    for provider, mode in order:
        ms, errors, peak = results[mode]
        fn = providers[provider][mode]
        if (provider, mode) == (fused[0], MODES["timing"][0]) and faulted_by is None:
            warmed = warm_providers([providers[p][m] for p in fused for m in MODES["timing"]])
            if is_device_fault(warmed.get("warm_up_error", "")):
                faulted_by = "the triton providers' warm-up"
        if faulted_by is not None:
            errors[provider] = f"not run: the CUDA context was lost when {faulted_by} faulted"
        else:
            try:
                ms[provider] = _measure(fn)
                if mode == "training" and (provider == "reference" or provider in fused):
                    peak[provider] = _peak_mib(fn)
            except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
                errors[provider] = error_text(e)
                if is_device_fault(errors[provider]):
                    faulted_by = f"{provider} ({mode})"
        if provider == fused[-1]:
            emit(dict(timing_record(what, shape, batch, mode, dtype, device_class(), ms, errors,
                                    floor_ms(what, dims, batch, mode, peak_tflops), peak), **warmed))
    return faulted_by is not None


def warm_providers(fns: Sequence[Callable[[], Any]]) -> Dict[str, Any]:
    """Compiles every Triton kernel that ``fns`` (a timing group's triton providers, each mode) launch before
    any is timed, the compiles at once instead of one by one at each provider's first call: ~1-2 s each on
    the CPU of a device machine, tens of kernels a group (recorded_warm_up, which returns what the records
    carry). A GEMM site without a tuned config records the compiles of all its candidates (Tuner.config)
    and is tuned at its first timed call, as before, on compiled candidates (untimed: _measure's first two
    calls). Not warmed: a token launcher's fallback to the cuBLAS engine where a flash plan does not fit the
    GPU's shared memory (nothing is loaded while recording, so the plan's OutOfResources comes at the first
    timed call, which then compiles the fallback's kernels one by one; untimed, as _measure's first two
    calls are)."""
    return recorded_warm_up(fns)


def recorded_warm_up(runs: Sequence[Callable[[], Any]]) -> Dict[str, Any]:
    """Runs each of ``runs`` once under _launch.record_launches, then compiles every launch they recorded at
    once (_launch.compile_concurrently; each key once). The runs' torch operations and cuBLAS calls run;
    their Triton launches are recorded, not run (what they would have written stays unwritten, and later
    operations read that). A run that fails is passed over: the timed call meets its error and records it.
    A CUDA fault ends the warm-up with nothing compiled (the context is lost). Returns what the records
    carry: ``compile_threads`` (0: nothing compiled ahead), ``compile_s`` (the runs and the compiles) and,
    where a run failed, ``warm_up_error`` (the fault, else the first failure; and how many runs failed).
    Nothing runs in Triton's interpreter, where nothing compiles."""
    from mixer_fast.kernels.triton import _launch

    started = time.monotonic()
    if _launch.INTERPRET:
        return {"compile_threads": 0, "compile_s": 0.0}
    errors: List[str] = []
    with _launch.record_launches() as warmups:
        for run in runs:
            try:
                run()
                _sync()
            except Exception as e:  # noqa: BLE001 - see above
                errors.append(error_text(e))
                if is_device_fault(errors[-1]):
                    break
    faulted = bool(errors) and is_device_fault(errors[-1])
    threads = 0 if faulted else _launch.compile_concurrently(warmups)
    warmups.clear()  # they held every tensor of the runs: gone before anything is timed or measured
    if not faulted:
        _empty_cache()
    warmed: Dict[str, Any] = {"compile_threads": threads, "compile_s": round(time.monotonic() - started, 2)}
    if errors:
        more = f" ({len(errors)} of {len(runs)} runs failed)" if len(errors) > 1 else ""
        warmed["warm_up_error"] = (errors[-1] if faulted else errors[0]) + more
    return warmed


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tiles_worker(shape: str, dtype: str, batch: int) -> bool:
    """Times token mixing with each of tile_candidates() in turn; emits one "tiles" record per candidate.
    Every candidate compiles first, at once (warm_tiles). Returns whether a CUDA fault was caught (the
    process then stops; after a fault in the warm-up, every candidate says it was not run)."""
    from mixer_fast.kernels.triton import token_mixing

    modes, candidates = tile_modes(shape, dtype, batch, _device()), tile_candidates()
    warmed = warm_tiles(modes, candidates)
    lost = is_device_fault(warmed.get("warm_up_error", ""))
    for kernel, launches in candidates.items():
        mode = TILE_MODES[kernel]
        for launch in launches:
            record = {"kind": "tiles", "kernel": kernel, "plan": launch.label() + (
                f" parts {','.join(map(str, launch.parts))}" if kernel == "token_mlp_dw" else ""),
                "shape": shape, "batch": batch, "mode": mode, "dtype": dtype, "ms": None, "error": None, **warmed}
            if lost:
                record["error"] = "not run: the CUDA context was lost when the tiles' warm-up faulted"
            else:
                try:
                    with token_mixing.override_plan(kernel, launch):
                        record["ms"] = _measure(modes[mode])
                except Exception as e:  # noqa: BLE001 - recorded; the other candidates still run
                    record["error"] = error_text(e)
            emit(record)
            if not lost and record["error"] and is_device_fault(record["error"]):
                return True
    return lost


def tile_modes(shape: str, dtype: str, batch: int, device: str) -> Dict[str, Callable[[], Any]]:
    """The calls the tiles part times: token mixing's forward and training step (_modes) on the flash kernels
    whatever TOKEN_ENGINE ships (the candidates are theirs)."""
    import torch

    args, call = _op_inputs("token_mixing", SHAPES[shape], batch, drop_path=False)
    leaves = _leaves(args, _torch_dtype(dtype), device)
    return _env_modes(_modes(lambda: call(leaves, "triton"), leaves.values(), torch.randn_like(leaves["x"])),
                      "fused", "load")


# kernel → the mode its candidates are timed in
TILE_MODES = {"token_mlp_fwd": "forward", "token_mlp_dx": "training", "token_mlp_dw": "training"}


def warm_tiles(modes: Dict[str, Callable[[], Any]], candidates: Dict[str, List[Any]]) -> Dict[str, Any]:
    """Compiles every tile candidate before any is timed, their compiles at once, instead of one after another
    at each candidate's first timed call: ~2 s each on the CPU of a device machine, 15 candidates a shape.
    Each candidate's mode (TILE_MODES) runs once under its override_plan while launches are recorded
    (recorded_warm_up, as for the timing groups: process-wide, so a CUDA backward's launches in autograd's
    own thread are recorded too), and nothing runs; what was recorded, the candidate's kernel and the
    planned ones around it, then compiles once per key. Returns recorded_warm_up's record fields: a
    candidate whose run fails is passed over, and on a CUDA fault nothing compiles."""
    from mixer_fast.kernels.triton import token_mixing

    def under_plan(kernel, launch):
        def run():
            with token_mixing.override_plan(kernel, launch):
                modes[TILE_MODES[kernel]]()
        return run

    return recorded_warm_up([under_plan(kernel, launch) for kernel, launches in candidates.items()
                             for launch in launches])


def worker_main(task: Dict[str, Any]) -> int:
    """Runs one task (the JSON the parent passed) and returns the process's exit status."""
    kind = task.pop("task")
    if kind.startswith("jax_"):
        import gpu_check_jax as gj

        gj.setup_worker()
        handler = {"jax_check": gj.jax_check_worker, "jax_timing": gj.jax_timing_worker}[kind]
    else:
        _setup_worker()
        handler = {"check": check_worker, "graph": graph_worker, "peak": peak_worker, "timing": timing_worker,
                   "tiles": tiles_worker}[kind]
    return FAULT_EXIT if handler(**task) else 0


# ---------------------------------------------------------------------------------------------------------
# Parent side.

@dataclass
class WorkerRun:
    """What one worker process left: its records, exit status (None: killed at its timeout), wall seconds,
    and its whole output (stdout then stderr)."""

    records: List[Dict[str, Any]]
    rc: Optional[int]
    seconds: float
    output: str

    @property
    def faulted(self) -> bool:
        """A CUDA fault: caught by the worker, a signal (segfault, abort), or a CUDA error in an uncaught
        exception. A timeout or a plain Python error is a failure, not a fault."""
        if self.rc is None or self.rc == 0:
            return False
        return self.rc == FAULT_EXIT or self.rc < 0 or is_device_fault(self.output[-4000:])

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def failure(self) -> str:
        """Why the process ended without all its records."""
        how = "was killed at its timeout" if self.rc is None else f"exited with status {self.rc}"
        return f"the worker process {how} after {self.seconds:.0f} s; its output ended:\n{self.tail(12)}"


def run_worker(task: Dict[str, Any], timeout: float, env: Optional[Dict[str, str]] = None,
               wrapper: Sequence[str] = ()) -> WorkerRun:
    """Run ``task`` in a fresh process (``wrapper``, e.g. compute-sanitizer, in front); its process group is
    killed at ``timeout`` (torch.compile and compute-sanitizer start children of their own)."""
    cmd = [*wrapper, sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(task)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
        rc: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = None
    records = [json.loads(line[len(RECORD_PREFIX):]) for line in stdout.splitlines()
               if line.startswith(RECORD_PREFIX)]
    rest = "\n".join(line for line in stdout.splitlines() if not line.startswith(RECORD_PREFIX))
    return WorkerRun(records, rc, time.monotonic() - started, rest + "\n" + stderr)


class Report:
    """The stage's files in DIR, written as things finish (a run cut short still leaves its records):
    check.jsonl, check.log, and sanitizer.txt once something faulted. Thread-safe."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._jsonl = open(out / "check.jsonl", "w", encoding="utf-8")
        self._log = open(out / "check.log", "w", encoding="utf-8")

    def record(self, record: Dict[str, Any]) -> None:
        with self._lock:
            self.records.append(record)
            self._jsonl.write(dumps(record) + "\n")
            self._jsonl.flush()

    def log(self, text: str) -> None:
        with self._lock:
            self._log.write(f"[{time.monotonic() - self._started:6.1f} s] {text}\n")
            self._log.flush()

    def log_run(self, name: str, run: WorkerRun) -> None:
        status = "killed at its timeout" if run.rc is None else f"exit {run.rc}"
        failed = run.rc != 0 or any(r.get("ok") is False or (r["kind"] in TIMING_KINDS and "errors" in r)
                                    for r in run.records)
        self.log(f"{name}: {status}, {run.seconds:.1f} s, {len(run.records)} record(s)"
                 + (f"\n{run.tail()}" if failed else ""))

    def sanitizer(self, name: str, output: str) -> None:
        with self._lock, open(self.out / "sanitizer.txt", "a", encoding="utf-8") as f:
            f.write(f"===== {name}\n{output}\n")

    def close(self) -> None:
        self._jsonl.close()
        self._log.close()


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin."""
    found = shutil.which("compute-sanitizer")
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for d in [*dirs, "/usr/local/cuda/bin"]:
        path = os.path.join(d, "compute-sanitizer")
        if not found and os.access(path, os.X_OK):
            found = path
    return found


@dataclass
class CheckPhase:
    """The correctness processes' shared state: the budgets, and the sanitizer reruns left."""

    report: Report
    checks_budget: Budget  # no process starts after it runs out
    total: Budget  # running processes are killed when it runs out
    sanitize_left: int
    faulted: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_sanitizer_slot(self) -> bool:
        with self.lock:
            if self.sanitize_left <= 0:
                return False
            self.sanitize_left -= 1
            return True


def _complete(run: WorkerRun, kind: str, record_for: Callable[[str, str], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A correctness process's records of ``kind``, one per mode: those the worker emitted, and
    ``record_for(mode, error)`` with the process's failure for any it did not."""
    by_mode = {r["mode"]: r for r in run.records if r["kind"] == kind}
    return [by_mode.get(mode) or record_for(mode, run.failure()) for mode in MODES["check"]]


def not_started(name: str, phase: "CheckPhase", record_for: Callable[[str, str], Dict[str, Any]]) -> bool:
    """Whether the correctness budget was spent before case ``name`` started; if so it is recorded as not run
    (``record_for(mode, error)``, one record a mode) and named as skipped."""
    if phase.checks_budget.left() > 0:
        return False
    phase.skipped.append(f"check {name}: the correctness budget was spent before it started")
    for mode in MODES["check"]:
        phase.report.record(record_for(mode, "not run: correctness budget spent"))
    return True


def _torch_record_for(case: CheckCase) -> Callable[[str, str], Dict[str, Any]]:
    return lambda mode, error: _check_record(asdict(case), mode, error=error)


def _sanitize(case: CheckCase, phase: CheckPhase) -> str:
    """Re-run a faulted case under compute-sanitizer (memcheck); its report's first lines, or why not."""
    tool = find_sanitizer()
    if tool is None:
        return "not run: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    if phase.checks_budget.left() <= 0:
        return "not run: the correctness budget was spent"
    if not phase.take_sanitizer_slot():
        return "not run: --max-sanitize reruns already used by other faults"
    run = run_worker(case.task(), min(SANITIZE_TIMEOUT, phase.total.left()), CHECK_ENV,
                     wrapper=[tool, "--tool", "memcheck", "--print-limit", "20"])
    phase.report.log_run(f"{case.name} under compute-sanitizer", run)
    phase.report.sanitizer(case.name, run.output)
    return sanitizer_excerpt(run.output)


def _without_tma(case: CheckCase, phase: CheckPhase) -> Dict[str, str]:
    """Re-run a failed case with the fused GEMM's TMA loads off (MIXER_FAST_TMA=0: they had never run on a
    GPU when this was written), so that one call tells a TMA fault from the rest: mode → "ok", its error,
    or why it was not run."""
    if phase.checks_budget.left() <= 0:
        return {mode: "not run: the correctness budget was spent" for mode in MODES["check"]}
    run = run_worker(case.task(), min(CASE_TIMEOUT, phase.total.left()), dict(CHECK_ENV, MIXER_FAST_TMA="0"))
    phase.report.log_run(f"{case.name} with MIXER_FAST_TMA=0", run)
    return {r["mode"]: "ok" if r["ok"] else r["error"] or f"errors {r['errors']}"
            for r in _complete(run, "check", _torch_record_for(case))}


def _run_check(case: CheckCase, phase: CheckPhase) -> None:
    """One correctness process (its sanitizer rerun when it faults, and a rerun without TMA loads when it
    fails); writes the case's records."""
    if not_started(case.name, phase, _torch_record_for(case)):
        return
    run = run_worker(case.task(), min(CASE_TIMEOUT, phase.total.left()), CHECK_ENV)
    phase.report.log_run(case.name, run)
    records = _complete(run, "check", _torch_record_for(case))
    if run.faulted:
        with phase.lock:
            phase.faulted.append(case.name)
        excerpt = _sanitize(case, phase)
        for r in records:
            if not r["ok"]:
                r["sanitizer"] = excerpt
    if case.uses_gemm and not all(r["ok"] for r in records):
        without = _without_tma(case, phase)
        for r in records:
            if not r["ok"]:
                r["without_tma"] = without[r["mode"]]
    for r in records:
        phase.report.record(r)


def _run_graph(phase: CheckPhase) -> None:
    """The CUDA-graph process (not under CUDA_LAUNCH_BLOCKING: it is about capture, not fault location)."""
    run = run_worker({"task": "graph"}, min(CASE_TIMEOUT, phase.total.left()))
    phase.report.log_run("graph", run)
    graphs = [r for r in run.records if r["kind"] == "graph"]
    phase.report.record(graphs[0] if graphs else {"kind": "graph", "ok": False, "max_diff": None,
                                                  "error": run.failure()})


def run_checks(cases: Sequence[CheckCase], with_graph: bool, jobs: int, phase: CheckPhase) -> None:
    """The graph process and the correctness processes, ``jobs`` at a time (the graph first: it is short)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_graph, phase)] if with_graph else []
        futures += [pool.submit(_run_check, case, phase) for case in cases]
        for f in futures:
            f.result()


def run_timings(groups: Sequence[TimingGroup], report: Report, budget: Budget) -> List[str]:
    """The timing groups one at a time within ``budget``; returns what was skipped, with the reason."""
    state: Dict[str, Optional[float]] = {"peak_tflops": None}
    skipped: List[str] = []

    def run(group: TimingGroup, left: float) -> None:
        if group.what == "peak":
            task: Dict[str, Any] = {"task": "peak"}
        elif group.what == "tiles":
            task = {"task": "tiles", "shape": group.shape, "dtype": group.dtype, "batch": TIMING_BATCH}
        elif group.what in JAX_TIMING_WHAT:
            import gpu_check_jax as gj

            task = gj.timing_task(group, state["peak_tflops"])
        else:
            task = {"task": "timing", "what": group.what, "shape": group.shape, "dtype": group.dtype,
                    "batch": TIMING_BATCH, "peak_tflops": state["peak_tflops"]}
        result = run_worker(task, left)
        report.log_run(group.name, result)
        for r in result.records:
            if r["kind"] == "peak":
                state["peak_tflops"] = r["tflops"]
                report.log(f"measured bf16 matmul peak: {r['tflops']:.0f} TFLOP/s (8192³)")
            else:
                report.record(r)
        expected = {"peak": 1, "tiles": sum(map(len, tile_candidates().values()))}.get(group.what,
                                                                                     len(MODES["timing"]))
        if group.what in JAX_TIMING_WHAT:
            import gpu_check_jax as gj

            expected = gj.expected_records(group)
        if len(result.records) < expected:
            skipped.append(f"{group.name}: {len(result.records)} of {expected} record(s); {result.failure()}")

    skipped += run_in_budget(groups, budget, run)
    return skipped


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _driver() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _ptxas(arch: int) -> Dict[str, Any]:
    """The ptxas the triton backend assembles with on this GPU (kernels/triton/toolchain.py), or why none."""
    from mixer_fast.kernels.triton import toolchain

    try:
        chosen = toolchain.choose(arch)
    except Exception as e:  # noqa: BLE001 - ToolchainProblem, or a toolchain.py older/newer than this script
        return {"error": error_text(e)}
    return {"path": chosen.path, "version": chosen.version_text, "source": chosen.source, "why": chosen.why}


def env_record() -> Dict[str, Any]:
    """Where and with what the run happened (ptxas null on a CPU)."""
    import torch

    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (dirty)"
    gpu = torch.cuda.is_available()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        versions["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        versions["triton"] = None
    major, minor = torch.cuda.get_device_capability() if gpu else (0, 0)
    return {"kind": "env", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "gpu": torch.cuda.get_device_name() if gpu else None, "device_class": device_class(),
            "driver": _driver() if gpu else None, "versions": versions,
            "ptxas": _ptxas(major * 10 + minor) if gpu else None}


def check_name(record: Dict[str, Any]) -> str:
    return (("jax " if record["kind"] == "jax_check" else "")
            + f"{record['op']} {record['mode']} {record['shape']} {record['dtype']}")


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def ratio_text(ms: Dict[str, Any], numerator: str, denominator: str) -> str:
    """ms[numerator] / ms[denominator] to two decimals, or "-" where either was not timed."""
    a, b = ms.get(numerator), ms.get(denominator)
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"


def format_summary(records: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    """The short human summary: check counts, what failed, and a timing table with triton / reference."""
    checks = [r for r in records if r["kind"] in CHECK_KINDS]
    graph = next((r for r in records if r["kind"] == "graph"), None)
    lines = [f"checks: {len(checks) - len(summary['failed'])} of {len(checks)} passed"
             + (f"; faulted: {', '.join(summary['faulted'])}" if summary["faulted"] else "")]
    lines += [f"  FAILED {name}" for name in summary["failed"]]
    if graph is None:
        lines.append("graph: not run")
    else:
        lines.append("graph: " + ("ok" if graph["ok"] else f"FAILED, max diff {graph['max_diff']}: {graph['error']}"))
    timings = [r for r in records if r["kind"] == "timing"]
    if timings:
        lines.append(f"{'what':<15}{'shape':<11}{'dtype':<6}{'mode':<10}{'reference':>10}{'compile':>9}"
                     f"{'cublas':>9}{'triton':>9}{'ln fold':>9}{'+cuBLAS':>9}{'floor':>8}{'tri/ref':>8}")
        for r in timings:
            ms, ratio = r["ms"], ratio_text(r["ms"], "triton", "reference")
            what = r["block"] + " block" if r["op"] == "block" else r["op"]
            lines.append(f"{what:<15}{r['shape']:<11}{r['dtype']:<6}{r['mode']:<10}{_ms(ms.get('reference')):>10}"
                         f"{_ms(ms.get('compile')):>9}{_ms(ms.get('cublas')):>9}{_ms(ms.get('triton')):>9}"
                         f"{_ms(ms.get(FOLDED_PROVIDER)):>9}{_ms(ms.get(CUBLAS_PROVIDER)):>9}{_ms(r['floor_ms']):>8}"
                         f"{ratio:>8}")
            lines += [f"    {p} failed: {e.splitlines()[0][:150]}" for p, e in r.get("errors", {}).items()]
            if r.get("warm_up_error"):
                lines.append(f"    warm-up failed: {r['warm_up_error'].splitlines()[0][:150]}")
    if any(r["kind"] == "jax_timing" for r in records):
        import gpu_check_jax as gj

        lines += gj.format_records(records)
    for r in (r for r in records if r["kind"] == "tiles"):
        lines.append(f"tiles {r['shape']:<10} {r['kernel']:<14} {r['plan']:<40} {r['mode']:<9} {_ms(r['ms']):>8}"
                     + (f"  failed: {r['error'].splitlines()[0][:100]}" if r["error"] else ""))
    lines += [f"skipped: {s.splitlines()[0]}" for s in summary["skipped"]]
    lines.append(f"{summary['seconds']:.0f} s (ms: median of do_bench; tri/ref < 1: triton faster)")
    return "\n".join(lines)


def _selected(items: Iterable[Any], only: Optional[str]) -> List[Any]:
    """The cases or groups whose name matches ``only`` (all without it)."""
    pattern = re.compile(only) if only else None
    return [item for item in items if pattern is None or pattern.search(item.name)]


def timing_groups(only: Optional[str], jax: bool = False, torch: bool = True) -> List[TimingGroup]:
    """The timing groups ``only`` selects, torch's (TIMING_GROUPS) and with ``jax`` the JAX ones
    (gpu_check_jax.JAX_TIMING_GROUPS) after them, with the peak measurement in front when any is (floors
    need it)."""
    groups = [g for g in TIMING_GROUPS if g.what != "peak"] if torch else []
    if jax:
        import gpu_check_jax as gj

        groups += gj.JAX_TIMING_GROUPS
    chosen = _selected(groups, only)
    return [g for g in TIMING_GROUPS if g.what == "peak"] + chosen if chosen else []


def run_jax_checks(opts: argparse.Namespace, phase: CheckPhase) -> None:
    """``--parts jax``'s correctness processes (bench/gpu_check_jax.py), ``--jobs`` at once."""
    import gpu_check_jax as gj

    cases = _selected(gj.jax_cases(opts.quick), opts.only)
    phase.report.log(f"{len(cases)} JAX correctness process(es), {opts.jobs} at a time")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for f in [pool.submit(gj.run_jax_check, case, phase) for case in cases]:
            f.result()


def check_stage(opts: argparse.Namespace) -> int:
    """The ``check`` command; returns the exit status."""
    import torch

    started = time.monotonic()
    gpu = torch.cuda.is_available()
    if not gpu and not opts.quick:
        print("check: no CUDA device here; `--quick` runs the harness in Triton's interpreter", file=sys.stderr)
        return 2
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    total = Budget(opts.budget)
    report = Report(out)
    report.record(env_record())
    parts = opts.parts
    phase = CheckPhase(report, Budget(min(opts.check_budget, opts.budget)), total, opts.max_sanitize)
    why_not = "no CUDA device" if not gpu else "--quick" if opts.quick else None
    if why_not:
        phase.skipped += [f"{part}: {why_not}" for part in ("graph", "timings", "tiles") if part in parts]
        phase.skipped += [f"jax timings: {why_not}"] if "jax" in parts else []
    cases = _selected(check_cases(opts.quick), opts.only) if "checks" in parts else []
    report.log(f"{len(cases)} correctness process(es), {opts.jobs} at a time, none started after "
               f"{phase.checks_budget.left():.0f} s; {opts.budget:.0f} s in all")
    run_checks(cases, "graph" in parts and not why_not, opts.jobs, phase)
    if "jax" in parts:
        run_jax_checks(opts, phase)
    skipped = phase.skipped
    if ("timings" in parts or "jax" in parts) and not why_not:
        groups = timing_groups(opts.only, jax="jax" in parts, torch="timings" in parts)
        skipped += run_timings(groups, report, total)
    if "tiles" in parts and not why_not:
        skipped += run_timings(_selected(TILE_GROUPS, opts.only), report, total)
    summary = {"kind": "summary", "checks": sum(r["kind"] in CHECK_KINDS for r in report.records),
               "failed": [check_name(r) for r in report.records if r["kind"] in CHECK_KINDS and not r["ok"]],
               "faulted": sorted(phase.faulted),
               "timings": sum(r["kind"] in TIMING_KINDS for r in report.records),
               "skipped": skipped, "seconds": round(time.monotonic() - started, 1)}
    report.record(summary)
    report.close()
    print(format_summary(report.records, summary))
    graph_failed = any(r["kind"] == "graph" and not r["ok"] for r in report.records)
    return 1 if summary["failed"] or summary["faulted"] or graph_failed else 0


# ---------------------------------------------------------------------------------------------------------
# The ``tests`` command.

TRITON_TEST_FILES = ("test_token_mixing.py", "test_channel_mixing.py", "test_gmlp.py", "test_residual.py",
                     "test_matmul.py", "test_blocks.py", "test_large_tensors.py", "test_determinism.py",
                     "test_compile.py", "test_jax_triton.py")


def gpu_test_files(tests_dir: Path = ROOT / "tests") -> List[str]:
    """The triton test files that exist, then any other test file with gpu-marked tests (whole files: the
    mark is rare, and the rest of such a file is cheap), as paths relative to the repository root."""
    files = [tests_dir / name for name in TRITON_TEST_FILES if (tests_dir / name).exists()]
    files += [p for p in sorted(tests_dir.glob("test_*.py"))
              if p not in files and "mark.gpu" in p.read_text(encoding="utf-8")]
    return [str(p.relative_to(tests_dir.parent)) for p in files]


def pytest_command(files: Sequence[str], jobs: int, xdist: bool, timeout_plugin: bool) -> List[str]:
    """pytest, verbose (a run cut short still names every test that failed so far), in parallel with xdist."""
    cmd = [sys.executable, "-m", "pytest", *files, "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider",
           "--durations=20"]
    if xdist and jobs > 1:
        cmd += ["-n", str(jobs)]
    if timeout_plugin:
        cmd += ["--timeout", "240"]  # one hung test must not take the whole budget
    return cmd


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def tests_stage(opts: argparse.Namespace) -> int:
    """The ``tests`` command: pytest within ``--budget`` seconds, then SIGINT (pytest then prints its
    summary); output in DIR/tests.log. Returns pytest's exit status."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = pytest_command(gpu_test_files(), opts.jobs, _importable("xdist"), _importable("pytest_timeout"))
    # torch and JAX share the GPU in test_jax_triton.py: no JAX preallocation of 75% of its memory.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    with open(out / "tests.log", "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=opts.budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=INTERRUPT_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    text = (out / "tests.log").read_text(encoding="utf-8", errors="replace").splitlines()
    print("\n".join([line[:220] for line in text if re.match(r"(FAILED|ERROR) ", line)][:60] + text[-3:]))
    return rc


# ---------------------------------------------------------------------------------------------------------

PARTS = ("checks", "graph", "timings", "tiles", "jax")
DEFAULT_PARTS = ("checks", "graph", "timings")


def _parts(text: str) -> set:
    parts = set(text.split(","))
    if not parts <= set(PARTS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return parts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="correctness, CUDA graph and timings (one device call, <= 4 min)")
    check.add_argument("--out", required=True, help="folder for check.jsonl, check.log, sanitizer.txt")
    check.add_argument("--quick", action="store_true", help="tiny shapes, a few cases, no graph or timings")
    check.add_argument("--jobs", type=int, default=6, help="correctness processes at once")
    check.add_argument("--budget", type=float, default=225, help="seconds for the whole command")
    check.add_argument("--check-budget", type=float, default=150,
                       help="seconds after which no correctness process starts")
    check.add_argument("--max-sanitize", type=int, default=4, help="compute-sanitizer reruns at most")
    check.add_argument("--parts", type=_parts, default=set(DEFAULT_PARTS), help="comma-separated subset of "
                       + ",".join(PARTS) + " (default " + ",".join(DEFAULT_PARTS) + ")")
    check.add_argument("--only", help="regex on case names ('token_mixing mixer_b16 bf16', 'timing block "
                                      "gmlp_s16 bf16', 'timing peak')")
    tests = sub.add_parser("tests", help="the triton and gpu-marked tests with pytest-xdist (<= 5 min)")
    tests.add_argument("--out", required=True, help="folder for tests.log")
    tests.add_argument("--jobs", type=int, default=12, help="pytest-xdist workers")
    tests.add_argument("--budget", type=float, default=260, help="seconds before pytest gets SIGINT")
    worker = sub.add_parser("worker", help="internal: one case, in its own process")
    worker.add_argument("task", help="the task as JSON")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv)
    if opts.command == "worker":
        status = worker_main(json.loads(opts.task))
        sys.stdout.flush()
        sys.stderr.flush()
        # After a CUDA fault, interpreter teardown can hang or abort in CUDA's destructors: leave at once.
        os._exit(status)
    return check_stage(opts) if opts.command == "check" else tests_stage(opts)


if __name__ == "__main__":
    sys.modules.setdefault("gpu_check", sys.modules["__main__"])  # one module for gpu_check_jax's import
    sys.exit(main())
