"""The JAX part of bench/gpu_check.py (``check --parts jax``): the JAX triton backend through jax-triton.

Issue 18 asks for the JAX ops and the Flax MixerBlock at Mixer-B/16, batch 256, bf16, within the numerics
rule and timed next to XLA and the torch triton block in one call. This module holds the JAX workers and
their cases; gpu_check.py runs them as it runs its own (one process each, records in check.jsonl):

1. Correctness (JAX_CASES, each in its own process, ``MIXER_FAST_AUTOTUNE=none`` as for the torch checks):
   token and channel mixing at every SHAPES shape in bf16, Mixer-B/16 in fp16 and fp32 too, and the Flax
   MixerBlock at Mixer-B/16 in bf16, each forward and backward (the vjp of a fixed random cotangent,
   w.r.t. x and every parameter). The rule is tests/tolerances.py's: max|fused − ref| ≤ 2·max|eager − ref| +
   atol·max(1, max|ref|), ref being XLA in fp32 at ``precision="highest"`` (JAX runs without x64) and eager
   XLA in the case's dtype at JAX's default precision (what a JAX user runs: TF32 for fp32 matmuls on a GPU).
2. Timings (JAX_TIMING_GROUPS, batch 256, Mixer-B/16, bf16; after gpu_check's "peak" group when selected):
   token mixing, channel mixing and the Flax block, forward and training (a jitted vjp), providers
   ``xla`` and ``jax-triton``. A second group times channel mixing with the integer arguments of the fused
   GEMM passed as they are (``matmul.scaled16`` off): jax-triton gives them no divisibility hints, and
   issue 18 asks what that costs. The torch triton block to compare with is gpu_check's "timing block
   mixer_b16 bf16" group: select both, e.g. ``--parts jax,timings --only 'jax|block mixer_b16|peak'``.

Records (one JSON object a line, beside gpu_check's):

    {"kind": "jax_check", "op": "token_mixing" | "channel_mixing" | "block", "mode": "forward" | "backward",
     "dtype", "shape", "batch", "ok", "errors": {name: [max_err, bound]}, "error": str | null}
    {"kind": "jax_timing", "op", "block": "mixer" | null, "shape", "batch", "mode": "forward" | "training",
     "dtype", "device_class", "hints": bool, "ms": {provider: ms}, "errors": {provider: str} (only when one
     failed), "floor_ms"}

Timings are wall-clock medians of rounds of calls ended by ``block_until_ready`` (XLA dispatches
asynchronously: a round measures what a training loop sees). The JAX kernels' GEMM configs come from the
shipped table (mixer_fast/tuned_gemm.json) where it has the GPU's entries, else jax-triton autotunes them on
the first call, outside the timed rounds but inside the group's budget: run the tuning call first.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import gpu_check as gc

JAX_OPS = ("token_mixing", "channel_mixing")
JAX_CASES = ([(op, shape, "bf16") for shape in ("mixer_b16", "resmlp_24", "awkward") for op in JAX_OPS]
             + [(op, "mixer_b16", dtype) for dtype in ("fp16", "fp32") for op in JAX_OPS]
             + [("block", "mixer_b16", "bf16")])
# --quick (Triton's interpreter through jax.pure_callback on a CPU): one op of each kind, and the block.
JAX_QUICK_CASES = (("token_mixing", "awkward", "bf16"), ("channel_mixing", "resmlp_24", "fp32"),
                   ("block", "mixer_b16", "bf16"))
# Estimates (not measured: written without a GPU; check.log records each group's time): ~10 s to start a
# process and import JAX; ~1-2 s per jax-triton compile, ~25 kernels for both ops and the block in two modes.
JAX_TIMING_GROUPS = (gc.TimingGroup("jax", "mixer_b16", "bf16", 70),
                     gc.TimingGroup("jax_no_hints", "mixer_b16", "bf16", 40))
JAX_ENV = {"MIXER_FAST_AUTOTUNE": "none", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
ROUND_S = 0.1  # s of calls in one timing round
ROUNDS = 7


@dataclass(frozen=True)
class JaxCase:
    """One correctness process: ``op`` ("token_mixing", "channel_mixing" or "block") at ``shape``."""

    op: str
    shape: str
    dtype: str
    batch: int
    quick: bool = False

    @property
    def name(self) -> str:
        return f"jax {self.op} {self.shape} {self.dtype}"

    def task(self) -> Dict[str, Any]:
        return {"task": "jax_check", **asdict(self)}


def jax_cases(quick: bool) -> List[JaxCase]:
    if quick:
        return [JaxCase(op, shape, dtype, gc.QUICK_BATCH, quick=True) for op, shape, dtype in JAX_QUICK_CASES]
    return [JaxCase(op, shape, dtype, gc.CHECK_BATCH[shape]) for op, shape, dtype in JAX_CASES]


def check_record(case: Dict[str, Any], mode: str, errors=None, problems=(), error: Optional[str] = None
                 ) -> Dict[str, Any]:
    """A "jax_check" record; ``errors`` and ``problems`` as gpu_check._compare returns them."""
    errors = errors or {}
    error = error or "; ".join(problems) or None
    ok = error is None and all(err <= lim for err, lim in errors.values())
    return {"kind": "jax_check", "op": case["op"], "mode": mode, "dtype": case["dtype"], "shape": case["shape"],
            "batch": case["batch"], "ok": ok, "errors": errors, "error": error}


# ---------------------------------------------------------------------------------------------------------
# Worker side.

# Why this worker process cannot run its task (set by setup_worker), or None.
_unavailable: Optional[str] = None


def setup_worker() -> None:
    """JAX's triton backend loaded as on a GPU, or in Triton's interpreter without one (chosen before triton
    is imported); tests/ first on sys.path (tolerances, jax_cases). Not the torch backend: its ptxas choice
    is not the JAX one's (kernels/triton/toolchain.choose_for_jax). A backend that refuses to load is not a
    kernel's failure: the worker's records then say "not run" and why."""
    global _unavailable
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # processes share the GPU
    import jax

    if jax.default_backend() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(gc.ROOT / "tests"))
    from mixer_fast import dispatch

    try:
        dispatch.load("triton", framework="jax")
    except dispatch.BackendUnavailable as e:
        _unavailable = f"not run: the JAX triton backend did not load: {e}"


def not_run_reason(quick: bool) -> Optional[str]:
    """Why the JAX kernels cannot be run here ("not run: ..."), or None: the backend did not load, or (outside
    --quick) JAX has no GPU, so full-size cases would crawl through the interpreter."""
    import jax

    if _unavailable:
        return _unavailable
    if not quick and jax.default_backend() != "gpu":
        return f"not run: JAX has no GPU in this process (its default backend is {jax.default_backend()!r})"
    return None


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[name]


def _problem(dims: gc.Dims, op: str, batch: int, dtype) -> Tuple[Callable[..., Any], Any]:
    """(f(leaves, backend) → (B, S, C), the differentiated leaves in ``dtype``): the op's arguments from the
    tests' maker, or the Flax block's parameters and x."""
    import jax
    import jax.numpy as jnp

    from mixer_fast import jax as mfj

    if op == "block":
        import mixer_fast.flax as mff

        def block(backend):
            return mff.MixerBlock(dims.token_hidden, dims.channel_hidden,
                                  approximate_gelu=dims.approximate == "tanh", backend=backend)

        x = jax.random.normal(jax.random.PRNGKey(0), (batch, dims.seq_len, dims.dim), jnp.float32)
        params = block("xla").init(jax.random.PRNGKey(1), x)
        leaves = jax.tree_util.tree_map(lambda a: a.astype(dtype), {"params": params, "x": x})
        return lambda v, backend: block(backend).apply(v["params"], v["x"]), leaves
    from jax_cases import args_for, sample_scales

    variant = "resmlp" if dims.family == "resmlp" else "mixer"
    hidden = dims.token_hidden if op == "token_mixing" else dims.channel_hidden
    args, kw = args_for(op.split("_")[0], batch, dims.seq_len, dims.dim, hidden, dtype, variant, seed=3)
    if dims.drop_path:  # the awkward shape with drop path, as the torch checks run it
        kw["sample_scale"] = sample_scales(batch, dtype)
    names = ("x", "norm_weight", "norm_bias", "fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")
    leaves = {n: a for n, a in zip(names, args) if a is not None}
    if "scale" in kw:
        leaves["scale"] = kw["scale"]
    constant = {k: v for k, v in kw.items() if k != "scale"}  # the norm's name, the per-sample factors
    fn = mfj.token_mixing if op == "token_mixing" else mfj.channel_mixing

    def call(v, backend):
        return fn(*(v.get(n) for n in names), scale=v.get("scale"), approximate=dims.approximate,
                  backend=backend, **{k: c.astype(v["x"].dtype) if hasattr(c, "astype") else c
                                      for k, c in constant.items()})

    return call, leaves


def _named(tree) -> Dict[str, Any]:
    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _as_torch(a):
    """A JAX array as a CPU torch tensor of the same dtype (through fp32, which holds every fp16/bf16 value)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(a, dtype=np.float32)).to(getattr(torch, a.dtype.name))


