"""JAX side: the Flax MixerBlock against a vision_transformer-style block, the jax.numpy reference against
the PyTorch one, jit / grad / vmap, a batch sharded over two host devices, and bad input."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import require

jax = require("jax")
jnp = require("jax.numpy")
nn = require("flax.linen")

import mixer_fast.flax as mff  # noqa: E402
from mixer_fast import dispatch  # noqa: E402
from mixer_fast import jax as mfj  # noqa: E402
from mixer_fast.reference import functional as torch_ref  # noqa: E402


class VitMlpBlock(nn.Module):
    """google-research/vision_transformer's models_mixer.MlpBlock, as published (the spec for names)."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim)(x)
        y = nn.gelu(y)
        return nn.Dense(x.shape[-1])(y)


class VitMixerBlock(nn.Module):
    """google-research/vision_transformer's models_mixer.MixerBlock, as published."""

    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = jnp.swapaxes(y, 1, 2)
        y = VitMlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + VitMlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


def _perturbed(params, seed=0, std=0.05):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + std * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("shape", [(2, 49, 64, 24, 128), (3, 16, 100, 30, 200)], ids=["49x64", "16x100"])
def test_flax_block_matches_vision_transformer(shape):
    B, S, C, DS, DC = shape
    x = jax.random.normal(jax.random.PRNGKey(1), (B, S, C))
    theirs = VitMixerBlock(DS, DC)
    ours = mff.MixerBlock(DS, DC)
    # Jitted: op by op, JAX compiles every primitive alone (most of this test's time); jit changes nothing
    # that is compared here.
    p_theirs = jax.jit(theirs.init)(jax.random.PRNGKey(0), x)
    p_ours = jax.jit(ours.init)(jax.random.PRNGKey(0), x)
    shapes = lambda p: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), p)  # noqa: E731
    assert shapes(p_ours) == shapes(p_theirs)  # the same tree: their checkpoints load unchanged
    params = _perturbed(p_theirs)
    assert _max_err(jax.jit(ours.apply)(params, x), jax.jit(theirs.apply)(params, x)) < 1e-5

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * jnp.linspace(-1, 1, x.size).reshape(x.shape))

    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    g_theirs = jax.jit(jax.grad(loss(theirs), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
        assert _max_err(a, b) <= 1e-4 * max(float(np.max(np.abs(np.asarray(b, np.float32)))), 1e-3)


def _torch(a):
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
def test_jax_reference_matches_torch_reference(approximate, variant):
    B, S, C, DS, DC = 3, 16, 24, 10, 40
    k = iter(jax.random.split(jax.random.PRNGKey(2), 16))
    r = lambda *s: jax.random.normal(next(k), s) * 0.3  # noqa: E731
    x = r(B, S, C)
    nw, nb = 1 + r(C), r(C)
    scale, ss = (r(C), jnp.array([0.0, 1.5, 2.0])) if variant == "resmlp" else (None, None)
    norm = "affine" if variant == "resmlp" else "layernorm"
    if variant == "resmlp":
        tok = (r(S, S), r(S), None, None)
    else:
        tok = (r(S, DS), r(DS), r(DS, S), r(S))
    ch = (r(C, DC), r(DC), r(DC, C), r(C))
    kw = dict(approximate=approximate, norm=norm, scale=scale, sample_scale=ss)
    torch_kw = dict(approximate=approximate, norm=norm, scale=_torch(scale), sample_scale=_torch(ss))
    # Flax kernels are (in, out); nn.Linear weights (out, in).
    t_tok = [_torch(tok[0]).T, _torch(tok[1]), None if tok[2] is None else _torch(tok[2]).T, _torch(tok[3])]
    got = mfj.token_mixing(x, nw, nb, *tok, **kw)
    want = torch_ref.token_mixing(_torch(x), _torch(nw), _torch(nb), *t_tok, **torch_kw)
    assert _max_err(got, want.numpy()) < 1e-5
    got = mfj.channel_mixing(x, nw, nb, *ch, **kw)
    want = torch_ref.channel_mixing(_torch(x), _torch(nw), _torch(nb), _torch(ch[0]).T, _torch(ch[1]),
                                    _torch(ch[2]).T, _torch(ch[3]), **torch_kw)
    assert _max_err(got, want.numpy()) < 1e-5


def test_flax_resmlp_block_matches_torch_reference():
    from mixer_fast.reference import ResMLPBlock

    B, S, C = 2, 16, 24
    x = jax.random.normal(jax.random.PRNGKey(3), (B, S, C))
    block = mff.ResMLPBlock(channels_mlp_dim=4 * C)
    params = _perturbed(block.init(jax.random.PRNGKey(0), x))
    p = params["params"]
    ref = ResMLPBlock(C, S, dtype=torch.float64)
    with torch.no_grad():
        ref.norm1.alpha.copy_(_torch(p["Affine_0"]["alpha"]).view(1, 1, C))
        ref.norm1.beta.copy_(_torch(p["Affine_0"]["beta"]).view(1, 1, C))
        ref.norm2.alpha.copy_(_torch(p["Affine_1"]["alpha"]).view(1, 1, C))
        ref.norm2.beta.copy_(_torch(p["Affine_1"]["beta"]).view(1, 1, C))
        ref.linear_tokens.weight.copy_(_torch(p["linear_tokens"]["kernel"]).T)
        ref.linear_tokens.bias.copy_(_torch(p["linear_tokens"]["bias"]))
        for i, fc in enumerate((ref.mlp_channels.fc1, ref.mlp_channels.fc2)):
            fc.weight.copy_(_torch(p["mlp_channels"][f"Dense_{i}"]["kernel"]).T)
            fc.bias.copy_(_torch(p["mlp_channels"][f"Dense_{i}"]["bias"]))
        ref.ls1.copy_(_torch(p["ls1"]))
        ref.ls2.copy_(_torch(p["ls2"]))
        want = ref(_torch(x))
    assert _max_err(block.apply(params, x), want.numpy()) < 1e-5


def test_jit_grad_vmap():
    block = mff.MixerBlock(8, 32)
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 2, 16, 24))  # 5 batches of (2, 16, 24)
    params = _perturbed(block.init(jax.random.PRNGKey(0), x[0]))
    eager = jnp.stack([block.apply(params, xi) for xi in x])
    assert _max_err(jax.jit(jax.vmap(block.apply, in_axes=(None, 0)))(params, x), eager) < 1e-5
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2)))(params, x[0])
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(g))


