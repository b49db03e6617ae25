"""Shared machinery of the benchmark suites (`pytest bench/ --benchmark-only`).

Each benchmark is one (op, config, batch, dtype, mode, provider). Providers that cannot run here are
skipped with their reason, never silently. Timings synchronise the device inside the timed call and
rotate through several input copies, so caches hold no more than a real model would give them.
``extra_info`` records FLOPs and bytes (mixer_fast.profiler.cost), achieved TFLOP/s and GB/s, the
device and the versions. Groups are per op and shape, so ``--benchmark-compare`` lines providers up.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Callable, Dict, List, Tuple

import torch

if not torch.cuda.is_available():
    # The triton provider is skipped without CUDA, but the interpreter must still be chosen before
    # anything imports triton, or mixer_fast's own checks would fail to load the backend.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gpu_check import ENGINE_ENV  # noqa: E402
from mixer_fast import reference as ref  # noqa: E402
from mixer_fast.profiler.cost import Shape, cost  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[DTYPE]
CONFIGS = ["mixer_s16", "mixer_b16", "mixer_l16", "resmlp_12", "resmlp_24", "resmlp_big_24"]
# A 2-core CPU runs batches 1 and 4 (the whole suite then takes about 5 minutes there).
BATCHES = [64, 256] if GPU else [1, 4]
COMPILE_CONFIGS = CONFIGS
MODES = ["fwd", "bwd", "fwd+bwd"]
PROVIDERS = ["eager", "compile", "triton", "triton_cublas", "cpu", "xla", "pallas", "jax-triton"]
# The triton backend's providers and the engines each pins (kernels/triton/cublas_engine.py): the fused
# kernels, or every GEMM on cuBLAS with the Triton passes around it; the variables as gpu_check.py sets them.
TRITON_ENGINES = {"triton": ENGINE_ENV["fused"], "triton_cublas": ENGINE_ENV["cublas"]}
ROUNDS = 10 if GPU else 5
ROTATE = 4  # input copies cycled through


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "jax", "mixer_fast"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def device_name() -> str:
    return torch.cuda.get_device_name() if GPU else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def device_class() -> str:
    """The key the automatic choice's table of measured wins files this device under (mixer_fast/wins.py;
    bench/wins_table.py reads it from extra_info): the same one the backends look up at run time."""
    from mixer_fast import dispatch, wins

    if GPU:
        return wins.cuda_class(torch.cuda.get_device_capability())
    try:
        return dispatch.load("cpu").device_class()
    except dispatch.BackendUnavailable:  # no C++ extension: the class read from the CPU
        return wins.cpu_class()


def skip_reason(provider: str, config: str) -> str:
    """Why ``provider`` cannot run here ("" when it can)."""
    from mixer_fast import dispatch

    if provider in ("xla", "pallas", "jax-triton"):
        name = {"jax-triton": "triton"}.get(provider, provider)
        try:
            dispatch.load(name, "jax")
        except dispatch.BackendUnavailable as e:
            return f"JAX {provider}: {e}"
        import jax

        platform = jax.default_backend()
        if provider == "pallas" and platform != "tpu":
            return f"JAX pallas: no TPU here ({platform}); its interpret mode is for testing, not timing"
        if provider == "jax-triton" and platform != "gpu":
            return f"JAX triton: no GPU here ({platform})"
    if provider in TRITON_ENGINES:
        if not GPU:
            return f"{provider}: no CUDA device (its interpreter is for testing, not timing)"
        try:
            dispatch.load("triton")
        except dispatch.BackendUnavailable as e:
            return str(e)
    if provider == "cpu":
        if GPU:
            return "cpu: benchmarked on CPU-only machines"
        try:
            dispatch.load("cpu")
        except dispatch.BackendUnavailable as e:
            return str(e)
    if provider == "compile" and config not in COMPILE_CONFIGS:
        return f"compile: skipped for {config} here (compilation would make the run too long)"
    return ""


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def make_inputs(config: str, batch: int) -> Tuple[Shape, List[torch.Tensor]]:
    shape = Shape.from_config(config, batch)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, shape.seq_len, shape.dim, generator=gen).to(DEVICE, DTYPE) for _ in range(ROTATE)]
    return shape, xs


def make_block(config: str, provider: str) -> torch.nn.Module:
    """The block of ``config``: the plain reference (eager, compile) or mixer_fast's fused one."""
    import mixer_fast

    c = ref.get_config(config)
    if provider in ("eager", "compile"):
        cls = ref.MixerBlock if c.kind == "mixer" else ref.ResMLPBlock
        block = cls(c.embed_dim, c.seq_len)
    else:
        cls = mixer_fast.MixerBlock if c.kind == "mixer" else mixer_fast.ResMLPBlock
        block = cls(c.embed_dim, c.seq_len, backend="triton" if provider in TRITON_ENGINES else provider)
    return block.to(DEVICE, DTYPE)


