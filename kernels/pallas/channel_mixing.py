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

from .common import Tiles, dot, interpreting, check_vmem, gelu, gelu_grad, norm_inputs, normalise, result_dtype


def _normalised(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, dtype, norm: str):
    return normalise(x_ref[...], mean_ref[...], rstd_ref[...], nw_ref[...], nb_ref[...], norm, dtype)


def _kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref, b1_ref, w2_ref, b2_ref, scale_ref, ss_ref, *refs,
            norm: str, approximate: str, with_branch: bool):
    o_ref, branch_ref, acc_ref = refs if with_branch else (refs[0], None, refs[1])
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    xn = _normalised(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref.dtype, norm)  # (TM, C)
    h = dot(xn, w1_ref[...]) + b1_ref[...].astype(jnp.float32)
    a = gelu(h, approximate).astype(w2_ref.dtype)
    acc_ref[...] += dot(a, w2_ref[...])

    @pl.when(k == pl.num_programs(1) - 1)
    def _():
        branch = acc_ref[...] + b2_ref[...].astype(jnp.float32)
        if with_branch:
            branch_ref[...] = branch
        out = branch * scale_ref[...].astype(jnp.float32) * ss_ref[...].astype(jnp.float32)
        o_ref[...] = (x_ref[...].astype(jnp.float32) + out).astype(o_ref.dtype)


def channel_mixing_forward(x: jax.Array, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *,
                           eps: float, approximate: str, norm: str, scale: Optional[jax.Array],
                           sample_scale: Optional[jax.Array], interpret=False, with_branch: bool = False):
    """x (B, S, C) + branch, Flax-layout kernels fc1 (C, D_C), fc2 (D_C, C); see the module doc. With
    ``with_branch``, returns (out, branch) where branch (B, S, C) fp32 is the MLP output before scale
    and sample_scale (what the backward needs for their gradients)."""
    B, S, C = x.shape
    D = fc1_kernel.shape[1]
    M = B * S
    f32 = jnp.float32
    out_dtype = result_dtype(x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale)
    x2 = x.reshape(M, C)
    mean, rstd, nw, nb = norm_inputs(x2, norm_weight, norm_bias, norm, eps)
    b1 = (jnp.zeros((D,), f32) if fc1_bias is None else fc1_bias).reshape(1, D)
    b2 = jnp.zeros((1, C), f32) if fc2_bias is None else fc2_bias.reshape(1, C)
    sc = jnp.ones((1, C), f32) if scale is None else scale.reshape(1, C)
    ss = jnp.repeat(jnp.ones((B,), f32) if sample_scale is None else sample_scale, S).reshape(M, 1)
    tiles = Tiles.choose(M, C, D)
    check_vmem(tiles.channel_vmem_bytes(C, jnp.dtype(fc1_kernel.dtype).itemsize), "channel mixing")
    tm, td = tiles.rows, tiles.hidden
    rows = lambda w: pl.BlockSpec((tm, w), lambda i, k: (i, 0))  # noqa: E731
    vec_c = pl.BlockSpec((1, C), lambda i, k: (0, 0))
    kernel = lambda *refs: _kernel(*refs, norm=norm, approximate=approximate, with_branch=with_branch)  # noqa: E731
    out_shape = jax.ShapeDtypeStruct((M, C), out_dtype)
    with interpreting(interpret):
        result = pl.pallas_call(
            kernel,
            out_shape=(out_shape, jax.ShapeDtypeStruct((M, C), f32)) if with_branch else out_shape,
            grid=(M // tm, D // td),
            in_specs=[rows(C), rows(1), rows(1), vec_c, vec_c,
                      pl.BlockSpec((C, td), lambda i, k: (0, k)), pl.BlockSpec((1, td), lambda i, k: (0, k)),
                      pl.BlockSpec((td, C), lambda i, k: (k, 0)), vec_c, vec_c, rows(1)],
            out_specs=(rows(C), rows(C)) if with_branch else rows(C),
            scratch_shapes=[pltpu.VMEM((tm, C), jnp.float32)],
            interpret=interpret,
        )(x2, mean, rstd, nw, nb, fc1_kernel, b1, fc2_kernel, b2, sc, ss)
    if with_branch:
        return result[0].reshape(B, S, C), result[1].reshape(B, S, C)
    return result.reshape(B, S, C)


# ---------------------------------------------------------------------------------------------------------
# Backward: two kernels over the same blocks, each recomputing the hidden tile Z = N(x)·W1 + b1.
#   g  = dL/dN(x) = Σ_k (GELU'(Z) ⊙ dO·W2ᵀ)[:, k] · W1[:, k]ᵀ   grid (row blocks, hidden tiles), k innermost
#   dW1[:, k] = Σ_i N(x)ᵀ·dZ, dW2[k, :] = Σ_i GELU(Z)ᵀ·dO, db1   grid (hidden tiles, row blocks), i innermost
# The LayerNorm backward (row reductions over all of C) and the bias/scale sums run in XLA afterwards.

def _dz(xn, do, w1, b1, w2, approximate: str):
    """(Z, dZ) of one block: Z = xn·W1 + b1, dZ = GELU'(Z) ⊙ (dO·W2ᵀ), fp32."""
    z = dot(xn, w1) + b1.astype(jnp.float32)
    da = dot(do, w2, (((1,), (1,)), ((), ())))
    return z, da * gelu_grad(z, approximate)


def _g_kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref, b1_ref, w2_ref, do_ref, g_ref, acc_ref, *,
              norm: str, approximate: str):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    xn = _normalised(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref.dtype, norm)
    _, dz = _dz(xn, do_ref[...], w1_ref[...], b1_ref[...], w2_ref[...], approximate)
    acc_ref[...] += dot(dz.astype(w1_ref.dtype), w1_ref[...], (((1,), (1,)), ((), ())))

    @pl.when(k == pl.num_programs(1) - 1)
    def _():
        g_ref[...] = acc_ref[...]


