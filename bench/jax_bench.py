"""JAX providers of the benchmark suites (xla; pallas on a TPU; jax-triton on a GPU): the same ops and
blocks as the torch providers, jitted, timed with ``block_until_ready`` inside the timed call."""
from __future__ import annotations

import jax
import jax.numpy as jnp

import mixer_fast.flax as mff
from conftest import DTYPE_NAME, ROTATE, ROUNDS, record
from mixer_fast import jax as mfj
from mixer_fast.reference import get_config

_JNP = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def _function(op: str, config: str, provider: str, x):
    """(params, f(params, x) → output) for op in token_mixing / channel_mixing / block."""
    c = get_config(config)
    backend = {"jax-triton": "triton"}.get(provider, provider)
    if c.kind == "mixer":
        block = mff.MixerBlock(c.tokens_dim, c.channels_dim, approximate_gelu=False, backend=backend)
    else:
        block = mff.ResMLPBlock(c.channels_dim, init_values=c.init_values, backend=backend)
    params = block.init(jax.random.PRNGKey(0), x)
    dt = _JNP[DTYPE_NAME]
    params = jax.tree_util.tree_map(lambda a: a.astype(dt), params)
    if op == "block":
        return params, block.apply
    if c.kind == "mixer":
        ln, mlp = (("LayerNorm_0", "token_mixing") if op == "token_mixing" else ("LayerNorm_1", "channel_mixing"))
        fn = mfj.token_mixing if op == "token_mixing" else mfj.channel_mixing

        def f(params, x):
            q = params["params"]
            return fn(x, q[ln]["scale"], q[ln]["bias"], q[mlp]["Dense_0"]["kernel"], q[mlp]["Dense_0"]["bias"],
                      q[mlp]["Dense_1"]["kernel"], q[mlp]["Dense_1"]["bias"], approximate="none", backend=backend)
        return params, f
    if op == "token_mixing":
        def f(params, x):
            q = params["params"]
            return mfj.token_mixing(x, q["Affine_0"]["alpha"], q["Affine_0"]["beta"], q["linear_tokens"]["kernel"],
                                    q["linear_tokens"]["bias"], None, None, norm="affine", scale=q["ls1"],
                                    backend=backend)
        return params, f

    def g(params, x):
        q = params["params"]
        m = q["mlp_channels"]
        return mfj.channel_mixing(x, q["Affine_1"]["alpha"], q["Affine_1"]["beta"], m["Dense_0"]["kernel"],
                                  m["Dense_0"]["bias"], m["Dense_1"]["kernel"], m["Dense_1"]["bias"],
                                  approximate="none", norm="affine", scale=q["ls2"], backend=backend)
    return params, g


def run_jax_benchmark(benchmark, op: str, config: str, batch: int, mode: str, provider: str) -> None:
    c = get_config(config)
    keys = jax.random.split(jax.random.PRNGKey(1), ROTATE)
    xs = [jax.random.normal(k, (batch, c.seq_len, c.embed_dim)).astype(_JNP[DTYPE_NAME]) for k in keys]
    params, f = _function(op, config, provider, xs[0])
    state = {"i": 0}

    def next_x():
        state["i"] = (state["i"] + 1) % ROTATE
        return xs[state["i"]]

    if mode == "fwd":
        fwd = jax.jit(f)
        benchmark.pedantic(lambda: fwd(params, next_x()).block_until_ready(), rounds=ROUNDS, warmup_rounds=1)
    elif mode == "bwd":
        vjp_apply = jax.jit(lambda res, g: res(g))

        def setup():
            out, res = jax.vjp(f, params, next_x())
            out.block_until_ready()
            return (res, jnp.ones_like(out)), {}

        def target(res, g):
            jax.block_until_ready(vjp_apply(res, g))
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    else:
        step = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x).astype(jnp.float32)), argnums=(0, 1)))
        benchmark.pedantic(lambda: jax.block_until_ready(step(params, next_x())), rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, op, config, batch, mode, provider)
