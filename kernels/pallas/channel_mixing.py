"""Pallas channel mixing: per block of TM tokens, N(x) on load (full rows of C are in the block, the
statistics come precomputed), H = N(x) · W1[:, tile] + b1, GELU, accumulated H · W2[tile, :] over the
D_C tiles of the grid's last (reduction) axis in a VMEM accumulator; bias, scale, drop path and the
residual on the last step. The hidden never leaves VMEM. Blocks are legal for Mosaic TPU: (TM, C) with
TM a multiple of 8, weight tiles (C, TD) / (TD, C) with TD a multiple of 128 or all of D_C.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import Tiles, check_vmem, gelu, result_dtype


def _kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref, b1_ref, w2_ref, b2_ref, scale_ref, ss_ref, o_ref,
            acc_ref, *, norm: str, approximate: str):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...].astype(jnp.float32)  # (TM, C)
    if norm == "layernorm":
        x = (x - mean_ref[...]) * rstd_ref[...]
    xn = (x * nw_ref[...].astype(jnp.float32) + nb_ref[...].astype(jnp.float32)).astype(w1_ref.dtype)
    h = jnp.dot(xn, w1_ref[...], preferred_element_type=jnp.float32) + b1_ref[...].astype(jnp.float32)
    a = gelu(h, approximate).astype(w2_ref.dtype)
    acc_ref[...] += jnp.dot(a, w2_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(1) - 1)
    def _():
        out = (acc_ref[...] + b2_ref[...].astype(jnp.float32)) * scale_ref[...].astype(jnp.float32)
        out = out * ss_ref[...].astype(jnp.float32)
        o_ref[...] = (x_ref[...].astype(jnp.float32) + out).astype(o_ref.dtype)


def channel_mixing_forward(x: jax.Array, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *,
                           eps: float, approximate: str, norm: str, scale: Optional[jax.Array],
                           sample_scale: Optional[jax.Array], interpret=False) -> jax.Array:
    """x (B, S, C) + branch, Flax-layout kernels fc1 (C, D_C), fc2 (D_C, C); see the module doc."""
    B, S, C = x.shape
    D = fc1_kernel.shape[1]
    M = B * S
    f32 = jnp.float32
    out_dtype = result_dtype(x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale)
    x2 = x.reshape(M, C)
    if norm == "layernorm":
        xf = x2.astype(f32)
        mean = xf.mean(-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    else:
        mean = rstd = jnp.zeros((M, 1), f32)
    ones_c, zeros_c = jnp.ones((1, C), f32), jnp.zeros((1, C), f32)
    nw = ones_c if norm_weight is None else norm_weight.reshape(1, C)
    nb = zeros_c if norm_bias is None else norm_bias.reshape(1, C)
    b1 = (jnp.zeros((D,), f32) if fc1_bias is None else fc1_bias).reshape(1, D)
    b2 = zeros_c if fc2_bias is None else fc2_bias.reshape(1, C)
    sc = ones_c if scale is None else scale.reshape(1, C)
    ss = jnp.repeat(jnp.ones((B,), f32) if sample_scale is None else sample_scale, S).reshape(M, 1)
    tiles = Tiles.choose(M, C, D)
    check_vmem(tiles.channel_vmem_bytes(C, jnp.dtype(fc1_kernel.dtype).itemsize), "channel mixing")
    tm, td = tiles.rows, tiles.hidden
    rows = lambda w: pl.BlockSpec((tm, w), lambda i, k: (i, 0))  # noqa: E731
    vec_c = pl.BlockSpec((1, C), lambda i, k: (0, 0))
    kernel = lambda *refs: _kernel(*refs, norm=norm, approximate=approximate)  # noqa: E731
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, C), out_dtype),
        grid=(M // tm, D // td),
        in_specs=[rows(C), rows(1), rows(1), vec_c, vec_c,
                  pl.BlockSpec((C, td), lambda i, k: (0, k)), pl.BlockSpec((1, td), lambda i, k: (0, k)),
                  pl.BlockSpec((td, C), lambda i, k: (k, 0)), vec_c, vec_c, rows(1)],
        out_specs=rows(C),
        scratch_shapes=[pltpu.VMEM((tm, C), jnp.float32)],
        interpret=interpret,
    )(x2, mean, rstd, nw, nb, fc1_kernel, b1, fc2_kernel, b2, sc, ss)
    return out.reshape(B, S, C)
