"""The C++ ``cpu`` backend's speed targets (issue 6), as benchmarks (`pytest bench/test_cpu.py --benchmark-only`).

Block forward (inference, ``torch.no_grad``) of Mixer-B/16 and ResMLP-12 against eager PyTorch and
``torch.compile`` of the reference block: batch 8 in fp32 and bf16, batch 1 in fp32, and the cpu backend
on 1 and 2 threads. Each provider's rounds run back to back (not interleaved with another provider's):
PyTorch's OpenMP threads spin for a while after each eager op, and would otherwise slow whatever runs next
(measured: Mixer-B/16 batch 1 on the cpu backend 24 ms right after eager calls, 18.7 ms on its own).
Ratios are read within one run: `--benchmark-group-by=group` lines the providers up.
"""
from __future__ import annotations

import pytest
import torch

from conftest import GPU, device_class, device_name, make_block, skip_reason, versions
from mixer_fast.profiler.cost import Shape, cost

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [  # (config, batch, dtype, threads)
    *((c, 8, d, 2) for c in ("mixer_b16", "resmlp_12") for d in ("fp32", "bf16")),
    *((c, 1, "fp32", 2) for c in ("mixer_b16", "resmlp_12")),
    ("mixer_b16", 8, "fp32", 1),
]
PROVIDERS = ["eager", "compile", "cpu"]


def _block(config: str, provider: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    block = make_block(config, "eager" if provider == "compile" else provider).to(dtype).eval()
    return torch.compile(block) if provider == "compile" else block


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("config,batch,dtype,threads", CASES, ids=[f"{c}-b{b}-{d}-t{t}" for c, b, d, t in CASES])
def test_cpu_block(benchmark, config, batch, dtype, threads, provider):
    if GPU:
        pytest.skip("cpu: benchmarked on CPU-only machines")
    if threads == 1 and provider != "cpu":
        pytest.skip("the thread-scaling case times the cpu backend only")
    reason = skip_reason(provider, config)
    if reason:
        pytest.skip(reason)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        block = _block(config, provider, DTYPES[dtype])
        shape = Shape.from_config(config, batch)
        x = torch.randn(batch, shape.seq_len, shape.dim, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
        benchmark.group = f"cpu block {config} b{batch} {dtype} {threads} threads"
        with torch.no_grad():
            benchmark.pedantic(block, args=(x,), rounds=10, warmup_rounds=2)
    finally:
        torch.set_num_threads(before)
    c = cost("block", shape, dtype, "fwd")
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(op="block", config=config, batch=batch, dtype=dtype, mode="fwd", provider=provider,
                                threads=threads, device=device_name(), device_class=device_class(), flops=c.flops,
                                tflops=c.flops / seconds / 1e12, versions=versions())
