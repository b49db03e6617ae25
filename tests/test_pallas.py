"""Pallas backend: interpret mode (plain and TPU semantics) against the jax.numpy reference, forward and
gradients, and the TPU lowering of whole blocks (forward and VJP) at the named configs' shapes."""
from __future__ import annotations

import pytest

from conftest import require

jax = require("jax")
jnp = require("jax.numpy")
pltpu = require("jax.experimental.pallas.tpu")

import mixer_fast.flax as mff  # noqa: E402
from mixer_fast.jax import pallas_backend  # noqa: E402
from mixer_fast.reference import get_config  # noqa: E402
from jax_cases import args_for as _args, check_against_xla, check_scale_grads  # noqa: E402

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 49, 256, 24, 384), (1, 16, 100, 30, 200), (3, 196, 128, 98, 256)],
                         ids=["49x256", "16x100", "196x128"])
@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
@pytest.mark.parametrize("op", ["token", "channel"])
def test_pallas_interpret_against_reference(op, variant, shape, dtype):
    B, S, C, DS, DC = shape
    args, kw = _args(op, B, S, C, DS if op == "token" else DC, dtype, variant)
    check_against_xla("pallas", op, args, kw, dtype, "tanh" if variant == "mixer" else "none")


def test_pallas_tpu_interpret_mode(monkeypatch):
    # TPU semantics in the interpreter: races detected, uninitialised memory NaN (would poison the output).
    monkeypatch.setattr(pallas_backend, "INTERPRET",
                        pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan"))
    for op in ("token", "channel"):
        args, kw = _args(op, 2, 16, 256, 128 if op == "channel" else 24, jnp.float32, "mixer", seed=5)
        check_against_xla("pallas", op, args, kw, jnp.float32, "none")


def test_flax_block_on_pallas_jit_grad_vmap():
    block, ref = mff.MixerBlock(24, 256, backend="pallas"), mff.MixerBlock(24, 256, backend="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 49, 128))
    params = block.init(jax.random.PRNGKey(1), x[0])
    got = jax.jit(jax.vmap(block.apply, in_axes=(None, 0)))(params, x)
    want = jax.vmap(ref.apply, in_axes=(None, 0))(params, x)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mixer_s16", "mixer_b16", "mixer_l16", "resmlp_12"])
def test_tpu_lowering_of_whole_block(name, dtype):
    # jax.export lowers for TPU on this CPU-only machine (no setting: the lowering platform picks Mosaic) and
    # fails on what Mosaic TPU rejects.
    c = get_config(name)
    block = (mff.MixerBlock(c.tokens_dim, c.channels_dim, backend="pallas") if c.kind == "mixer"
             else mff.ResMLPBlock(c.channels_dim, backend="pallas"))
    x = jax.ShapeDtypeStruct((2, c.seq_len, c.embed_dim), dtype)
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                                    jax.eval_shape(block.init, jax.random.PRNGKey(0), x))

    def fwd(p, x):
        return block.apply(p, x)

    def vjp(p, x):
        return jax.vjp(fwd, p, x)[1](jnp.ones(x.shape, x.dtype))

    for fn, kernels in ((fwd, 2), (vjp, 1)):
        module = jax.export.export(jax.jit(fn), platforms=["tpu"])(params, x).mlir_module()
        assert module.count("tpu_custom_call") >= kernels, fn.__name__


def test_one_function_runs_here_and_exports_mosaic_for_tpu():
    # The same jitted function: run on this CPU it interprets the kernels (and matches XLA); exported for TPU
    # from here, with nothing switched, its module holds Mosaic kernels (tpu_custom_call), forward and backward.
    assert pallas_backend.INTERPRET is True  # the default, untouched
    block, ref = mff.MixerBlock(24, 256, backend="pallas"), mff.MixerBlock(24, 256, backend="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 128))
    params = block.init(jax.random.PRNGKey(1), x)

    def loss(p, x):
        return jnp.sum(block.apply(p, x) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, grads = fn(params, x)
    want_value, want_grads = jax.value_and_grad(lambda p, x: jnp.sum(ref.apply(p, x) ** 2), argnums=(0, 1))(params, x)
    assert abs(float(value) - float(want_value)) <= 1e-4 * abs(float(want_value))
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(w))))
    tpu = jax.export.export(fn, platforms=["tpu"])(params, x).mlir_module()
    assert tpu.count("tpu_custom_call") >= 3  # two forward kernels and the backward's
    cpu = jax.export.export(fn, platforms=["cpu"])(params, x).mlir_module()
    assert "tpu_custom_call" not in cpu


def test_tiles_are_checked_on_construction():
    from mixer_fast.kernels.pallas.common import Tiles

    Tiles(8, 128, 256, 392, 768, 3072)
    with pytest.raises(ValueError, match="rows: expected a tile dividing 392, got 5"):
        Tiles(5, 128, 256, 392, 768, 3072)
    with pytest.raises(ValueError, match="rows: expected a multiple of 8 or all 392, got 7"):
        Tiles(7, 128, 256, 392, 768, 3072)
    with pytest.raises(ValueError, match="channels: expected a multiple of 128 or all 200, got 100"):
        Tiles(8, 100, 256, 392, 200, 3072)
    with pytest.raises(ValueError, match="hidden: expected a multiple of 128 or all 3072, got 96"):
        Tiles(8, 128, 96, 392, 768, 3072)


@pytest.mark.parametrize("name", ["mixer_s16", "mixer_b16", "mixer_l16", "mixer_l32", "resmlp_12", "resmlp_big_24"])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_vmem_inside_the_scoped_default(name, itemsize):
    from mixer_fast.kernels.pallas.common import VMEM_LIMIT, Tiles

    c = get_config(name)
    for batch in (1, 8, 256):
        t = Tiles.choose(batch * c.seq_len, c.embed_dim, c.channels_dim)
        assert t.channel_vmem_bytes(c.embed_dim, itemsize) <= VMEM_LIMIT
        t = Tiles.choose(batch * c.seq_len, c.embed_dim, c.tokens_dim)
        assert t.token_vmem_bytes(c.seq_len, c.tokens_dim, itemsize) <= VMEM_LIMIT


@pytest.mark.parametrize("op", ["token", "channel"])
def test_pallas_gradients_of_scale_and_sample_scale(op):
    args, kw = _args(op, 3, 16, 128, 256 if op == "channel" else 24, jnp.float32, "resmlp", seed=7)
    check_scale_grads("pallas", op, args, kw)