def test_batch_sharded_over_two_host_devices():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import mixer_fast.flax as mff
        assert len(jax.devices()) == 2, jax.devices()
        block = mff.MixerBlock(8, 32)
        x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 24))
        params = block.init(jax.random.PRNGKey(1), x)
        mesh = Mesh(jax.devices(), ("batch",))
        xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
        out = jax.jit(block.apply)(params, xs)
        assert len(out.sharding.device_set) == 2
        print(float(jnp.max(jnp.abs(out - block.apply(params, x)))))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_bad_input(backend):
    # Checked before a backend is chosen: each backend gives the same errors.
    tok = functools.partial(mfj.token_mixing, backend=backend)
    ch = functools.partial(mfj.channel_mixing, backend=backend)
    x = jnp.ones((2, 16, 24))
    args = [x, jnp.ones(24), jnp.zeros(24), jnp.ones((16, 8)), jnp.zeros(8), jnp.ones((8, 16)), jnp.zeros(16)]
    with pytest.raises(ValueError, match=r"x: expected a 3-D array \(B, S, C\), got shape \(16, 24\)"):
        tok(jnp.ones((16, 24)), *args[1:])
    with pytest.raises(ValueError, match=r"fc1_kernel: expected shape \(S, D\) with the size from x = \(17, 8\)"):
        tok(jnp.ones((2, 17, 24)), *args[1:3], jnp.ones((16, 8)), *args[4:])
    with pytest.raises(ValueError, match=r"fc2_kernel: expected shape \(D, in\) = \(8, 16\), got \(8, 15\)"):
        tok(*args[:5], jnp.ones((8, 15)), args[6])
    with pytest.raises(ValueError, match=r"norm_weight: expected shape \(C,\) = \(24,\), got \(23,\)"):
        ch(x, jnp.ones(23), None, jnp.ones((24, 4)), None, jnp.ones((4, 24)), None)
    with pytest.raises(TypeError, match=r"x: expected a floating dtype, got int32"):
        tok(jnp.ones((2, 16, 24), jnp.int32), *args[1:])
    with pytest.raises(ValueError, match=r"approximate: expected one of \['none', 'tanh'\], got 'erf'"):
        tok(*args, approximate="erf")
    with pytest.raises(ValueError, match=r"eps: expected a finite number > 0, got nan"):
        tok(*args, eps=float("nan"))
    with pytest.raises(ValueError, match=r"backend: expected one of \['pallas', 'triton', 'xla'\] for jax"):
        tok(*args, backend="reference")
    with pytest.raises(ValueError, match="backend: 'pallas' runs on tpu/cpu tensors, but the input is on gpu"):
        dispatch.choose("jax", "gpu", "pallas")
    with pytest.raises(TypeError, match=r"x: expected a JAX array, got list"):
        tok([[[1.0]]], *args[1:])
    with pytest.raises(ValueError, match=r"fc1_kernel: expected a 2-D kernel \(in, out\), got shape \(16, 8, 1\)"):
        tok(*args[:3], jnp.ones((16, 8, 1)), *args[4:])
    with pytest.raises(ValueError, match=r"fc1_bias: expected shape \(D,\) = \(8,\), got \(9,\)"):
        tok(*args[:4], jnp.zeros(9), *args[5:])
    with pytest.raises(ValueError, match=r"scale: expected shape \(C,\) = \(24,\), got \(16,\)"):
        tok(*args, scale=jnp.ones(16))
    with pytest.raises(ValueError, match=r"sample_scale: expected shape \(B,\) = \(2,\), got \(2, 1\)"):
        tok(*args, sample_scale=jnp.ones((2, 1)))
    with pytest.raises(ValueError, match=r"fc2_bias: expected None when fc2_kernel is None, got an array"):
        tok(x, *args[1:3], jnp.ones((16, 16)), jnp.zeros(16), None, jnp.zeros(16))
    with pytest.raises(ValueError, match=r"norm: expected one of \['layernorm', 'affine'\], got 'rms'"):
        ch(x, None, None, jnp.ones((24, 4)), None, jnp.ones((4, 24)), None, norm="rms")
    with pytest.raises(ValueError, match=r"eps: expected a finite number > 0, got -1.0"):
        ch(x, None, None, jnp.ones((24, 4)), None, jnp.ones((4, 24)), None, eps=-1.0)


