"""Pallas token mixing, one image's S × C_tile slab per grid step: N(x) applied on load (LayerNorm with
statistics computed once outside), H = W1ᵀ · N(x) kept in VMEM, GELU, W2ᵀ · H + b2, scale, residual.
No transpose of x is materialised: the token MLP is a left-multiplication of the S × C table.

Blocks are legal for Mosaic TPU: x/out blocks (1, S, C_tile) with S the full dim and C_tile a multiple
of 128 or all of C; the transposed weights are whole blocks. VMEM per step at Mixer-L/16 in fp32:
W1ᵀ, W2ᵀ 2 × 512 × 196 × 4 B = 0.8 MB, x/out/H tiles under 1 MB: well inside the scoped default.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import Tiles, check_vmem, gelu, result_dtype


def _kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1t_ref, b1_ref, w2t_ref, b2_ref, scale_ref, ss_ref, o_ref,
            *, norm: str, approximate: str, one_linear: bool):
    x = x_ref[0].astype(jnp.float32)  # (S, Ct)
    if norm == "layernorm":
        x = (x - mean_ref[0]) * rstd_ref[0]  # stats (S, 1)
    xn = (x * nw_ref[...].astype(jnp.float32) + nb_ref[...].astype(jnp.float32)).astype(w1t_ref.dtype)
    h = jnp.dot(w1t_ref[...], xn, preferred_element_type=jnp.float32) + b1_ref[...].astype(jnp.float32)
    if not one_linear:
        a = gelu(h, approximate).astype(w2t_ref.dtype)
        h = jnp.dot(w2t_ref[...], a, preferred_element_type=jnp.float32) + b2_ref[...].astype(jnp.float32)
    h = h * scale_ref[...].astype(jnp.float32) * ss_ref[0].astype(jnp.float32)
    o_ref[0] = (x_ref[0].astype(jnp.float32) + h).astype(o_ref.dtype)


def token_mixing_forward(x: jax.Array, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *,
                         eps: float, approximate: str, norm: str, scale: Optional[jax.Array],
                         sample_scale: Optional[jax.Array], interpret=False) -> jax.Array:
    """x (B, S, C) + branch, Flax-layout kernels (fc1 (S, D), fc2 (D, S) or None); see the module doc."""
    B, S, C = x.shape
    f32 = jnp.float32
    out_dtype = result_dtype(x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale)
    one_linear = fc2_kernel is None
    D = fc1_kernel.shape[1]
    if norm == "layernorm":
        xf = x.astype(f32)
        mean = xf.mean(-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    else:
        mean = rstd = jnp.zeros((B, S, 1), f32)
    ones_c, zeros_c = jnp.ones((1, C), f32), jnp.zeros((1, C), f32)
    nw = ones_c if norm_weight is None else norm_weight.reshape(1, C)
    nb = zeros_c if norm_bias is None else norm_bias.reshape(1, C)
    w1t = fc1_kernel.T  # (D, S): small weights transposed once per call by XLA
    b1 = (jnp.zeros((D,), f32) if fc1_bias is None else fc1_bias).reshape(D, 1)
    w2t = jnp.zeros((S, 1), w1t.dtype) if one_linear else fc2_kernel.T  # (S, D)
    b2 = (jnp.zeros((S,), f32) if fc2_bias is None else fc2_bias).reshape(S, 1)
    sc = ones_c if scale is None else scale.reshape(1, C)
    ss = (jnp.ones((B,), f32) if sample_scale is None else sample_scale).reshape(B, 1, 1)
    tiles = Tiles.choose(B * S, C, D)
    check_vmem(tiles.token_vmem_bytes(S, D, jnp.dtype(w1t.dtype).itemsize), "token mixing")
    tc = tiles.channels
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c: (0,) * a.ndim)  # noqa: E731
    per_c = pl.BlockSpec((1, tc), lambda b, c: (0, c))
    kernel = lambda *refs: _kernel(*refs, norm=norm, approximate=approximate, one_linear=one_linear)  # noqa: E731
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
        grid=(B, C // tc),
        in_specs=[pl.BlockSpec((1, S, tc), lambda b, c: (b, 0, c)),
                  pl.BlockSpec((1, S, 1), lambda b, c: (b, 0, 0)), pl.BlockSpec((1, S, 1), lambda b, c: (b, 0, 0)),
                  per_c, per_c, whole(w1t), whole(b1), whole(w2t), whole(b2), per_c,
                  pl.BlockSpec((1, 1, 1), lambda b, c: (b, 0, 0))],
        out_specs=pl.BlockSpec((1, S, tc), lambda b, c: (b, 0, c)),
        interpret=interpret,
    )(x, mean, rstd, nw, nb, w1t, b1, w2t, b2, sc, ss)