def _w_kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref, b1_ref, w2_ref, do_ref, dw1_ref, dw2_ref, db1_ref,
              *, norm: str, approximate: str):
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _():
        dw1_ref[...] = jnp.zeros_like(dw1_ref)
        dw2_ref[...] = jnp.zeros_like(dw2_ref)
        db1_ref[...] = jnp.zeros_like(db1_ref)

    xn = _normalised(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1_ref.dtype, norm)
    do = do_ref[...]
    z, dz = _dz(xn, do, w1_ref[...], b1_ref[...], w2_ref[...], approximate)
    a = gelu(z, approximate).astype(do.dtype)
    tn = (((0,), (0,)), ((), ()))
    dw1_ref[...] += dot(xn, dz.astype(xn.dtype), tn)
    dw2_ref[...] += dot(a, do, tn)
    db1_ref[...] += jnp.sum(dz, axis=0, keepdims=True)


def channel_mixing_backward(dout, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, branch, *,
                            eps: float, approximate: str, norm: str, scale, sample_scale, interpret=False):
    """Cotangents of (x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale,
    sample_scale) for dout (B, S, C); ``branch`` (B, S, C) is the forward's MLP output before scale and
    sample_scale (needed only for their gradients, else None). None for absent inputs."""
    B, S, C = x.shape
    D = fc1_kernel.shape[1]
    M = B * S
    f32 = jnp.float32
    wdt = fc1_kernel.dtype
    x2 = x.reshape(M, C)
    mean, rstd, nw, nb = norm_inputs(x2, norm_weight, norm_bias, norm, eps)
    b1 = (jnp.zeros((D,), f32) if fc1_bias is None else fc1_bias).reshape(1, D)
    ss_rows = None if sample_scale is None else jnp.repeat(sample_scale.astype(f32), S).reshape(M, 1)
    dout2 = dout.reshape(M, C).astype(f32)
    do = dout2 * (1.0 if scale is None else scale.reshape(1, C).astype(f32))
    do = (do if ss_rows is None else do * ss_rows).astype(wdt)
    tiles = Tiles.choose(M, C, D)
    tm, td = tiles.rows, tiles.hidden
    rows = lambda w, f: pl.BlockSpec((tm, w), f)  # noqa: E731
    vec_c = lambda f: pl.BlockSpec((1, C), f)  # noqa: E731
    args = (x2, mean, rstd, nw, nb, fc1_kernel, b1, fc2_kernel, do)
    kw = dict(norm=norm, approximate=approximate)
    with interpreting(interpret):
        g = pl.pallas_call(
            lambda *refs: _g_kernel(*refs, **kw),
            out_shape=jax.ShapeDtypeStruct((M, C), f32),
            grid=(M // tm, D // td),
            in_specs=[rows(C, lambda i, k: (i, 0)), rows(1, lambda i, k: (i, 0)), rows(1, lambda i, k: (i, 0)),
                      vec_c(lambda i, k: (0, 0)), vec_c(lambda i, k: (0, 0)),
                      pl.BlockSpec((C, td), lambda i, k: (0, k)), pl.BlockSpec((1, td), lambda i, k: (0, k)),
                      pl.BlockSpec((td, C), lambda i, k: (k, 0)), rows(C, lambda i, k: (i, 0))],
            out_specs=rows(C, lambda i, k: (i, 0)),
            scratch_shapes=[pltpu.VMEM((tm, C), f32)],
            interpret=interpret,
        )(*args)
    with interpreting(interpret):
        dw1, dw2, db1 = pl.pallas_call(
            lambda *refs: _w_kernel(*refs, **kw),
            out_shape=(jax.ShapeDtypeStruct((C, D), f32), jax.ShapeDtypeStruct((D, C), f32),
                       jax.ShapeDtypeStruct((1, D), f32)),
            grid=(D // td, M // tm),
            in_specs=[rows(C, lambda k, i: (i, 0)), rows(1, lambda k, i: (i, 0)), rows(1, lambda k, i: (i, 0)),
                      vec_c(lambda k, i: (0, 0)), vec_c(lambda k, i: (0, 0)),
                      pl.BlockSpec((C, td), lambda k, i: (0, k)), pl.BlockSpec((1, td), lambda k, i: (0, k)),
                      pl.BlockSpec((td, C), lambda k, i: (k, 0)), rows(C, lambda k, i: (i, 0))],
            out_specs=(pl.BlockSpec((C, td), lambda k, i: (0, k)), pl.BlockSpec((td, C), lambda k, i: (k, 0)),
                       pl.BlockSpec((1, td), lambda k, i: (0, k))),
            interpret=interpret,
        )(*args)
    dx, dnw, dnb, dscale, dss = norm_and_scale_grads(g, x, dout, mean, rstd, nw, norm, branch, scale,
                                                     sample_scale)
    return (dx,
            None if norm_weight is None else dnw.astype(norm_weight.dtype),
            None if norm_bias is None else dnb.astype(norm_bias.dtype),
            dw1.astype(fc1_kernel.dtype),
            None if fc1_bias is None else db1.reshape(D).astype(fc1_bias.dtype),
            dw2.astype(fc2_kernel.dtype),
            None if fc2_bias is None else do.astype(f32).sum(0).astype(fc2_bias.dtype),
            dscale, dss)


def norm_and_scale_grads(g, x, dout, mean, rstd, nw, norm: str, branch, scale, sample_scale):
    """The XLA tail of both backwards: from g = dL/dN(x) (B·S, C) fp32, (dx, d norm weight, d norm bias,
    d scale, d sample_scale); the last two from the forward's ``branch`` (None where not needed)."""
    B, S, C = x.shape
    f32 = jnp.float32
    xf = x.reshape(B * S, C).astype(f32)
    dout2 = dout.reshape(B * S, C).astype(f32)
    xhat = (xf - mean) * rstd if norm == "layernorm" else xf
    gw = g * nw.astype(f32)
    if norm == "layernorm":
        dxn = rstd * (gw - gw.mean(-1, keepdims=True) - xhat * (gw * xhat).mean(-1, keepdims=True))
    else:
        dxn = gw
    dx = (dout2 + dxn).reshape(B, S, C).astype(x.dtype)
    dscale = dss = None
    if scale is not None or sample_scale is not None:
        t = dout2 * branch.reshape(B * S, C).astype(f32)
        ss_rows = None if sample_scale is None else jnp.repeat(sample_scale.astype(f32), S).reshape(B * S, 1)
        if scale is not None:
            dscale = (t if ss_rows is None else t * ss_rows).sum(0).astype(scale.dtype)
        if sample_scale is not None:
            u = t if scale is None else t * scale.reshape(1, C).astype(f32)
            dss = u.reshape(B, S * C).sum(1).astype(sample_scale.dtype)
    return dx, (g * xhat).sum(0), g.sum(0), dscale, dss
