"""ResMLP inference folding (issue 8, item 3), as benchmarks (`pytest bench/test_fold.py --benchmark-only`).

Forward under ``torch.no_grad`` of the ResMLP-12 block (batch 8 and 1) and of the whole ResMLP-12 model
(batch 4), fp32 on CPU, on 2 threads and on 1 (on a shared 2-core machine the 1-thread figures are the
steadier ones): the unfolded block against ``fold_for_inference`` of it, each on the eager reference
backend and on the C++ ``cpu`` backend. Parameters are drawn off their init so the folded
and unfolded blocks do the same work on realistic values (checked equal before timing). As in
bench/test_cpu.py each provider's rounds run back to back, and ratios are read within one run
(`--benchmark-group-by=group`), minima only.

Providers: ``eager`` (mixer_fast.reference blocks: timm's forward), ``eager-folded`` (folded, on
``reference``), ``cpu`` (mixer_fast.ResMLPBlock on the cpu backend), ``cpu-folded``.

``test_fold_paired`` alternates unfolded and folded calls (block, model) in one loop and records, in
``extra_info``, each one's minimum and the median per-pair ratio: on a machine shared with other jobs the
load drifts over seconds, which back-to-back rounds of one provider then another turn into bias.
"""
from __future__ import annotations

import pytest
import torch

from conftest import GPU, device_name, skip_reason, versions
from mixer_fast import reference as ref
from mixer_fast.profiler.cost import Shape, cost

CONFIG = "resmlp_12"
CASES = [(what, batch, threads) for what, batch in (("block", 8), ("block", 1), ("model", 4)) for threads in (2, 1)]
PROVIDERS = ["eager", "eager-folded", "cpu", "cpu-folded"]
ROUNDS = {"block": 20, "model": 8}


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            r = torch.randn(p.shape, generator=gen)
            p.copy_(r / p[0].numel() ** 0.5 if p.ndim >= 2 else 1.0 + 0.1 * r)
    return module


def _module(what: str, provider: str) -> torch.nn.Module:
    import mixer_fast
    from mixer_fast.torch.fold import fold_for_inference

    c = ref.get_config(CONFIG)
    m = ref.ResMLPBlock(c.embed_dim, c.seq_len) if what == "block" else ref.create_model(CONFIG)
    m = _randomise(m).eval()
    backend = "cpu" if provider.startswith("cpu") else "reference"
    if provider.endswith("folded"):
        return fold_for_inference(m, backend=backend, inplace=True)
    return mixer_fast.convert(m, backend="cpu", strict=True) if backend == "cpu" else m


def _input(what: str, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if what == "model":
        return torch.randn(batch, 3, 224, 224, generator=gen)
    shape = Shape.from_config(CONFIG, batch)
    return torch.randn(batch, shape.seq_len, shape.dim, generator=gen)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("what,batch,threads", CASES, ids=[f"{w}-b{b}-t{t}" for w, b, t in CASES])
def test_fold(benchmark, what, batch, threads, provider):
    if GPU:
        pytest.skip("fold: benchmarked on CPU-only machines")
    if provider.startswith("cpu"):
        reason = skip_reason("cpu", CONFIG)
        if reason:
            pytest.skip(reason)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        module = _module(what, provider)
        x = _input(what, batch)
        with torch.no_grad():
            got = module(x)
            want = _module(what, "eager")(x)
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) <= 1e-4 * scale, "folded and unfolded outputs differ"
            benchmark.group = f"fold {CONFIG} {what} b{batch} fp32 {threads} threads"
            benchmark.pedantic(module, args=(x,), rounds=ROUNDS[what], warmup_rounds=2)
    finally:
        torch.set_num_threads(before)
    seconds = benchmark.stats.stats.min
    flops = cost("block", Shape.from_config(CONFIG, batch), "fp32", "fwd").flops
    if what == "model":
        flops *= ref.get_config(CONFIG).num_blocks
    benchmark.extra_info.update(op=what, config=CONFIG, batch=batch, dtype="fp32", mode="fwd", provider=provider,
                                threads=threads, device=device_name(), block_flops=flops,
                                tflops=flops / seconds / 1e12, versions=versions())


PAIRED = [("block", 8, 50), ("block", 1, 300), ("model", 4, 12)]  # (what, batch, pairs)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("what,batch,pairs", PAIRED, ids=[f"{w}-b{b}" for w, b, _ in PAIRED])
def test_fold_paired(benchmark, what, batch, pairs, threads, backend):
    """Unfolded and folded calls alternated (order swapped every pair), for a ratio that load drifting over
    seconds on a shared machine cannot bias. The benchmark times one pair; extra_info holds each one's
    minimum and the median of the per-pair ratios unfolded / folded."""
    import statistics
    import time

    if GPU:
        pytest.skip("fold: benchmarked on CPU-only machines")
    if backend == "cpu":
        reason = skip_reason("cpu", CONFIG)
        if reason:
            pytest.skip(reason)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = {"unfolded": [], "folded": []}
    try:
        torch.manual_seed(0)
        mods = {"unfolded": _module(what, backend), "folded": _module(what, f"{backend}-folded")}
        x = _input(what, batch)
        state = {"i": 0}

        def pair():
            state["i"] += 1
            for key in (("unfolded", "folded") if state["i"] % 2 else ("folded", "unfolded")):
                t = time.perf_counter()
                mods[key](x)
                times[key].append(time.perf_counter() - t)

        benchmark.group = f"fold paired {CONFIG} {what} b{batch} fp32 {threads} threads"
        with torch.no_grad():
            benchmark.pedantic(pair, rounds=pairs, warmup_rounds=2)
    finally:
        torch.set_num_threads(before)
    a, b = times["unfolded"][2:], times["folded"][2:]
    ratios = [u / f for u, f in zip(a, b)]
    benchmark.extra_info.update(op=what, config=CONFIG, batch=batch, dtype="fp32", provider=backend, threads=threads,
                                pairs=len(a), unfolded_min_ms=min(a) * 1e3, folded_min_ms=min(b) * 1e3,
                                ratio_of_minima=min(a) / min(b), median_pair_ratio=statistics.median(ratios),
                                device=device_name(), versions=versions())
