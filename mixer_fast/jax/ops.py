"""The two ops of the mixing core for JAX: checked arguments, then the chosen backend.

Weights in Flax layout (in, out); each op returns the block input plus its branch, (B, S, C). The
functions are jit/grad/vmap-able; the backend is chosen when the function is traced (argument, then
``MIXER_FAST_BACKEND``, then the best for ``jax.default_backend()``).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from .. import dispatch

Array = jax.Array
APPROXIMATIONS = ("none", "tanh")
NORMS = ("layernorm", "affine")


def _array(name: str, a: object, optional: bool = False) -> Optional[Array]:
    if a is None and optional:
        return None
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected a JAX array{' or None' if optional else ''}, got {type(a).__name__}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {a.dtype}")
    return a


def _shape(name: str, a: Optional[Array], expected: tuple, meaning: str) -> None:
    if a is not None and tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {meaning} = {tuple(expected)}, got {tuple(a.shape)}")


def check(op: str, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *, eps, approximate,
          norm, scale, sample_scale) -> float:
    """ValueError/TypeError naming the argument, expected vs given; returns eps as a float."""
    x = _array("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected a 3-D array (B, S, C), got shape {tuple(x.shape)}")
    B, S, C = x.shape
    fc1_kernel = _array("fc1_kernel", fc1_kernel)
    fc2_kernel = _array("fc2_kernel", fc2_kernel, optional=(op == "token_mixing"))
    for name, a in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("fc1_bias", fc1_bias),
                    ("fc2_bias", fc2_bias), ("scale", scale), ("sample_scale", sample_scale)):
        _array(name, a, optional=True)
    if fc1_kernel.ndim != 2:
        raise ValueError(f"fc1_kernel: expected a 2-D kernel (in, out), got shape {tuple(fc1_kernel.shape)}")
    n_in = S if op == "token_mixing" else C
    hidden = fc1_kernel.shape[1]
    _shape("fc1_kernel", fc1_kernel, (n_in, hidden), f"({'S' if n_in == S else 'C'}, D) with the size from x")
    _shape("norm_weight", norm_weight, (C,), "(C,)")
    _shape("norm_bias", norm_bias, (C,), "(C,)")
    _shape("fc1_bias", fc1_bias, (hidden,), "(D,)")
    _shape("scale", scale, (C,), "(C,)")
    _shape("sample_scale", sample_scale, (B,), "(B,)")
    if fc2_kernel is None:
        _shape("fc1_kernel", fc1_kernel, (S, S), "(S, S) when fc2_kernel is None")
        if fc2_bias is not None:
            raise ValueError("fc2_bias: expected None when fc2_kernel is None, got an array")
    else:
        _shape("fc2_kernel", fc2_kernel, (hidden, n_in), "(D, in)")
        _shape("fc2_bias", fc2_bias, (n_in,), "(in,)")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {list(APPROXIMATIONS)}, got {approximate!r}")
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {list(NORMS)}, got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def _run(op: str, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *, eps, approximate,
         norm, scale, sample_scale, backend) -> Array:
    eps = check(op, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, eps=eps,
                approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale)
    # Mixed dtypes (bf16 activations with fp32 Flax parameters, say) run in their promoted dtype, as
    # flax.linen.Dense does with dtype=None: cast once here, so every backend computes the same thing.
    arrays = (x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale, sample_scale)
    dtype = jnp.result_type(*(a for a in arrays if a is not None))
    (x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale, sample_scale) = (
        None if a is None else jnp.asarray(a, dtype) for a in arrays)
    # mode None: under a custom_vjp the call cannot tell whether a gradient will follow, so a fused backend
    # is chosen automatically only where it wins both forward and training.
    impl = dispatch.choose("jax", jax.default_backend(), backend, op=op, dtype=jnp.dtype(dtype).name)
    if x.shape[0] == 0:
        # An empty batch has nothing to compute (and a kernel grid of zero images is not launchable):
        # the jax.numpy reference returns the empty output and zero parameter gradients.
        impl = dispatch.choose("jax", jax.default_backend(), "xla")
    return getattr(impl, op)(x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, eps=eps,
                             approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale)


def token_mixing(x: Array, norm_weight: Optional[Array], norm_bias: Optional[Array], fc1_kernel: Array,
                 fc1_bias: Optional[Array], fc2_kernel: Optional[Array], fc2_bias: Optional[Array], *,
                 eps: float = 1e-6, approximate: str = "tanh", norm: str = "layernorm",
                 scale: Optional[Array] = None, sample_scale: Optional[Array] = None,
                 backend: Optional[str] = None) -> Array:
    """x + scale · sample_scale · (GELU(N(x)ᵀ · K1 + b1) · K2 + b2)ᵀ, the MLP along tokens.

    x (B, S, C); norm_weight/norm_bias (C,) (LayerNorm scale/bias, or ResMLP affine with norm="affine");
    fc1_kernel (S, D_S), fc1_bias (D_S,), fc2_kernel (D_S, S), fc2_bias (S,), or fc2_kernel=None for a
    single (S, S) linear; approximate "tanh" (Flax's default) or "none"; scale (C,), sample_scale (B,).
    """
    return _run("token_mixing", x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, eps=eps,
                approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale, backend=backend)


def channel_mixing(x: Array, norm_weight: Optional[Array], norm_bias: Optional[Array], fc1_kernel: Array,
                   fc1_bias: Optional[Array], fc2_kernel: Array, fc2_bias: Optional[Array], *,
                   eps: float = 1e-6, approximate: str = "tanh", norm: str = "layernorm",
                   scale: Optional[Array] = None, sample_scale: Optional[Array] = None,
                   backend: Optional[str] = None) -> Array:
    """x + scale · sample_scale · (GELU(N(x) · K1 + b1) · K2 + b2), the MLP along channels; fc1_kernel
    (C, D_C), fc2_kernel (D_C, C); other arguments as :func:`token_mixing`."""
    return _run("channel_mixing", x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, eps=eps,
                approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale, backend=backend)