def jax_check_worker(op: str, shape: str, dtype: str, batch: int, quick: bool) -> bool:
    """Forward then backward of ``op`` on JAX's triton backend against XLA (fp32 ``highest``, and the case's
    dtype at default precision); emits one record per mode. Returns whether a CUDA fault was caught."""
    import jax
    import jax.numpy as jnp

    case = {"op": op, "shape": shape, "dtype": dtype, "batch": batch}
    reason = not_run_reason(quick)
    if reason:
        for mode in gc.MODES["check"]:
            gc.emit(check_record(case, mode, error=reason))
        return False
    dims, dt = (gc.QUICK_SHAPES if quick else gc.SHAPES)[shape], _dtype(dtype)

    def forward(backend):
        return jax.jit(lambda v: call(v, backend))

    def backward(backend):
        return jax.jit(lambda v, g: jax.vjp(lambda w: call(w, backend), v)[1](g.astype(v["x"].dtype))[0])

    try:  # the references: a failure here says nothing about the kernels
        call, leaves = _problem(dims, op, batch, dt)
        # one cotangent for all three, rounded to the case's dtype as the fused and eager runs see it
        dout = jax.random.normal(jax.random.PRNGKey(2), leaves["x"].shape, jnp.float32).astype(dt)
        f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), leaves)
        with jax.default_matmul_precision("highest"):
            ref_out, ref_grads = forward("xla")(f32), _named(backward("xla")(f32, dout))
        eager_out, eager_grads = forward("xla")(leaves), _named(backward("xla")(leaves, dout))
    except Exception as e:  # noqa: BLE001 - recorded as not run, with the reason
        for mode in gc.MODES["check"]:
            gc.emit(check_record(case, mode, error=f"not run: the XLA reference failed: {gc.error_text(e)}"))
        return gc.is_device_fault(gc.error_text(e))
    def compare(pairs):  # the torch checks' comparison, on the arrays as torch tensors (the reference in fp64)
        return gc._compare({name: (_as_torch(fused), _as_torch(eager), _as_torch(ref).double())
                            for name, (fused, eager, ref) in pairs.items()}, gc._torch_dtype(dtype))

    mode = "forward"
    try:
        out = forward("triton")(leaves)
        gc.emit(check_record(case, mode, *compare({"out": (out, eager_out, ref_out)})))
        mode = "backward"
        grads = _named(backward("triton")(leaves, dout))
        gc.emit(check_record(case, mode, *compare({n: (grads[n], eager_grads[n], ref_grads[n]) for n in ref_grads})))
    except Exception as e:  # noqa: BLE001 - any failure of the fused op is the finding, recorded as such
        gc.emit(check_record(case, mode, error=gc.error_text(e)))
        if mode == "forward":
            gc.emit(check_record(case, "backward", error="not run: the forward failed"))
        return gc.is_device_fault(gc.error_text(e))
    return False