def run_benchmark(benchmark, op: str, config: str, batch: int, mode: str, provider: str,
                  fn: Callable[[torch.Tensor], torch.Tensor], params: List[torch.Tensor]) -> None:
    """Time ``fn`` (x → output) in ``mode`` with pytest-benchmark and record the cost figures."""
    shape, xs = make_inputs(config, batch)
    state = {"i": 0}

    def next_x(requires_grad: bool) -> torch.Tensor:
        state["i"] = (state["i"] + 1) % ROTATE
        return xs[state["i"]].detach().requires_grad_(requires_grad)

    def zero_grads():
        for p in params:
            p.grad = None

    if mode == "fwd":
        def target():
            with torch.no_grad():
                fn(next_x(False))
            sync()
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=1)
    elif mode == "bwd":
        def setup():
            zero_grads()
            out = fn(next_x(True))
            sync()
            return (out, torch.ones_like(out)), {}

        def target(out, grad):
            out.backward(grad)
            sync()
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    else:
        def target():
            zero_grads()
            out = fn(next_x(True))
            out.backward(torch.ones_like(out))
            sync()
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=1)

    record(benchmark, op, config, batch, mode, provider)


def params_of(op: str, config: str, provider: str):
    """(function x → output, its parameters) of ``op`` built from the config's block."""
    block = make_block(config, provider)
    if op == "block":
        fn = block
    else:
        fn = _op_function(op, block, provider)
    if provider == "compile":
        fn = torch.compile(fn)
    return fn, list(block.parameters())


def _op_function(op: str, block: torch.nn.Module, provider: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from mixer_fast import ops

    backend = "reference" if provider in ("eager", "compile") else "triton" if provider in TRITON_ENGINES else provider
    resmlp = hasattr(block, "linear_tokens")
    if op == "token_mixing":
        if resmlp:
            return lambda x: ops.token_mixing(
                x, block.norm1.alpha.reshape(-1), block.norm1.beta.reshape(-1), block.linear_tokens.weight,
                block.linear_tokens.bias, None, None, norm="affine", scale=block.ls1, backend=backend)
        t = block.mlp_tokens
        return lambda x: ops.token_mixing(x, block.norm1.weight, block.norm1.bias, t.fc1.weight, t.fc1.bias,
                                          t.fc2.weight, t.fc2.bias, backend=backend)
    ch = block.mlp_channels
    if resmlp:
        return lambda x: ops.channel_mixing(
            x, block.norm2.alpha.reshape(-1), block.norm2.beta.reshape(-1), ch.fc1.weight, ch.fc1.bias,
            ch.fc2.weight, ch.fc2.bias, norm="affine", scale=block.ls2, backend=backend)
    return lambda x: ops.channel_mixing(x, block.norm2.weight, block.norm2.bias, ch.fc1.weight, ch.fc1.bias,
                                        ch.fc2.weight, ch.fc2.bias, backend=backend)


def bench_op(benchmark, op: str, config: str, batch: int, mode: str, provider: str) -> None:
    reason = skip_reason(provider, config)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{op} {config} b{batch} {DTYPE_NAME} {mode}"
    torch.manual_seed(0)
    if provider in ("xla", "pallas", "jax-triton"):
        from jax_bench import run_jax_benchmark

        run_jax_benchmark(benchmark, op, config, batch, mode, provider)
        return
    saved = {name: os.environ.get(name) for name in TRITON_ENGINES.get(provider, {})}
    os.environ.update(TRITON_ENGINES.get(provider, {}))  # the engines, for the whole run (backward included)
    try:
        fn, params = params_of(op, config, provider)
        run_benchmark(benchmark, op, config, batch, mode, provider, fn, params)
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def record(benchmark, op: str, config: str, batch: int, mode: str, provider: str) -> None:
    """Store the cost figures and achieved rates of a finished benchmark in its extra_info."""
    c = cost(op, Shape.from_config(config, batch), DTYPE_NAME, mode)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        op=op, config=config, batch=batch, dtype=DTYPE_NAME, mode=mode, provider=provider, device=device_name(),
        device_class=device_class(), flops=c.flops, min_bytes=c.min_bytes, unfused_bytes=c.unfused_bytes,
        fused_bytes=c.fused_bytes,
        tflops=c.flops / seconds / 1e12, gbs_min=c.min_bytes / seconds / 1e9, versions=versions(),
        **(triton_engines() if provider in TRITON_ENGINES else {}))


def triton_engines() -> dict:
    """The triton provider's engines in this process (bench/wins_table.py counts a timing only for the
    engines the backend ships with): GEMM engine, token engine, LayerNorm placement."""
    from mixer_fast.kernels.triton import matmul, token_mixing

    return dict(gemm_engine=matmul.gemm_engine(), token_engine=token_mixing.token_engine(),
                ln_placement=matmul.ln_placement())
