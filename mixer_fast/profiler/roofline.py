"""Roofline: the device's measured ceilings, token vs channel mixing as points under them.

Ceilings are measured here, not looked up: the matmul rate of the dtype (best of square GEMMs and the
op's own channel GEMM shape, so no op can beat it) and the copy bandwidth (a large ``copy_``). Each
op is timed per backend; its point is (FLOP/byte, achieved FLOP/s) with the bytes the backend moves
(mixer_fast.profiler.cost: ``unfused`` for the eager reference, ``fused`` for mixer_fast's kernels),
labelled with its share of the attainable bound min(peak, intensity × bandwidth).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from .cost import Shape, cost

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Ceilings:
    device: str
    dtype: str
    matmul_flops: float  # FLOP/s
    copy_bytes: float  # bytes/s

    def bound(self, intensity: float) -> float:
        return min(self.matmul_flops, intensity * self.copy_bytes)


@dataclass
class Point:
    op: str
    backend: str
    seconds: float
    flops: float
    bytes: float
    intensity: float
    achieved: float  # FLOP/s
    fraction_of_bound: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """The best of ``repeats`` wall times of fn(), synchronised, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_ceilings(device: torch.device, dtype: str, gemm_shapes: List[tuple]) -> Ceilings:
    """Matmul rate (best over square sizes and ``gemm_shapes`` (M, N, K)) and copy bandwidth."""
    dt = DTYPES[dtype]
    gpu = device.type == "cuda"
    shapes = [(n, n, n) for n in ((4096, 8192) if gpu else (1024, 2048))] + list(gemm_shapes)
    rate = 0.0
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device).to(dt)
        b = torch.randn(k, n, device=device).to(dt)
        rate = max(rate, 2 * m * n * k / best_time(lambda: torch.matmul(a, b), device, repeats=3))
    nbytes = (1 << 30) if gpu else (1 << 27)  # far beyond the last-level cache: 1 GiB on a GPU, 128 MiB on a CPU
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), device, repeats=5)
    name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    return Ceilings(name, dtype, rate, bw)


def measure(config: str, batch: int, dtype: str, backends: List[str], device: torch.device,
            mode: str = "fwd") -> Dict[str, object]:
    """Ceilings and one point per (op, backend) for the named config; mode "fwd" (no grad)."""
    from .. import ops
    from ..reference import get_config

    if mode != "fwd":
        raise ValueError(f"mode: only 'fwd' is measured by the roofline, got {mode!r}")
    c = get_config(config)
    shape = Shape.from_config(config, batch)
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)

    def r(*s, std=1.0):
        return (torch.randn(*s, generator=gen) * std).to(device, dt)

    S, C = shape.seq_len, shape.dim
    x = r(batch, S, C)
    nw, nb = 1 + r(C, std=0.1), r(C, std=0.1)
    if c.kind == "mixer":
        D = shape.tokens_dim
        tok_args = (x, nw, nb, r(D, S, std=S ** -0.5), r(D), r(S, D, std=D ** -0.5), r(S))
        tok_kw = {}
    else:
        tok_args = (x, nw, nb, r(S, S, std=S ** -0.5), r(S), None, None)
        tok_kw = dict(norm="affine", scale=r(C))
    DC = shape.channels_dim
    ch_args = (x, nw, nb, r(DC, C, std=C ** -0.5), r(DC), r(C, DC, std=DC ** -0.5), r(C))
    ch_kw = {} if c.kind == "mixer" else dict(norm="affine", scale=r(C))
    # Every GEMM shape the ops run, so that no op can outrun the measured matmul ceiling.
    gemms = [(batch * S, DC, C), (batch * S, C, DC)]
    gemms += [(shape.tokens_dim, C, S), (S, C, shape.tokens_dim)] if c.kind == "mixer" else [(S, C, S)]
    ceilings = measure_ceilings(device, dtype, gemms)
    points = []
    with torch.no_grad():
        for backend in backends:
            for op, fn, args, kw in (("token_mixing", ops.token_mixing, tok_args, tok_kw),
                                     ("channel_mixing", ops.channel_mixing, ch_args, ch_kw)):
                seconds = best_time(lambda: fn(*args, **kw, backend=backend), device)
                k = cost(op, shape, dtype, mode)
                nbytes = k.unfused_bytes if backend == "reference" else k.fused_bytes
                intensity = k.flops / nbytes
                achieved = k.flops / seconds
                points.append(Point(op, backend, seconds, k.flops, nbytes, intensity, achieved,
                                    achieved / ceilings.bound(intensity)))
    return {"config": config, "batch": batch, "dtype": dtype, "mode": mode,
            "ceilings": asdict(ceilings), "points": [asdict(p) for p in points]}


def plot(result: Dict[str, object], out: str) -> None:
    """A log-log roofline PNG of ``result`` (from :func:`measure`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceil = Ceilings(**result["ceilings"])
    points = [Point(**p) for p in result["points"]]
    xs = [p.intensity for p in points]
    lo, hi = min(xs + [1.0]) / 4, max(xs + [ceil.matmul_flops / ceil.copy_bytes]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.loglog(grid, [ceil.bound(i) / 1e12 for i in grid], color="black", lw=2,
              label=f"ceiling: {ceil.matmul_flops / 1e12:.3g} TFLOP/s, {ceil.copy_bytes / 1e9:.3g} GB/s")
    markers = {"token_mixing": "o", "channel_mixing": "s"}
    for p in points:
        ax.loglog(p.intensity, p.achieved / 1e12, markers[p.op], ms=9, label=f"{p.op} [{p.backend}]")
        ax.annotate(f"{100 * p.fraction_of_bound:.0f}%", (p.intensity, p.achieved / 1e12),
                    textcoords="offset points", xytext=(6, -12))
    ax.set_xlabel("arithmetic intensity (FLOP / byte of memory traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"{result['config']} batch {result['batch']} {result['dtype']} {result['mode']} — {ceil.device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def table(result: Dict[str, object]) -> str:
    ceil = result["ceilings"]
    lines = [f"ceilings on {ceil['device']} ({ceil['dtype']}): matmul {ceil['matmul_flops'] / 1e12:.3f} TFLOP/s, "
             f"copy {ceil['copy_bytes'] / 1e9:.1f} GB/s",
             f"{'op':<16} {'backend':<10} {'ms':>9} {'GFLOP':>8} {'MB':>9} {'FLOP/B':>8} {'TFLOP/s':>8} {'% bound':>8}"]
    for p in result["points"]:
        lines.append(f"{p['op']:<16} {p['backend']:<10} {p['seconds'] * 1e3:>9.3f} {p['flops'] / 1e9:>8.2f} "
                     f"{p['bytes'] / 1e6:>9.1f} {p['intensity']:>8.1f} {p['achieved'] / 1e12:>8.3f} "
                     f"{100 * p['fraction_of_bound']:>7.0f}%")
    return "\n".join(lines)


def save_json(result: Dict[str, object], path: str, extra: Optional[Dict[str, object]] = None) -> None:
    with open(path, "w") as f:
        json.dump(dict(result, **(extra or {})), f, indent=1)