def measure(fn: Callable[[], Any], round_s: float = ROUND_S, rounds: int = ROUNDS) -> float:
    """Median ms per call of ``fn`` (returns JAX arrays): rounds of calls each ended by block_until_ready,
    after two calls that compile (and autotune) outside the timed rounds."""
    import jax

    jax.block_until_ready(fn())
    started = time.perf_counter()
    jax.block_until_ready(fn())
    calls = max(1, min(1000, int(round_s / max(time.perf_counter() - started, 1e-6))))
    per_call = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - started) / calls * 1e3)
    return statistics.median(per_call)


def jax_timing_worker(shape: str, dtype: str, batch: int, peak_tflops: Optional[float], hints: bool) -> bool:
    """Times XLA and jax-triton in both modes: token mixing, channel mixing and the Flax block, or (``hints``
    False: the fused GEMM's integers passed undivided, so without divisibility hints) channel mixing alone
    on jax-triton. Emits one record per op and mode; returns whether a CUDA fault was caught."""
    import jax

    from mixer_fast.kernels.triton import matmul

    from mixer_fast.jax.triton_backend import device_class

    if not hints:  # before anything compiles: every launch plan of this process passes its integers as they are
        matmul.scaled16 = lambda scalars: (list(scalars), 0)
    dims, dt = gc.SHAPES[shape], _dtype(dtype)
    providers = ("xla", "jax-triton") if hints else ("jax-triton",)
    reason = not_run_reason(quick=False)
    faulted_by = None
    for op in ("token_mixing", "channel_mixing", "block") if hints else ("channel_mixing",):
        call, leaves = _problem(dims, op, batch, dt)
        dout = jax.random.normal(jax.random.PRNGKey(2), leaves["x"].shape, dt)
        for mode in gc.MODES["timing"]:
            ms, errors = {}, {}
            for provider in providers:
                backend = "triton" if provider == "jax-triton" else provider
                if mode == "forward":
                    jitted = jax.jit(lambda v, b=backend: call(v, b))
                    fn = lambda j=jitted: j(leaves)  # noqa: E731
                else:
                    jitted = jax.jit(lambda v, g, b=backend: jax.vjp(lambda w: call(w, b), v)[1](g))
                    fn = lambda j=jitted: j(leaves, dout)  # noqa: E731
                if reason and (provider == "jax-triton" or jax.default_backend() != "gpu"):
                    errors[provider] = reason
                    continue
                if faulted_by is not None:
                    errors[provider] = f"not run: the CUDA context was lost when {faulted_by} faulted"
                    continue
                try:
                    ms[provider] = measure(fn)
                except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
                    errors[provider] = gc.error_text(e)
                    if gc.is_device_fault(errors[provider]):
                        faulted_by = f"{provider} {op} ({mode})"
            record = {"kind": "jax_timing", "op": op, "block": "mixer" if op == "block" else None, "shape": shape,
                      "batch": batch, "mode": mode, "dtype": dtype, "device_class": device_class(),
                      "hints": hints, "ms": ms, "floor_ms": gc.floor_ms(op, dims, batch, mode, peak_tflops)}
            if errors:
                record["errors"] = errors
            gc.emit(record)
    return faulted_by is not None