def _op_args(op: str, B: int = 2, S: int = 16, C: int = 24, D: int = 8, seed: int = 0):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    r = lambda *s: 0.3 * jax.random.normal(next(keys), s)  # noqa: E731
    n = S if op == "token_mixing" else C
    return jax.random.normal(next(keys), (B, S, C)), (1 + r(C), r(C), r(n, D), r(D), r(D, n), r(n))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_double_backward(backend, op):
    """xla's second derivatives are JAX's own; pallas' backward kernels have none and say so when traced
    (forward-mode, jax.jvp, is JAX's own TypeError for a custom_vjp function)."""
    x, params = _op_args(op)
    loss = lambda x, be: jnp.sum(getattr(mfj, op)(x, *params, backend=be) ** 2)  # noqa: E731
    second = lambda be: jax.grad(lambda x: jnp.sum(jax.grad(loss)(x, be) ** 2))(x)  # noqa: E731
    if backend == "pallas":
        with pytest.raises(NotImplementedError, match="double backward: the pallas backend's backward is not "
                                                      "differentiable"):
            second("pallas")
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jvp(lambda x: loss(x, "pallas"), (x,), (x,))
    else:
        assert bool(jnp.all(jnp.isfinite(second("xla"))))


@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_mixed_dtypes_run_in_the_promoted_dtype(op):
    """bf16 activations with fp32 parameters (Flax's default param_dtype) compute in fp32 on every backend,
    the same as casting x up front."""
    x, params = _op_args(op)
    x16 = x.astype(jnp.bfloat16)
    want = getattr(mfj, op)(x16.astype(jnp.float32), *params, backend="xla")
    for backend in ("xla", "pallas"):
        got = getattr(mfj, op)(x16, *params, backend=backend)
        assert got.dtype == jnp.float32, backend
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(want)))), backend


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_non_finite_stays_in_its_sample(backend, op):
    x, params = _op_args(op, B=3)
    x = x.at[0, 3, 5].set(jnp.nan).at[2, 1, 1].set(jnp.inf)
    f = lambda x: getattr(mfj, op)(x, *params, backend=backend)  # noqa: E731
    out, vjp = jax.vjp(f, x)
    (gx,) = vjp(jnp.ones_like(out))
    alone = f(x[1:2])
    assert not bool(jnp.all(jnp.isfinite(out[0]))) and not bool(jnp.all(jnp.isfinite(out[2])))
    assert bool(jnp.all(jnp.isfinite(out[1]))) and bool(jnp.all(jnp.isfinite(gx[1])))
    assert float(jnp.max(jnp.abs(out[1] - alone[0]))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(alone))))


@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_batch_0_and_1(op, batch, backend="pallas"):
    # against xla, the jax.numpy reference
    x, params = _op_args(op, B=batch)
    loss = lambda x, p, be: jnp.sum(getattr(mfj, op)(x, *p, backend=be) ** 2)  # noqa: E731
    out = getattr(mfj, op)(x, *params, backend=backend)
    want = getattr(mfj, op)(x, *params, backend="xla")
    assert out.shape == (batch, 16, 24)
    assert float(jnp.max(jnp.abs(out - want), initial=0.0)) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(want), initial=0.0)))
    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    g, g_want = grad(x, params, backend), grad(x, params, "xla")
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_want)):
        assert a.shape == b.shape
        assert float(jnp.max(jnp.abs(a - b), initial=0.0)) <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(b), initial=0.0)))
