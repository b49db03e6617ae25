"""Cases shared by the JAX backends' tests: random op arguments and the comparison with the XLA reference.

The rule is DESIGN's: a fused result may be off the fp32 reference by at most twice what the reference
in the input dtype is, plus a small multiple of the dtype's resolution; gradients within a few ATOL of
the reference's own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mixer_fast import jax as mfj

ATOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}


def args_for(op, B, S, C, D, dtype, variant, seed=0):
    # Drawn by numpy: jax.random compiles a program for every new shape, which took seconds a case.
    rng = np.random.default_rng(seed)

    def r(*shape, std=0.3, mean=0.0):
        return jnp.asarray((mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype))

    x, nw, nb = r(B, S, C, std=1.0), r(C, mean=1.0), r(C)
    n = S if op == "token" else C
    if op == "token" and variant == "resmlp":
        weights = (r(S, S, std=S ** -0.5), r(S), None, None)
    else:
        weights = (r(n, D, std=n ** -0.5), r(D), r(D, n, std=D ** -0.5), r(n))
    kw = dict(norm="affine", scale=r(C), sample_scale=sample_scales(B, dtype)) if variant == "resmlp" else {}
    return (x, nw, nb, *weights), kw


def sample_scales(B, dtype):
    """Per-sample drop-path factors (B,): one dropped sample, then kept ones rescaled (0, 1.5, 2, 0, ...)."""
    return jnp.asarray(np.resize(np.array([0.0, 1.5, 2.0], np.float32), B).astype(dtype))


def _np32(a) -> np.ndarray:
    """On the host in fp32: the comparisons in numpy (op by op, JAX compiles each of them)."""
    return np.asarray(a, dtype=np.float32)


def check_against_xla(backend: str, op: str, args, kw, dtype, approximate: str) -> None:
    fn = mfj.token_mixing if op == "token" else mfj.channel_mixing
    f64 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
    # Each side is one jitted program: run op by op, JAX compiles each primitive on its own, which took
    # over half of a case's time (the ops called outside jit are tested in the test files themselves).
    static = {k: v for k, v in kw.items() if not hasattr(v, "dtype")}

    def run(backend):
        return jax.jit(lambda a, k: fn(*a, **k, **static, approximate=approximate, backend=backend))

    arrays = {k: v for k, v in kw.items() if k not in static}
    xla = run("xla")  # one jitted function for both: in fp32 the reference and eager share one compile
    ref32 = xla(tuple(map(f64, args)), {k: f64(v) for k, v in arrays.items()})
    eager = xla(args, arrays)
    fused = run(backend)(args, arrays)
    assert fused.dtype == eager.dtype
    ref32 = _np32(ref32)
    err = float(np.max(np.abs(_np32(fused) - ref32)))
    eager_err = float(np.max(np.abs(_np32(eager) - ref32)))
    assert err <= 2 * eager_err + ATOL[dtype] * max(1.0, float(np.max(np.abs(ref32)))) / 4

    def loss(backend):
        return lambda *a: jnp.sum(fn(*a, **kw, approximate=approximate, backend=backend).astype(jnp.float32) ** 2)

    n = sum(a is not None for a in args)
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    g_fused = jax.jit(jax.grad(loss(backend), argnums=argnums))(*args)
    g_eager = jax.jit(jax.grad(loss("xla"), argnums=argnums))(*args)
    assert len(g_fused) == n
    for a, b in zip(g_fused, g_eager):
        a, b = _np32(a), _np32(b)
        scale = max(1.0, float(np.max(np.abs(b))))
        assert float(np.max(np.abs(a - b))) <= 4 * ATOL[dtype] * scale


def check_scale_grads(backend: str, op: str, args, kw) -> None:
    """d scale and d sample_scale through ``backend`` equal the XLA reference's (ResMLP-style arguments)."""
    fn = mfj.token_mixing if op == "token" else mfj.channel_mixing

    def loss(backend):
        return lambda sc, ss: jnp.sum(fn(*args, norm="affine", scale=sc, sample_scale=ss, backend=backend) ** 2)

    got = jax.jit(jax.grad(loss(backend), argnums=(0, 1)))(kw["scale"], kw["sample_scale"])
    want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(kw["scale"], kw["sample_scale"])
    for a, b in zip(got, want):
        a, b = _np32(a), _np32(b)
        assert float(np.max(np.abs(a - b))) <= 1e-4 * max(1.0, float(np.max(np.abs(b))))