def expected_records(group: gc.TimingGroup) -> int:
    """How many records a JAX timing group's worker emits when it completes."""
    return 6 if group.what == "jax" else 2


# ---------------------------------------------------------------------------------------------------------
# Parent side.

def run_jax_check(case: JaxCase, phase: "gc.CheckPhase") -> None:
    """One JAX correctness process (no sanitizer rerun: compute-sanitizer and XLA's allocator are not
    known to get along; a fault is named in the records); writes the case's records."""
    def record_for(mode: str, error: str) -> Dict[str, Any]:
        return check_record(asdict(case), mode, error=error)

    if gc.not_started(case.name, phase, record_for):
        return
    run = gc.run_worker(case.task(), min(gc.CASE_TIMEOUT, phase.total.left()), JAX_ENV)
    phase.report.log_run(case.name, run)
    if run.faulted:
        with phase.lock:
            phase.faulted.append(case.name)
    for record in gc._complete(run, "jax_check", record_for):
        phase.report.record(record)


def timing_task(group: gc.TimingGroup, peak_tflops: Optional[float]) -> Dict[str, Any]:
    return {"task": "jax_timing", "shape": group.shape, "dtype": group.dtype, "batch": gc.TIMING_BATCH,
            "peak_tflops": peak_tflops, "hints": group.what == "jax"}


def format_records(records) -> List[str]:
    """Summary lines: failed JAX checks are listed with the torch ones; here the timing table."""
    lines = []
    timings = [r for r in records if r["kind"] == "jax_timing"]
    if timings:
        lines.append(f"{'jax':<15}{'shape':<11}{'dtype':<6}{'mode':<10}{'hints':<7}{'xla':>9}{'jax-tri':>9}"
                     f"{'floor':>8}{'xla/tri':>8}")
    for r in timings:
        ms, ratio = r["ms"], gc.ratio_text(r["ms"], "xla", "jax-triton")
        what = "mixer block" if r["op"] == "block" else r["op"]
        lines.append(f"{what:<15}{r['shape']:<11}{r['dtype']:<6}{r['mode']:<10}{'yes' if r['hints'] else 'no':<7}"
                     f"{gc._ms(ms.get('xla')):>9}{gc._ms(ms.get('jax-triton')):>9}{gc._ms(r['floor_ms']):>8}"
                     f"{ratio:>8}")
        lines += [f"    {p} failed: {e.splitlines()[0][:150]}" for p, e in r.get("errors", {}).items()]
    return lines
