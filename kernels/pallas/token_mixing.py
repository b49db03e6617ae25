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

from .common import Tiles, dot, interpreting, check_vmem, gelu, gelu_grad, norm_inputs, normalise, result_dtype


def _kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1t_ref, b1_ref, w2t_ref, b2_ref, scale_ref, ss_ref, *refs,
            norm: str, approximate: str, one_linear: bool, with_branch: bool):
    o_ref = refs[0]
    xn = normalise(x_ref[0], mean_ref[0], rstd_ref[0], nw_ref[...], nb_ref[...], norm, w1t_ref.dtype)  # (S, Ct)
    h = dot(w1t_ref[...], xn) + b1_ref[...].astype(jnp.float32)
    if not one_linear:
        a = gelu(h, approximate).astype(w2t_ref.dtype)
        h = dot(w2t_ref[...], a) + b2_ref[...].astype(jnp.float32)
    if with_branch:
        refs[1][0] = h
    h = h * scale_ref[...].astype(jnp.float32) * ss_ref[0].astype(jnp.float32)
    o_ref[0] = (x_ref[0].astype(jnp.float32) + h).astype(o_ref.dtype)


def token_mixing_forward(x: jax.Array, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *,
                         eps: float, approximate: str, norm: str, scale: Optional[jax.Array],
                         sample_scale: Optional[jax.Array], interpret=False, with_branch: bool = False):
    """x (B, S, C) + branch, Flax-layout kernels (fc1 (S, D), fc2 (D, S) or None); see the module doc. With
    ``with_branch``, returns (out, branch), branch (B, S, C) fp32 before scale and sample_scale."""
    B, S, C = x.shape
    f32 = jnp.float32
    out_dtype = result_dtype(x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale)
    one_linear = fc2_kernel is None
    D = fc1_kernel.shape[1]
    mean, rstd, nw, nb = norm_inputs(x, norm_weight, norm_bias, norm, eps)
    w1t = fc1_kernel.T  # (D, S): small weights transposed once per call by XLA
    b1 = (jnp.zeros((D,), f32) if fc1_bias is None else fc1_bias).reshape(D, 1)
    w2t = jnp.zeros((S, 1), w1t.dtype) if one_linear else fc2_kernel.T  # (S, D)
    b2 = (jnp.zeros((S,), f32) if fc2_bias is None else fc2_bias).reshape(S, 1)
    sc = jnp.ones((1, C), f32) if scale is None else scale.reshape(1, C)
    ss = (jnp.ones((B,), f32) if sample_scale is None else sample_scale).reshape(B, 1, 1)
    tiles = Tiles.choose(B * S, C, D)
    check_vmem(tiles.token_vmem_bytes(S, D, jnp.dtype(w1t.dtype).itemsize), "token mixing")
    tc = tiles.channels
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c: (0,) * a.ndim)  # noqa: E731
    per_c = pl.BlockSpec((1, tc), lambda b, c: (0, c))
    kernel = lambda *refs: _kernel(*refs, norm=norm, approximate=approximate, one_linear=one_linear,  # noqa: E731
                                   with_branch=with_branch)
    slab = pl.BlockSpec((1, S, tc), lambda b, c: (b, 0, c))
    out_shape = jax.ShapeDtypeStruct(x.shape, out_dtype)
    with interpreting(interpret):
        return pl.pallas_call(
            kernel,
            out_shape=(out_shape, jax.ShapeDtypeStruct(x.shape, f32)) if with_branch else out_shape,
            grid=(B, C // tc),
            in_specs=[pl.BlockSpec((1, S, tc), lambda b, c: (b, 0, c)),
                      pl.BlockSpec((1, S, 1), lambda b, c: (b, 0, 0)), pl.BlockSpec((1, S, 1), lambda b, c: (b, 0, 0)),
                      per_c, per_c, whole(w1t), whole(b1), whole(w2t), whole(b2), per_c,
                      pl.BlockSpec((1, 1, 1), lambda b, c: (b, 0, 0))],
            out_specs=(slab, slab) if with_branch else slab,
            interpret=interpret,
        )(x, mean, rstd, nw, nb, w1t, b1, w2t, b2, sc, ss)


# ---------------------------------------------------------------------------------------------------------
# Backward: one kernel per image slab recomputes the hidden tile and writes g = dL/dN(x) for its slab,
# while accumulating dW1ᵀ, dW2ᵀ and db1 in output blocks shared by the whole (sequential) grid. The norm
# backward (reductions over all of C) and the bias/scale sums run in XLA afterwards.

def _bwd_kernel(x_ref, mean_ref, rstd_ref, nw_ref, nb_ref, w1t_ref, b1_ref, w2t_ref, do_ref,
                g_ref, dw1t_ref, dw2t_ref, db1_ref, *, norm: str, approximate: str, one_linear: bool):
    @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
    def _():
        dw1t_ref[...] = jnp.zeros_like(dw1t_ref)
        dw2t_ref[...] = jnp.zeros_like(dw2t_ref)
        db1_ref[...] = jnp.zeros_like(db1_ref)

    xn = normalise(x_ref[0], mean_ref[0], rstd_ref[0], nw_ref[...], nb_ref[...], norm, w1t_ref.dtype)
    do = do_ref[0]  # (S, Ct), dL/d(branch before scale)
    contract_first = (((0,), (0,)), ((), ()))
    contract_last = (((1,), (1,)), ((), ()))
    if one_linear:
        dz = do.astype(jnp.float32)  # (S, Ct): the branch is W·N(x) + b itself
    else:
        w2t = w2t_ref[...]
        z = dot(w1t_ref[...], xn) + b1_ref[...].astype(jnp.float32)
        a = gelu(z, approximate).astype(w2t.dtype)
        dw2t_ref[...] += dot(do, a, contract_last)
        da = dot(w2t, do, contract_first)  # (D, Ct)
        dz = da * gelu_grad(z, approximate)
    dzc = dz.astype(w1t_ref.dtype)
    dw1t_ref[...] += dot(dzc, xn, contract_last)
    db1_ref[...] += jnp.sum(dz, axis=1, keepdims=True)
    g_ref[0] = dot(w1t_ref[...], dzc, contract_first)


def token_mixing_backward(dout, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, branch, *,
                          eps: float, approximate: str, norm: str, scale, sample_scale, interpret=False):
    """Cotangents of (x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale,
    sample_scale) for dout (B, S, C); ``branch`` as in channel_mixing_backward. None for absent inputs."""
    from .channel_mixing import norm_and_scale_grads

    B, S, C = x.shape
    f32 = jnp.float32
    one_linear = fc2_kernel is None
    D = fc1_kernel.shape[1]
    wdt = fc1_kernel.dtype
    mean, rstd, nw, nb = norm_inputs(x, norm_weight, norm_bias, norm, eps)
    w1t = fc1_kernel.T
    b1 = (jnp.zeros((D,), f32) if fc1_bias is None else fc1_bias).reshape(D, 1)
    w2t = jnp.zeros((S, 1), wdt) if one_linear else fc2_kernel.T
    dout32 = dout.astype(f32)
    do = dout32 * (1.0 if scale is None else scale.reshape(1, 1, C).astype(f32))
    do = (do if sample_scale is None else do * sample_scale.astype(f32).reshape(B, 1, 1)).astype(wdt)
    tiles = Tiles.choose(B * S, C, D)
    tc = tiles.channels
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c: (0,) * len(a.shape))  # noqa: E731
    slab = pl.BlockSpec((1, S, tc), lambda b, c: (b, 0, c))
    stat = pl.BlockSpec((1, S, 1), lambda b, c: (b, 0, 0))
    per_c = pl.BlockSpec((1, tc), lambda b, c: (0, c))
    dw1t_shape = (D, S)
    dw2t_shape = (S, 1) if one_linear else (S, D)
    with interpreting(interpret):
        g, dw1t, dw2t, db1 = pl.pallas_call(
            lambda *refs: _bwd_kernel(*refs, norm=norm, approximate=approximate, one_linear=one_linear),
            out_shape=(jax.ShapeDtypeStruct((B, S, C), f32), jax.ShapeDtypeStruct(dw1t_shape, f32),
                       jax.ShapeDtypeStruct(dw2t_shape, f32), jax.ShapeDtypeStruct((D, 1), f32)),
            grid=(B, C // tc),
            in_specs=[slab, stat, stat, per_c, per_c, whole(w1t), whole(b1), whole(w2t), slab],
            out_specs=(slab, pl.BlockSpec(dw1t_shape, lambda b, c: (0, 0)),
                       pl.BlockSpec(dw2t_shape, lambda b, c: (0, 0)), pl.BlockSpec((D, 1), lambda b, c: (0, 0))),
            interpret=interpret,
        )(x, mean, rstd, nw, nb, w1t, b1, w2t, do)
    dx, dnw, dnb, dscale, dss = norm_and_scale_grads(
        g.reshape(B * S, C), x, dout, mean.reshape(B * S, 1), rstd.reshape(B * S, 1), nw, norm, branch, scale,
        sample_scale)
    dof = do.astype(f32)
    return (dx,
            None if norm_weight is None else dnw.astype(norm_weight.dtype),
            None if norm_bias is None else dnb.astype(norm_bias.dtype),
            dw1t.T.astype(fc1_kernel.dtype),
            None if fc1_bias is None else db1.reshape(D).astype(fc1_bias.dtype),
            None if one_linear else dw2t.T.astype(fc2_kernel.dtype),
            None if fc2_bias is None else dof.sum((0, 2)).astype(fc2_bias.dtype),
            dscale, dss)
