"""The mixing core in plain jax.numpy: the ``xla`` JAX backend and the spec the Pallas kernels are tested
against. Weights are in Flax layout (in, out), as google-research/vision_transformer's Dense kernels.

Shapes: x (B, S, C). Token mixing: fc1_kernel (S, D_S), fc2_kernel (D_S, S); with ``fc2_kernel=None`` the
branch is the single linear ``fc1`` (ResMLP, (S, S)) with no activation. Channel mixing: fc1_kernel
(C, D_C), fc2_kernel (D_C, C). GELU defaults to the tanh form, as Flax's ``nn.gelu``.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def normalize(x: Array, weight: Optional[Array], bias: Optional[Array], norm: str, eps: float) -> Array:
    """LayerNorm over the last axis (statistics in at least fp32) or ResMLP's affine ``weight*x + bias``."""
    if norm == "layernorm":
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        x = ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    elif norm != "affine":
        raise ValueError(f"norm: expected 'layernorm' or 'affine', got {norm!r}")
    if weight is not None:
        x = x * weight
    return x if bias is None else x + bias


def _gelu(h: Array, approximate: str) -> Array:
    return jax.nn.gelu(h, approximate=approximate == "tanh")


def _branch_scale(branch: Array, scale: Optional[Array], sample_scale: Optional[Array]) -> Array:
    if scale is not None:
        branch = branch * scale
    if sample_scale is not None:
        branch = branch * sample_scale[:, None, None]
    return branch


def token_mixing(x: Array, norm_weight: Optional[Array], norm_bias: Optional[Array], fc1_kernel: Array,
                 fc1_bias: Optional[Array], fc2_kernel: Optional[Array], fc2_bias: Optional[Array], *,
                 eps: float = 1e-6, approximate: str = "tanh", norm: str = "layernorm",
                 scale: Optional[Array] = None, sample_scale: Optional[Array] = None) -> Array:
    """x + scale · sample_scale · MLP_tokens(N(x)ᵀ)ᵀ, as vision_transformer writes it. (B, S, C) → (B, S, C)."""
    h = jnp.swapaxes(normalize(x, norm_weight, norm_bias, norm, eps), 1, 2)  # (B, C, S)
    h = h @ fc1_kernel
    if fc1_bias is not None:
        h = h + fc1_bias
    if fc2_kernel is not None:
        h = _gelu(h, approximate) @ fc2_kernel
        if fc2_bias is not None:
            h = h + fc2_bias
    return x + _branch_scale(jnp.swapaxes(h, 1, 2), scale, sample_scale)


def channel_mixing(x: Array, norm_weight: Optional[Array], norm_bias: Optional[Array], fc1_kernel: Array,
                   fc1_bias: Optional[Array], fc2_kernel: Array, fc2_bias: Optional[Array], *,
                   eps: float = 1e-6, approximate: str = "tanh", norm: str = "layernorm",
                   scale: Optional[Array] = None, sample_scale: Optional[Array] = None) -> Array:
    """x + scale · sample_scale · MLP_channels(N(x)). (B, S, C) → (B, S, C)."""
    h = normalize(x, norm_weight, norm_bias, norm, eps) @ fc1_kernel
    if fc1_bias is not None:
        h = h + fc1_bias
    h = _gelu(h, approximate) @ fc2_kernel
    if fc2_bias is not None:
        h = h + fc2_bias
    return x + _branch_scale(h, scale, sample_scale)
