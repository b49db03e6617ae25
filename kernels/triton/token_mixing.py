"""Token mixing as a flash-MLP: per image, LN → W1 · (·) + b1 → GELU → W2 · (·) + b2 → scale → + x, fused.

The token MLP left-multiplies each image's S × C table, so no transpose is ever materialised. Each
program owns one image's BLOCK_C channels and computes the transposed product, channels as the MMA's M
(FlashAttention's pattern, with queries → channels, keys → W1's rows, values → W2ᵀ's rows, softmax →
GELU): per BLOCK_D slice of the hidden, Zᵀ = N(x)ᵀ · W1ᵀ, Hᵀ = GELU(Zᵀ + b1) in registers, and
Yᵀ += Hᵀ · W2ᵀ with Hᵀ as the register A operand; x is read once (normalised as it is loaded), the
output written once, the hidden never reaches global memory.

Tokens are covered by up to three power-of-two pieces (:func:`s_pieces`: 196 → 128 + 64 + 16 = 208, the
16-element MMA granule, rather than the next power of two, 256): Triton tiles must be powers of two,
and a 256-wide tile is 23 % more MMA work and 24 more accumulator registers a thread (spills).

Backward: ``token_mlp_dx_kernel`` has the forward's structure (the hidden recomputed, dZᵀ the register A
operand) and produces dL/dN(x); ``token_mlp_dw_kernel`` is FlashAttention's dK/dV loop: one BLOCK_D
slice of W1 and W2 stays on chip while the program walks its share of the (image, channel tile) items,
accumulating dW1, dW2 and db1 in registers; the shares' partials are summed in a fixed order
(deterministic: no atomics).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Sequence, Tuple

import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import _launch
from .elementwise import gelu, gelu_grad, round_to
from .layer_norm import affine_backward, layer_norm_backward, layer_norm_stats
from .matmul import B_AFFINE_K, B_AFFINE_N, B_NONE, B_TOKEN_LAYERNORM, GEMM_CUBLAS, flat, fused_matmul, gemm_engine, split
from .residual import PER_TOKEN, residual_grad

if TYPE_CHECKING:  # torch loads when a launcher runs; the JAX path (jax_launch.py) never needs it
    import torch

    Tensor = torch.Tensor

# The token weights' row strides and the widths the kernels read them at are multiples of GRANULE
# elements (the MMA granule; 16 elements are 16-byte aligned in every dtype): Triton only learns that an
# integer argument is a multiple of 16, so a 16-byte-aligned but otherwise odd stride (fp32 at S = 196)
# would still load element by element. token_weights makes the copies.
GRANULE = 16
_GRANULE = tl.constexpr(GRANULE)  # the same, as kernels see it


# Kernel modes as the kernels see them (the launchers use NORMS and the DW_* names below).
_LAYERNORM = tl.constexpr(1)  # LAYERNORM below
_W1_GRADS = tl.constexpr(1)  # token_mlp_dw_kernel's PART: dW1 and db1 only
_W2_GRAD = tl.constexpr(2)  # PART: dW2 only


@triton.jit
def _operand(t, INTERPRETER: tl.constexpr):
    """A tl.dot operand: widened to fp32 in Triton's interpreter, whose bf16 dot is wrong (products of
    16-bit floats are exact in fp32, so the result is the GPU's)."""
    if INTERPRETER:
        t = t.to(tl.float32)
    return t


@triton.jit
def _tile_offsets(b, rows, cols, sb, s_rows, s_cols, IDX64: tl.constexpr):
    # int64 only when the launch has a tensor of 2³¹ or more elements (2-D int64 offsets cost registers).
    if IDX64:
        return b.to(tl.int64) * sb + rows.to(tl.int64)[:, None] * s_rows + cols.to(tl.int64)[None, :] * s_cols
    else:
        return b * sb + rows[:, None] * s_rows + cols[None, :] * s_cols


@triton.jit
def _load_t(ptr, b, s0, offs_c, S, C, sb, ss, sc, IDX64: tl.constexpr, P: tl.constexpr):
    """One image's (BLOCK_C, P) tile of a (B, S, C) tensor, transposed: rows are channels offs_c, columns
    tokens s0 … s0 + P; zero outside the tensor. Also its mask and offsets."""
    offs_s = s0 + tl.arange(0, P)
    mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]
    off = _tile_offsets(b, offs_c, offs_s, sb, sc, ss, IDX64)
    return tl.load(ptr + off, mask=mask, other=0.0), mask, off


@triton.jit
def _xn_t(x_ptr, b, s0, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb,
          dtype: tl.constexpr, NORM: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
          P: tl.constexpr):
    """N(x)ᵀ of one image's (BLOCK_C, P) tile (``nw``, ``nb``: the norm's weight and bias at offs_c, fp32):
    LayerNorm with the stored statistics or ResMLP's affine, applied as x is loaded, rounded to the
    weights' ``dtype`` (x's own, or the autocast dtype) as eager's norm output is; zero outside x."""
    x, mask, _ = _load_t(x_ptr, b, s0, offs_c, S, C, sxb, sxs, sxc, IDX64, P)
    xf = x.to(tl.float32)
    if NORM == _LAYERNORM:
        offs_s = s0 + tl.arange(0, P)
        rows = b.to(tl.int64) * S + offs_s
        mean = tl.load(mean_ptr + rows, mask=offs_s < S, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=offs_s < S, other=0.0)
        xf = (xf - mean[None, :]) * rstd[None, :]
    xf = tl.where(mask, xf * nw[:, None] + nb[:, None], 0.0)
    return _operand(round_to(xf, dtype, INTERPRETER), INTERPRETER)


@triton.jit
def _w1_piece(w1_ptr, d0, s0, D, S, sw1d, BLOCK_D: tl.constexpr, P: tl.constexpr, INTERPRETER: tl.constexpr):
    """W1[d0 : d0 + BLOCK_D, s0 : s0 + P], zero outside W1, as a dot operand. W1 is the launchers' copy
    (:func:`token_weights`): unit column stride, row stride a multiple of GRANULE and zero columns from S
    up to the next multiple; so the piece is bounded at that width, not at S: both the row stride (which
    the kernels take as a constexpr) and the bound are
    known multiples of 16 and rows load in 16-byte vectors (at S = 196 an unpadded 392-byte row stride
    compiled to 2-byte scalar loads). tl.multiple_of inside the kernel was not enough: with the hint
    there but not on the argument, the JAX forward lost its cp.async pipelining (report, bench/NOTES.md). A block pointer, not a tensor of per-element pointers: those
    hold a register per element (measured: spills)."""
    s_al = tl.cdiv(S, _GRANULE) * _GRANULE
    bp = tl.make_block_ptr(w1_ptr, shape=(D, s_al), strides=(sw1d, 1), offsets=(d0, s0),
                           block_shape=(BLOCK_D, P), order=(1, 0))
    return _operand(tl.load(bp, boundary_check=(0, 1), padding_option="zero"), INTERPRETER)


@triton.jit
def _w2t_piece(w2_ptr, d0, s0, D, S, sw2s, BLOCK_D: tl.constexpr, P: tl.constexpr, INTERPRETER: tl.constexpr):
    """W2ᵀ[d0 : d0 + BLOCK_D, s0 : s0 + P] (W2 is (S, D)), zero outside W2, as a dot operand; W2 is the
    launchers' copy as W1 is (row stride a multiple of GRANULE, zero columns from D to the next one)."""
    d_al = tl.cdiv(D, _GRANULE) * _GRANULE
    bp = tl.make_block_ptr(w2_ptr, shape=(d_al, S), strides=(1, sw2s), offsets=(d0, s0),
                           block_shape=(BLOCK_D, P), order=(0, 1))
    return _operand(tl.load(bp, boundary_check=(0, 1), padding_option="zero"), INTERPRETER)


@triton.jit
def _piece(w1_ptr, w2_ptr, d0, s0, D, S, sw1d, sw2s, W2T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr,
           INTERPRETER: tl.constexpr):
    """W2ᵀ's piece (W2T) or W1's, (BLOCK_D, P) at hidden units d0 … and tokens s0 …."""
    if W2T:
        return _w2t_piece(w2_ptr, d0, s0, D, S, sw2s, BLOCK_D, P, INTERPRETER)
    else:
        return _w1_piece(w1_ptr, d0, s0, D, S, sw1d, BLOCK_D, P, INTERPRETER)


@triton.jit
def _contract_pieces(t0, t1, t2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, W2T: tl.constexpr, PRECISION: tl.constexpr,
                     INTERPRETER: tl.constexpr, S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr,
                     S_PIECE2: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ_i t_i · piece_iᵀ (BLOCK_C, BLOCK_D) over the token pieces: t_i (BLOCK_C, P_i) against W1's pieces
    (Zᵀ = N(x)ᵀ · W1ᵀ) or W2ᵀ's (dAᵀ = dOᵀ · W2)."""
    acc = tl.dot(t0, tl.trans(_piece(w1_ptr, w2_ptr, d0, 0, D, S, sw1d, sw2s, W2T, BLOCK_D, S_PIECE0, INTERPRETER)),
                 input_precision=PRECISION)
    if S_PIECE1 > 0:
        acc = tl.dot(t1, tl.trans(_piece(w1_ptr, w2_ptr, d0, S_PIECE0, D, S, sw1d, sw2s, W2T, BLOCK_D, S_PIECE1,
                                         INTERPRETER)), acc, input_precision=PRECISION)
    if S_PIECE2 > 0:
        acc = tl.dot(t2, tl.trans(_piece(w1_ptr, w2_ptr, d0, S_PIECE0 + S_PIECE1, D, S, sw1d, sw2s, W2T, BLOCK_D,
                                         S_PIECE2, INTERPRETER)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _accumulate_pieces(a, acc0, acc1, acc2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, W2T: tl.constexpr,
                       PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, S_PIECE0: tl.constexpr,
                       S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc_i += a · piece_i for each token piece: ``a`` (BLOCK_C, BLOCK_D) the register A operand (Hᵀ
    against W2ᵀ's pieces in the forward, dZᵀ against W1's in dx); an absent piece's acc is returned as
    given."""
    acc0 = tl.dot(a, _piece(w1_ptr, w2_ptr, d0, 0, D, S, sw1d, sw2s, W2T, BLOCK_D, S_PIECE0, INTERPRETER), acc0,
                  input_precision=PRECISION)
    if S_PIECE1 > 0:
        acc1 = tl.dot(a, _piece(w1_ptr, w2_ptr, d0, S_PIECE0, D, S, sw1d, sw2s, W2T, BLOCK_D, S_PIECE1,
                                INTERPRETER), acc1, input_precision=PRECISION)
    if S_PIECE2 > 0:
        acc2 = tl.dot(a, _piece(w1_ptr, w2_ptr, d0, S_PIECE0 + S_PIECE1, D, S, sw1d, sw2s, W2T, BLOCK_D, S_PIECE2,
                                INTERPRETER), acc2, input_precision=PRECISION)
    return acc0, acc1, acc2


@triton.jit
def _norm_vectors(nw_ptr, nb_ptr, offs_c, C):
    nw = tl.load(nw_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    nb = tl.load(nb_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    return nw, nb


@triton.jit
def _fwd_epilogue(acc, x_ptr, out_ptr, branch_ptr, b2_ptr, scale_ptr, ss_ptr, b, s0, offs_c, S, C,
                  sxb, sxs, sxc, sob, sos, soc, HAS_B2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SS: tl.constexpr,
                  STORE_BRANCH: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, P: tl.constexpr):
    """out = x + ss_b · scale ⊙ (acc + b2) for one (BLOCK_C, P) piece of the output, transposed."""
    offs_s = s0 + tl.arange(0, P)
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_s, mask=offs_s < S, other=0.0).to(tl.float32)[None, :]
    mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]
    out_off = _tile_offsets(b, offs_c, offs_s, sob, soc, sos, IDX64)
    if STORE_BRANCH:
        tl.store(branch_ptr + out_off, round_to(acc, branch_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None]
    if HAS_SS:
        acc *= tl.load(ss_ptr + b).to(tl.float32)
    # x is re-read here rather than kept live through the loop: it would cost BLOCK_C·P registers.
    x, _, _ = _load_t(x_ptr, b, s0, offs_c, S, C, sxb, sxs, sxc, IDX64, P)
    tl.store(out_ptr + out_off, round_to(x.to(tl.float32) + acc, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def token_mlp_fwd_kernel(
    x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr, ss_ptr,
    out_ptr, branch_ptr,
    S: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
    sxb: tl.constexpr, sxs: tl.constexpr, sxc: tl.constexpr, sob: tl.constexpr, sos: tl.constexpr, soc: tl.constexpr,
    sw1d: tl.constexpr, sw1s: tl.constexpr, sw2s: tl.constexpr, sw2d: tl.constexpr,
    NORM: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SS: tl.constexpr, STORE_BRANCH: tl.constexpr, APPROX_TANH: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
    S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The flash-MLP forward of one image's BLOCK_C channels, transposed (channels are the MMA's M):
    per BLOCK_D slice of the hidden, Zᵀ = N(x)ᵀ · W1ᵀ, Hᵀ = GELU(Zᵀ + b1) in registers, Yᵀ += Hᵀ · W2ᵀ
    with Hᵀ as the register A operand (FlashAttention's P·V); tokens are the pieces S_PIECE0..2."""
    b = tl.program_id(0)  # images on axis 0: see Launch.grid
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    dtype = w1_ptr.dtype.element_ty
    nw, nb = _norm_vectors(nw_ptr, nb_ptr, offs_c, C)
    s1 = S_PIECE0
    s2 = S_PIECE0 + S_PIECE1
    xn0 = _xn_t(x_ptr, b, 0, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM, INTERPRETER,
                IDX64, S_PIECE0)
    acc0 = tl.zeros((BLOCK_C, S_PIECE0), dtype=tl.float32)
    xn1 = xn0  # stand-ins when a piece is absent (width 0): never read then
    xn2 = xn0
    acc1 = acc0
    acc2 = acc0
    if S_PIECE1 > 0:
        xn1 = _xn_t(x_ptr, b, s1, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM,
                    INTERPRETER, IDX64, S_PIECE1)
        acc1 = tl.zeros((BLOCK_C, S_PIECE1), dtype=tl.float32)
    if S_PIECE2 > 0:
        xn2 = _xn_t(x_ptr, b, s2, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM,
                    INTERPRETER, IDX64, S_PIECE2)
        acc2 = tl.zeros((BLOCK_C, S_PIECE2), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        z = _contract_pieces(xn0, xn1, xn2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, False, PRECISION, INTERPRETER,
                             S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_D)
        if HAS_B1:
            offs_d = d0 + tl.arange(0, BLOCK_D)
            z += tl.load(b1_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        h = _operand(round_to(gelu(z, APPROX_TANH), w2_ptr.dtype.element_ty, INTERPRETER), INTERPRETER)
        # Rows of W2ᵀ past D are zero (padded copy, boundary-checked), so padded hidden units add nothing.
        acc0, acc1, acc2 = _accumulate_pieces(h, acc0, acc1, acc2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, True,
                                              PRECISION, INTERPRETER, S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_D)
    _fwd_epilogue(acc0, x_ptr, out_ptr, branch_ptr, b2_ptr, scale_ptr, ss_ptr, b, 0, offs_c, S, C,
                  sxb, sxs, sxc, sob, sos, soc, HAS_B2, HAS_SCALE, HAS_SS, STORE_BRANCH, INTERPRETER, IDX64, S_PIECE0)
    if S_PIECE1 > 0:
        _fwd_epilogue(acc1, x_ptr, out_ptr, branch_ptr, b2_ptr, scale_ptr, ss_ptr, b, s1, offs_c, S, C,
                      sxb, sxs, sxc, sob, sos, soc, HAS_B2, HAS_SCALE, HAS_SS, STORE_BRANCH, INTERPRETER, IDX64,
                      S_PIECE1)
    if S_PIECE2 > 0:
        _fwd_epilogue(acc2, x_ptr, out_ptr, branch_ptr, b2_ptr, scale_ptr, ss_ptr, b, s2, offs_c, S, C,
                      sxb, sxs, sxc, sob, sos, soc, HAS_B2, HAS_SCALE, HAS_SS, STORE_BRANCH, INTERPRETER, IDX64,
                      S_PIECE2)


@triton.jit
def token_mlp_dx_kernel(
    x_ptr, do_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr,
    g_ptr,
    S: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
    sxb: tl.constexpr, sxs: tl.constexpr, sxc: tl.constexpr, sdb: tl.constexpr, sds: tl.constexpr, sdc: tl.constexpr,
    sw1d: tl.constexpr, sw1s: tl.constexpr, sw2s: tl.constexpr, sw2d: tl.constexpr,
    NORM: tl.constexpr, HAS_B1: tl.constexpr, APPROX_TANH: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
    S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gᵀ = dL/dN(x)ᵀ = Σ_d (GELU'(Zᵀ) ⊙ (dOᵀ · W2)) · W1 for one image's BLOCK_C channels, transposed as
    the forward (the hidden recomputed, dZᵀ the register A operand), written to ``g`` ((B·S, C)
    contiguous, in g's dtype); dO = dL/d(branch before scale)."""
    b = tl.program_id(0)  # images on axis 0: see Launch.grid
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    dtype = w1_ptr.dtype.element_ty
    nw, nb = _norm_vectors(nw_ptr, nb_ptr, offs_c, C)
    xn0 = _xn_t(x_ptr, b, 0, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM, INTERPRETER,
                IDX64, S_PIECE0)
    do0 = _operand(_load_t(do_ptr, b, 0, offs_c, S, C, sdb, sds, sdc, IDX64, S_PIECE0)[0], INTERPRETER)
    g0 = tl.zeros((BLOCK_C, S_PIECE0), dtype=tl.float32)
    s1 = S_PIECE0
    s2 = S_PIECE0 + S_PIECE1
    xn1 = xn0  # stand-ins when a piece is absent (width 0): never read then
    do1 = do0
    g1 = g0
    xn2 = xn0
    do2 = do0
    g2 = g0
    if S_PIECE1 > 0:
        xn1 = _xn_t(x_ptr, b, s1, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM,
                    INTERPRETER, IDX64, S_PIECE1)
        do1 = _operand(_load_t(do_ptr, b, s1, offs_c, S, C, sdb, sds, sdc, IDX64, S_PIECE1)[0], INTERPRETER)
        g1 = tl.zeros((BLOCK_C, S_PIECE1), dtype=tl.float32)
    if S_PIECE2 > 0:
        xn2 = _xn_t(x_ptr, b, s2, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM,
                    INTERPRETER, IDX64, S_PIECE2)
        do2 = _operand(_load_t(do_ptr, b, s2, offs_c, S, C, sdb, sds, sdc, IDX64, S_PIECE2)[0], INTERPRETER)
        g2 = tl.zeros((BLOCK_C, S_PIECE2), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        z = _contract_pieces(xn0, xn1, xn2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, False, PRECISION, INTERPRETER,
                             S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_D)
        # dAᵀ = dOᵀ · W2[:, d0 : d0 + BLOCK_D], from the same W2ᵀ pieces the forward reads.
        da = _contract_pieces(do0, do1, do2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, True, PRECISION, INTERPRETER,
                              S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_D)
        if HAS_B1:
            offs_d = d0 + tl.arange(0, BLOCK_D)
            z += tl.load(b1_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        dz = _operand(round_to(da * gelu_grad(z, APPROX_TANH), dtype, INTERPRETER), INTERPRETER)
        g0, g1, g2 = _accumulate_pieces(dz, g0, g1, g2, w1_ptr, w2_ptr, d0, D, S, sw1d, sw2s, False, PRECISION,
                                        INTERPRETER, S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_D)
    _store_g(g0, g_ptr, b, 0, offs_c, S, C, INTERPRETER, IDX64, S_PIECE0)
    if S_PIECE1 > 0:
        _store_g(g1, g_ptr, b, s1, offs_c, S, C, INTERPRETER, IDX64, S_PIECE1)
    if S_PIECE2 > 0:
        _store_g(g2, g_ptr, b, s2, offs_c, S, C, INTERPRETER, IDX64, S_PIECE2)


@triton.jit
def _store_g(g, g_ptr, b, s0, offs_c, S, C, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, P: tl.constexpr):
    offs_s = s0 + tl.arange(0, P)
    off = _tile_offsets(b, offs_c, offs_s, S * C, 1, C, IDX64)
    tl.store(g_ptr + off, round_to(g, g_ptr.dtype.element_ty, INTERPRETER),
             mask=(offs_c < C)[:, None] & (offs_s < S)[None, :])


@triton.jit
def _dw_piece_inputs(z, da, w1_p, w2_p, x_ptr, do_ptr, b, s0, offs_c, S, C, sxb, sxs, sxc, sdb, sds, sdc, mean_ptr,
                     rstd_ptr, nw, nb, dtype: tl.constexpr, NORM: tl.constexpr, PART: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, P: tl.constexpr):
    """One token piece of a dW work item: its N(x)ᵀ and dOᵀ tiles (BLOCK_C, P), and Z += W1_p · N(x)_p,
    dA += W2ᵀ_p · dO_p (dA only where dW1 is computed)."""
    xn = _xn_t(x_ptr, b, s0, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM, INTERPRETER,
               IDX64, P)
    do = _operand(_load_t(do_ptr, b, s0, offs_c, S, C, sdb, sds, sdc, IDX64, P)[0], INTERPRETER)
    z = tl.dot(w1_p, tl.trans(xn), z, input_precision=PRECISION)
    if PART != _W2_GRAD:
        da = tl.dot(w2_p, tl.trans(do), da, input_precision=PRECISION)
    return xn, do, z, da


@triton.jit
def token_mlp_dw_kernel(
    x_ptr, do_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, B, SPLITS,
    dw1_ptr, dw2_ptr, db1_ptr,
    S: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
    sxb: tl.constexpr, sxs: tl.constexpr, sxc: tl.constexpr, sdb: tl.constexpr, sds: tl.constexpr, sdc: tl.constexpr,
    sw1d: tl.constexpr, sw1s: tl.constexpr, sw2s: tl.constexpr, sw2d: tl.constexpr,
    NORM: tl.constexpr, HAS_B1: tl.constexpr, APPROX_TANH: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, PART: tl.constexpr,
    S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial dW1 (D, S), db1 (D,) and dW2 (S, D) of one BLOCK_D slice of the hidden over the work items
    (image, channel tile) split, split + SPLITS, …, written to slot ``split`` of fp32 buffers (SPLITS, …)
    that the launcher sums in a fixed order (deterministic: no atomics). FlashAttention's dK/dV loop: the
    slice's W1 and W2ᵀ pieces stay in shared memory, each item recomputes Z = W1 · N(x) and
    dA = W2ᵀ · dO (BLOCK_D, BLOCK_C), and H, dZ are the register A operands of dW2ᵀ += H · dOᵀ and
    dW1 += dZ · N(x)ᵀ. PART: DW_BOTH, or DW1 (dW1, db1) / DW2 (dW2) where the two sets of
    accumulators do not fit in registers together."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    dtype = w1_ptr.dtype.element_ty
    s1 = S_PIECE0
    s2 = S_PIECE0 + S_PIECE1
    if HAS_B1:
        b1 = tl.load(b1_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    w1_0 = _w1_piece(w1_ptr, d0, 0, D, S, sw1d, BLOCK_D, S_PIECE0, INTERPRETER)
    w2_0 = _w2t_piece(w2_ptr, d0, 0, D, S, sw2s, BLOCK_D, S_PIECE0, INTERPRETER)
    dw1_0 = tl.zeros((BLOCK_D, S_PIECE0), dtype=tl.float32)
    dw2_0 = tl.zeros((BLOCK_D, S_PIECE0), dtype=tl.float32)
    if S_PIECE1 > 0:
        w1_1 = _w1_piece(w1_ptr, d0, s1, D, S, sw1d, BLOCK_D, S_PIECE1, INTERPRETER)
        w2_1 = _w2t_piece(w2_ptr, d0, s1, D, S, sw2s, BLOCK_D, S_PIECE1, INTERPRETER)
        dw1_1 = tl.zeros((BLOCK_D, S_PIECE1), dtype=tl.float32)
        dw2_1 = tl.zeros((BLOCK_D, S_PIECE1), dtype=tl.float32)
    if S_PIECE2 > 0:
        w1_2 = _w1_piece(w1_ptr, d0, s2, D, S, sw1d, BLOCK_D, S_PIECE2, INTERPRETER)
        w2_2 = _w2t_piece(w2_ptr, d0, s2, D, S, sw2s, BLOCK_D, S_PIECE2, INTERPRETER)
        dw1_2 = tl.zeros((BLOCK_D, S_PIECE2), dtype=tl.float32)
        dw2_2 = tl.zeros((BLOCK_D, S_PIECE2), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_c = tl.cdiv(C, BLOCK_C)
    for item in range(split, B * n_c, SPLITS):
        b = item // n_c
        offs_c = (item % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        nw, nb = _norm_vectors(nw_ptr, nb_ptr, offs_c, C)
        z = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
        da = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
        xn0, do0, z, da = _dw_piece_inputs(z, da, w1_0, w2_0, x_ptr, do_ptr, b, 0, offs_c, S, C, sxb, sxs, sxc,
                                           sdb, sds, sdc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM, PART, PRECISION,
                                           INTERPRETER, IDX64, S_PIECE0)
        if S_PIECE1 > 0:
            xn1, do1, z, da = _dw_piece_inputs(z, da, w1_1, w2_1, x_ptr, do_ptr, b, s1, offs_c, S, C, sxb, sxs,
                                               sxc, sdb, sds, sdc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM, PART,
                                               PRECISION, INTERPRETER, IDX64, S_PIECE1)
        if S_PIECE2 > 0:
            xn2, do2, z, da = _dw_piece_inputs(z, da, w1_2, w2_2, x_ptr, do_ptr, b, s2, offs_c, S, C, sxb, sxs,
                                               sxc, sdb, sds, sdc, mean_ptr, rstd_ptr, nw, nb, dtype, NORM, PART,
                                               PRECISION, INTERPRETER, IDX64, S_PIECE2)
        if HAS_B1:
            z += b1[:, None]
        if PART != _W1_GRADS:
            h = _operand(round_to(gelu(z, APPROX_TANH), w2_ptr.dtype.element_ty, INTERPRETER), INTERPRETER)
            dw2_0 = tl.dot(h, do0, dw2_0, input_precision=PRECISION)
            if S_PIECE1 > 0:
                dw2_1 = tl.dot(h, do1, dw2_1, input_precision=PRECISION)
            if S_PIECE2 > 0:
                dw2_2 = tl.dot(h, do2, dw2_2, input_precision=PRECISION)
        if PART != _W2_GRAD:
            dz = tl.where((offs_c < C)[None, :], da * gelu_grad(z, APPROX_TANH), 0.0)
            db1 += tl.sum(dz, axis=1)
            dz = _operand(round_to(dz, dtype, INTERPRETER), INTERPRETER)
            dw1_0 = tl.dot(dz, xn0, dw1_0, input_precision=PRECISION)
            if S_PIECE1 > 0:
                dw1_1 = tl.dot(dz, xn1, dw1_1, input_precision=PRECISION)
            if S_PIECE2 > 0:
                dw1_2 = tl.dot(dz, xn2, dw1_2, input_precision=PRECISION)
    if PART != _W2_GRAD:
        tl.store(db1_ptr + split.to(tl.int64) * D + offs_d, db1, mask=mask_d)
    _store_dw(dw1_0, dw2_0, dw1_ptr, dw2_ptr, split, offs_d, 0, S, D, PART, S_PIECE0)
    if S_PIECE1 > 0:
        _store_dw(dw1_1, dw2_1, dw1_ptr, dw2_ptr, split, offs_d, s1, S, D, PART, S_PIECE1)
    if S_PIECE2 > 0:
        _store_dw(dw1_2, dw2_2, dw1_ptr, dw2_ptr, split, offs_d, s2, S, D, PART, S_PIECE2)


@triton.jit
def _store_dw(dw1, dw2t, dw1_ptr, dw2_ptr, split, offs_d, s0, S, D, PART: tl.constexpr, P: tl.constexpr):
    """One token piece of slot ``split`` of the dW1 (SPLITS, D, S) and dW2 (SPLITS, S, D) partials."""
    offs_s = s0 + tl.arange(0, P)
    mask = (offs_d < D)[:, None] & (offs_s < S)[None, :]
    base = split.to(tl.int64) * D * S
    if PART != _W2_GRAD:
        tl.store(dw1_ptr + base + offs_d[:, None] * S + offs_s[None, :], dw1, mask=mask)
    if PART != _W1_GRADS:
        tl.store(dw2_ptr + base + offs_s[None, :] * D + offs_d[:, None], dw2t, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers


LAYERNORM, AFFINE = 1, 2  # the kernels' NORM (_LAYERNORM is the first's constexpr twin)
NORMS = {"layernorm": LAYERNORM, "affine": AFFINE}
DW_BOTH, DW1, DW2 = 0, 1, 2  # token_mlp_dw_kernel's PART: all gradients, dW1 and db1 (_W1_GRADS), dW2 (_W2_GRAD)
KERNELS = ("token_mlp_fwd", "token_mlp_dx", "token_mlp_dw")


def shape_constexprs(kernel: str, S: int, C: int, D: int, x_strides: Sequence[int], y_strides: Sequence[int],
                     w1_strides: Sequence[int], w2_strides: Sequence[int]) -> Dict[str, int]:
    """The token kernels' shapes and strides, which they take as constexprs (one compile per model shape;
    the batch size is no constexpr): x (B, S, C), y the output (forward) or dO (backward) (B, S, C), the
    aligned weight copies w1 (D, S) and w2 (S, D). As constexprs, jax-triton launches compile as torch's
    do: it gives integer arguments no divisibility hints, and without them these kernels loaded element
    by element, never pipelined and spilled 268-1 208 B (``mixer-fast report``, bench/NOTES.md)."""
    y = ("sob", "sos", "soc") if kernel == "token_mlp_fwd" else ("sdb", "sds", "sdc")
    return dict(S=S, C=C, D=D, **dict(zip(("sxb", "sxs", "sxc"), x_strides)), **dict(zip(y, y_strides)),
                sw1d=w1_strides[0], sw1s=w1_strides[1], sw2s=w2_strides[0], sw2d=w2_strides[1])


@dataclass(frozen=True)
class Features:
    """What a token MLP launch computes besides its shapes and tiles, as the kernels' constexprs: one
    description for the torch and the JAX launchers and the static report, so that the three compile the
    same kernel. ``norm`` "layernorm" or "affine"; ``approximate`` the GELU ("none" or "tanh");
    ``precision`` the dots' (_launch.precision); ``idx64`` 64-bit offsets (a tensor past 2³¹ elements).
    The last four are the forward's only (token_mlp_fwd_kernel's b2, layer scale, drop path, branch)."""

    norm: str = "layernorm"
    has_b1: bool = True
    approximate: str = "none"
    precision: str = "ieee"
    idx64: bool = False
    has_b2: bool = True
    has_scale: bool = False
    has_ss: bool = False
    store_branch: bool = False

    def constexprs(self, kernel: str, interpreter: bool) -> Dict[str, object]:
        """The flags of ``kernel`` (one of KERNELS); ``interpreter``: launched in Triton's interpreter."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
        flags: Dict[str, object] = dict(NORM=NORMS[self.norm], HAS_B1=self.has_b1,
                                        APPROX_TANH=self.approximate == "tanh", PRECISION=self.precision,
                                        INTERPRETER=interpreter, IDX64=self.idx64)
        if kernel == "token_mlp_fwd":
            flags.update(HAS_B2=self.has_b2, HAS_SCALE=self.has_scale, HAS_SS=self.has_ss,
                         STORE_BRANCH=self.store_branch)
        return flags


def launch_constexprs(kernel: str, plan: "Launch", features: Features, S: int, C: int, D: int,
                      x_strides: Sequence[int], y_strides: Sequence[int], w1_strides: Sequence[int],
                      w2_strides: Sequence[int], interpreter: bool) -> Dict[str, object]:
    """Every constexpr of a ``kernel`` launch (dW's PART aside): shapes and strides (shape_constexprs, its
    arguments), ``features``' flags and ``plan``'s tiles."""
    return {**shape_constexprs(kernel, S, C, D, x_strides, y_strides, w1_strides, w2_strides),
            **features.constexprs(kernel, interpreter), **plan.constexprs()}


def fwd_inputs(x, mean, rstd, nw, nb, w1, b1, w2, b2, scale, ss) -> list:
    """token_mlp_fwd_kernel's inputs in order, for torch tensors and jax arrays alike: x (B, S, C), mean and
    rstd (B·S,) or None (affine), nw / nb (C,) (the launchers' vec_or: never None), w1 / w2 the aligned
    copies (token_weights), b1 (D,), b2 (S,), scale (C,), ss (B,) or None. An absent one is passed as nw,
    which the kernel then does not read (its HAS_* flag is off)."""
    return [x, _or(mean, nw), _or(rstd, nw), nw, nb, w1, _or(b1, nw), w2, _or(b2, nw), _or(scale, nw), _or(ss, nw)]


def bwd_inputs(x, do, mean, rstd, nw, nb, w1, b1, w2) -> list:
    """token_mlp_dx_kernel's inputs, and the first nine of token_mlp_dw_kernel's (B and SPLITS follow): as
    :func:`fwd_inputs`, with do = dL/d(branch) (B, S, C) after the scale."""
    return [x, do, _or(mean, nw), _or(rstd, nw), nw, nb, w1, _or(b1, nw), w2]


def _or(t, placeholder):
    return placeholder if t is None else t


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of GRANULE (196 → 208)."""
    return -(-int(n) // GRANULE) * GRANULE


def s_pieces(S: int) -> Tuple[int, int, int]:
    """The token pieces (S_PIECE0, S_PIECE1, S_PIECE2): powers of two, largest first, 0 for an absent
    one, covering aligned(S): the two largest powers of two that fit, then the smallest that covers the
    rest (196 → (128, 64, 16); 49 → (64, 0, 0); 240 → (128, 64, 64); 256 → (256, 0, 0))."""
    rest, pieces = aligned(max(int(S), 1)), []
    while rest and len(pieces) < 2:
        pieces.append(1 << (rest.bit_length() - 1))
        rest -= pieces[-1]
    if rest:
        pieces.append(_launch.pow2(rest))
    return tuple(pieces + [0] * (3 - len(pieces)))  # type: ignore[return-value]


@dataclass(frozen=True)
class Launch:
    """The tiles of one token kernel launch, shared by the torch and the JAX launchers and by the static
    report: token pieces, BLOCK_C channels a program (a dW work item), BLOCK_D hidden units a step (a dW
    program's slice), warps, pipeline stages, and for token_mlp_dw the PARTs launched."""

    pieces: Tuple[int, int, int]
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int
    parts: Tuple[int, ...] = (DW_BOTH,)

    def constexprs(self) -> Dict[str, int]:
        p0, p1, p2 = self.pieces
        return dict(S_PIECE0=p0, S_PIECE1=p1, S_PIECE2=p2, BLOCK_C=self.block_c, BLOCK_D=self.block_d)

    def grid(self, B: int, C: int) -> Tuple[int, int]:
        """token_mlp_fwd / token_mlp_dx's grid: (B, cdiv(C, BLOCK_C)). Images on axis 0 because CUDA caps
        axes 1 and 2 at 65 535 and a batch can pass that (batch 65 536 of 16-token, 128-channel images is
        268 MB in bf16); axis 0 allows 2³¹ − 1. Every program reads the same weights and its own x strip,
        so the order costs no locality (and no index division, which the one-axis form measured +2 to +5
        registers for in the static report)."""
        return (B, triton.cdiv(C, self.block_c))

    def dw_grid(self, B: int, C: int, D: int, sms: int) -> Tuple[int, int]:
        """token_mlp_dw's grid (hidden slices, SPLITS) on a GPU of ``sms`` SMs: every slice's partials over
        :func:`dw_splits` shares of the B · cdiv(C, BLOCK_C) work items."""
        n_d = triton.cdiv(D, self.block_d)
        return n_d, max(1, dw_splits(n_d, B * triton.cdiv(C, self.block_c), sms))

    def label(self) -> str:
        return (f"S {'+'.join(str(p) for p in self.pieces if p)} C{self.block_c} D{self.block_d} "
                f"w{self.num_warps} s{self.num_stages}")


WGMMA_CAPABILITY = 90  # Hopper's: 16-bit dots on wgmma, which the plans below are tuned for
CONSUMER_BLACKWELL = 120  # sm_120 / sm_121: mma.sync again, and 99 KB a block


def mma_sync_plans(capability: int) -> bool:
    """Whether a GPU of compute capability ``capability`` takes the mma.sync plans: Ampere and Ada (8.x)
    and consumer Blackwell (12.x), which have no wgmma and 99-163 KB a block. At S = 196 in bf16 the Hopper
    dW plan needs 102 528 B compiled for sm_120, past its 101 376."""
    return capability < WGMMA_CAPABILITY or capability >= CONSUMER_BLACKWELL


def gpu_config(kernel: str, S: int, D: int, mma_bytes: int = 2, capability: int = WGMMA_CAPABILITY) -> Launch:
    """The launch of ``kernel`` (one of KERNELS) on a GPU of compute capability ``capability`` (90 for
    9.0) for S tokens and D hidden units, with weights (the MMA operands) of ``mma_bytes`` bytes an
    element (2: bf16 / fp16, with activations of that dtype or fp32 under torch.autocast; 4: fp32).

    Chosen with the static report (``mixer-fast report``, compiled as a launch specialises: pointers and
    16-divisible strides marked, so that the loads pipeline), triton 3.6 with CUDA 13's ptxas and triton
    3.8 with its own, sm_90a, bf16; sweeps in bench/NOTES.md. None is timed on a GPU yet.
    - Forward and dx at S = 196: BLOCK_C 64 (the MMA's M is 64 a warpgroup), BLOCK_D 32, 2 stages. The
      208-wide accumulator is 104 registers a thread on one warpgroup, and dx fits there (245-254
      registers, no spills, 104 KB of shared memory: two programs an SM, one's GELU overlapping the
      other's MMAs). The forward on one warpgroup is spill-free under triton 3.6 (254 registers) but
      spills 120 B under 3.8, so it runs on two (193-208 registers, 80 KB), which split the MMA's N and
      exchange Hᵀ through shared memory; (64, 16, 4 warps) is the one-warpgroup form clean under both.
      One 256-wide piece spills 384 B at these tiles, and BLOCK_D 64 spills 304 B.
    - dW at S = 196: two launches (dW1 with db1, then dW2), each recomputing Z: both accumulator sets
      together spill at every tile tried. dW1 is spill-free only on one 256-wide piece, BLOCK_C 16, 8
      warps, 3 stages (its three-piece forms spill 150-600 B: each piece's pipelined loads of x, dO and
      the statistics hold registers); dW2 runs at the same plan, so both share the image split.
    - torch.autocast (fp32 x, 16-bit weights): the same plans, spill-free with fp32 loads too.
    - S ≤ 64 (the /32 models, S = 49): a 64-wide piece; BLOCK_C 128 on two warpgroups for the forward
      and dx, and one dW launch at BLOCK_C 32 (98-174 registers).
    - S > 256 (no named model): the accumulator row no longer fits at BLOCK_C 64: 16-channel programs on
      mma.sync, which spill (FLASH_MAX_TOKENS: only MIXER_FAST_TOKEN=flash runs them there).
    - fp32 runs its "ieee" dots on the FMA units (never wgmma) and fits only 16 × 16 tiles; its dW at
      S ≤ 256 runs on the token pieces with 8 warps (spill-free; a 256-wide piece spilled KBs), and its
      forward at S ≤ 64 with 3 stages (2 spilled under triton 3.6 + ptxas 13.5)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    pieces, width = s_pieces(S), aligned(S)
    if mma_sync_plans(capability) and mma_bytes == 2 and 64 < width <= 256:
        # Ampere / Ada (mma.sync): the Hopper plans spilled 128 B (fwd), 856 B (dx) and 764-2 508 B (dW) at
        # S = 196 (report --arch sm_80, triton 3.6); these are clean at S = 100-256 in bf16 and fp16 under
        # triton 3.6 and 3.8 (sweep in bench/NOTES.md; dx spilled 8-56 B at 2 stages under 3.8, so it runs
        # unpipelined), and fit sm_86 / sm_89's 99 KB a block (at most 80 KB). Not timed on a GPU.
        if kernel == "token_mlp_dw":
            return Launch((_launch.pow2(S), 0, 0), 16, 32, 8, 2, (DW1, DW2))
        return Launch(pieces, 64, 16, 8, 2 if kernel == "token_mlp_fwd" else 1)
    if mma_bytes > 2 and width <= 256 and kernel == "token_mlp_dw":
        # fp32 dW on the token pieces, 8 warps: one 256-wide piece spilled 3.3-4.3 KB at 4 warps and
        # 284-336 B at 8 (report --dtype fp32); three pieces at 4 warps 648-1204 B; at S ≤ 64 4 warps
        # spilled 8 B under triton 3.6 + ptxas 13.5 (8 warps: 128 registers under both toolchains)
        return Launch(pieces, 16, 16, 8, 2, (DW1, DW2))
    if mma_bytes > 2 or width > 256:
        if kernel == "token_mlp_dw":
            return Launch((_launch.pow2(S), 0, 0), 16, 16, 4, 2, (DW1, DW2))
        # fp32's forward at S ≤ 64 spilled 40 B at 2 stages under triton 3.6 + ptxas 13.5 (72 registers at 3)
        return Launch(pieces, 16, 16, 4, 3 if kernel == "token_mlp_fwd" and width <= 64 else 2)
    if width <= 64:
        if kernel == "token_mlp_dw":
            return Launch(pieces, 32, 64, 8, 2)
        return Launch(pieces, 128, 64 if kernel == "token_mlp_fwd" else 32, 8, 2)
    if kernel == "token_mlp_dw":
        return Launch((_launch.pow2(S), 0, 0), 16, 64, 8, 3, (DW1, DW2))
    # dx on one 256-wide piece (S 241-256) spilled 128 B on one warpgroup (triton 3.6; 16-32 B under 3.8);
    # on two, 204-212 registers and none
    one_warpgroup = kernel == "token_mlp_dx" and pieces[0] < 256
    return Launch(pieces, 64, 32, 4 if one_warpgroup else 8, 2)


_OVERRIDES: Dict[str, Launch] = {}


@contextlib.contextmanager
def override_plan(kernel: str, launch: Launch) -> Iterator[None]:
    """Launch ``kernel`` (one of KERNELS) with ``launch`` instead of the planned one inside the block: for
    timing candidate tiles on a GPU (bench/gpu_check.py, ``--parts tiles``) and for testing other piece
    plans. Process-wide, not thread-safe; ``launch.pieces`` must cover S. While any override is active, a
    token launch that does not fit the device's shared memory (this kernel's or another's planned one)
    raises OutOfResources rather than fall back to the cuBLAS engine, and a shape already found not to fit
    runs on the flash kernels all the same: a candidate's timing must be the candidate's, and no launch may
    mark the shape as not fitting for the candidates after it."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    previous = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = launch
    try:
        yield
    finally:
        if previous is None:
            del _OVERRIDES[kernel]
        else:
            _OVERRIDES[kernel] = previous


def launch_plan(kernel: str, S: int, D: int, mma_bytes: int, capability: int = WGMMA_CAPABILITY) -> Launch:
    """The launch of ``kernel`` on a GPU of compute capability ``capability``: an :func:`override_plan`'s,
    gpu_config's, or in Triton's interpreter the same token pieces (so that CI runs the GPU's piece plan)
    with small tiles and the dW gradients in one launch."""
    if kernel in _OVERRIDES:
        launch = _OVERRIDES[kernel]
        if sum(launch.pieces) < S:
            raise ValueError(f"launch: token pieces {launch.pieces} do not cover S = {S}")
        return launch
    if _launch.INTERPRET:
        pieces = gpu_config(kernel, S, D, mma_bytes).pieces
        return Launch(pieces, 16 if kernel == "token_mlp_dw" else 32, 16, 4, 1)
    return gpu_config(kernel, S, D, mma_bytes, capability)


def token_weights(w1, w2, pad_columns):
    """(W1 (D, S), W2 (S, D)) as the token kernels read them, for the torch and the JAX launchers alike:
    unit column stride, a row stride that is a multiple of GRANULE elements, and zero columns from the
    width (S for W1, D for W2) up to ``aligned`` of it (_w1_piece, _w2t_piece rely on all three).
    ``pad_columns(w, width)`` returns ``w`` itself when it is laid out so already, else a zero-padded
    copy of that width: once per launch, D·aligned(S) + S·aligned(D) elements (W2 at D = 384 passes as
    it is; W1 at S = 196 is copied to row stride 208)."""
    D, S = w1.shape
    return pad_columns(w1, aligned(S)), pad_columns(w2, aligned(D))


def _pad_columns(w: Tensor, width: int) -> Tensor:
    """token_weights' ``pad_columns`` for torch tensors."""
    rows, cols = w.shape
    if cols == width and w.stride(1) == 1 and w.stride(0) % GRANULE == 0:
        return w
    out = w.new_zeros((rows, width))
    out[:, :cols] = w.detach()
    return out


DW_WAVES = 2  # the dW kernel's programs: two waves of one program an SM (its shared memory allows one)


def dw_splits(n_d_tiles: int, work: int, sms: int = _launch.DEFAULT_SMS) -> int:
    """Shares of the (image, channel tile) work items for the dW kernel: enough programs to fill a GPU of
    ``sms`` SMs (DW_WAVES waves of n_d_tiles × shares programs), each writing a deterministic partial."""
    if _launch.INTERPRET:
        return min(2, work)
    return max(1, min(work, DW_WAVES * sms // max(n_d_tiles, 1)))


# Which kernels run Mixer's token MLP:
# - TOKEN_FLASH: the flash-MLP kernels above (the hidden never in memory);
# - TOKEN_CUBLAS: torch's GEMMs on token-major operands with Triton passes around them (cublas_engine.py),
#   the fallback should the flash kernels not beat them on a GPU.
# Neither has been timed on a GPU (the flash kernels as rebuilt for issue 16; the 2026-11-27 H200 ran their
# predecessor at 1.75 ms, 0.58 ms with better tiles, against eager's 0.85-1.08 ms): bench/gpu_check.py times
# both (the ``triton_cublas`` provider); the faster becomes TOKEN_ENGINE. MIXER_FAST_TOKEN chooses per
# process. ResMLP's token linear is a GEMM, and follows matmul.gemm_engine(). The JAX path keeps the flash
# kernels (it has no cuBLAS engine), but for shapes past FLASH_MAX_TOKENS or the GPU's shared memory, which
# run as XLA's (mixer_fast.jax.triton_backend._runs_flash).
TOKEN_ENV = "MIXER_FAST_TOKEN"
TOKEN_FLASH, TOKEN_CUBLAS = "flash", "cublas"
TOKEN_ENGINE = TOKEN_FLASH

# The most tokens (aligned(S)) the flash kernels take unless MIXER_FAST_TOKEN=flash is set. Their plans are
# tuned, spill-free and on wgmma (16-bit) up to 256 tokens; past that every program holds accumulators
# across all S tokens, and the static report (sm_90a, triton 3.6 + ptxas 13.5, bf16, D 384; sweep in
# bench/NOTES.md) finds no clean plan: S = 324 spills 96-1 088 B at the tiles tried, S = 576 1.3-1.6 KB in
# dW, S = 784 2-25 KB, and fp32 at S = 576 37 KB in dx. Such token MLPs run on the cuBLAS engine, whose
# GEMMs do not depend on S that way; the explicit setting runs them on the flash kernels to time them.
# Neither is measured on a GPU at these shapes.
FLASH_MAX_TOKENS = 256


def token_engine() -> str:
    """MIXER_FAST_TOKEN, else TOKEN_ENGINE: TOKEN_FLASH or TOKEN_CUBLAS; any other value is refused by name."""
    return _launch.env_choice(TOKEN_ENV, TOKEN_ENGINE, (TOKEN_FLASH, TOKEN_CUBLAS))


def flash_planned(S: int) -> bool:
    """Whether a token MLP of S tokens may run on the flash kernels: ``aligned(S) ≤ FLASH_MAX_TOKENS``, or
    any S where MIXER_FAST_TOKEN=flash is set (shared memory permitting)."""
    return aligned(S) <= FLASH_MAX_TOKENS or os.environ.get(TOKEN_ENV) == TOKEN_FLASH


# Shapes whose flash plans need more shared memory than their device has: Triton raises OutOfResources
# when it loads such a kernel, before anything runs, and those token MLPs then run on the cuBLAS engine (the
# same saved tensors, so a backward follows either forward). The static report (sm_90a, triton 3.6) puts
# the edge at S = 1024 with 16-bit weights (dW's whole-S tiles: 172 KB, 205 KB under autocast; 344 KB at
# S = 1025) and at S = 512 in fp32 (169 KB; 337 KB at S = 513), against the 227 KB a block may use on an
# H100 / H200; other GPUs have less. Keyed by room_key().
_NO_ROOM: set = set()


def room_key(x: Tensor, fc1_weight: Tensor) -> tuple:
    """(device, S, x's dtype, the weights' dtype): what decides whether a flash plan fits."""
    return (str(x.device), x.shape[1], x.dtype, fc1_weight.dtype)


def on_cublas(fc2_weight: Optional[Tensor], key: tuple) -> bool:
    """Whether this token mixing runs on the cuBLAS engine: the MLP by token_engine(), past
    FLASH_MAX_TOKENS (:func:`flash_planned`), or where its flash plan was found not to fit (``key``,
    room_key()'s; not under an :func:`override_plan`); ResMLP's token linear (no fc2) by matmul.gemm_engine()."""
    if fc2_weight is None:
        return gemm_engine() == GEMM_CUBLAS
    # under an override_plan (a tile candidate being timed, on the flash kernels by MIXER_FAST_TOKEN) a shape
    # found not to fit still runs them: the candidate is timed, or fails, as itself
    return token_engine() == TOKEN_CUBLAS or not flash_planned(key[1]) or (key in _NO_ROOM and not _OVERRIDES)


def token_mixing_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], *,
    eps: float, approximate: str, norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor],
    store_branch: bool, allow_tf32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or None, branch (B, S, C) or None).

    ``branch`` is the MLP output before scale/sample_scale, kept only when ``store_branch`` (the
    backward needs it for the gradient of ``scale``). On the cuBLAS engine (:func:`on_cublas`),
    cublas_engine's (the same outputs)."""
    _launch.check_device(x)

    def on_engine():
        from . import cublas_engine

        return cublas_engine.token_mixing_forward(
            x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps, approximate=approximate,
            norm=norm, scale=scale, sample_scale=sample_scale, store_branch=store_branch, allow_tf32=allow_tf32)

    key = room_key(x, fc1_weight)
    if on_cublas(fc2_weight, key):
        return on_engine()
    B, S, C = x.shape
    out = _launch.new_output((B, S, C), x, x.dtype)
    branch = _launch.new_output(out.shape, out) if store_branch else None
    mean = rstd = None
    if norm == "layernorm":
        mean, rstd = layer_norm_stats(x, eps)
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    if B == 0:
        return out, mean, rstd, branch
    if fc2_weight is None:
        # ResMLP: one S×S linear per image, out_b = x_b + scale·ss_b·(W · N(x_b) + bias) — a GEMM over
        # M = S output tokens, N = (image, channel), K = S tokens, with the norm applied to the B tile.
        xs = x.stride()
        n_axis = split(C, xs[0], xs[2])
        o_axes = (flat(S, out.stride(1)), split(C, out.stride(0), out.stride(2)))
        fused_matmul(
            fc1_weight, (flat(S, fc1_weight.stride(0)), flat(S, fc1_weight.stride(1))),
            x, (flat(S, xs[1]), n_axis), out, o_axes, S, B * C, S, variant="token_linear",
            b_pro=B_TOKEN_LAYERNORM if norm == "layernorm" else B_AFFINE_N, b_vec=(nw, nb),
            b_stats=(mean, rstd) if mean is not None else None, bias=fc1_bias, bias_on_m=True,
            aux=branch, aux_axes=o_axes if branch is not None else None, store_branch=store_branch,
            scale=scale, ss=sample_scale, ss_on_n=True, res=x, res_axes=(flat(S, xs[1]), n_axis),
            approximate=approximate, allow_tf32=allow_tf32)
        return out, mean, rstd, branch
    D = fc1_weight.shape[0]
    plan = launch_plan("token_mlp_fwd", S, D, fc1_weight.element_size(), _launch.capability(x.device))
    w1, w2 = token_weights(fc1_weight, fc2_weight, _pad_columns)
    features = Features(norm=norm, has_b1=fc1_bias is not None, approximate=approximate,
                        precision=_launch.precision(fc1_weight.dtype, allow_tf32), idx64=_launch.needs_int64(x, out),
                        has_b2=fc2_bias is not None, has_scale=scale is not None, has_ss=sample_scale is not None,
                        store_branch=store_branch)
    try:
        with _launch.serialized():
            _launch.on_grid(token_mlp_fwd_kernel, plan.grid(B, C))(
                *fwd_inputs(x, mean, rstd, nw, nb, w1, fc1_bias, w2, fc2_bias, scale, sample_scale),
                out, branch if branch is not None else out,
                **launch_constexprs("token_mlp_fwd", plan, features, S, C, D, x.stride(), out.stride(),
                                    w1.stride(), w2.stride(), _launch.INTERPRET),
                num_warps=plan.num_warps, num_stages=plan.num_stages)
    except OutOfResources:  # the plan needs more shared memory than the device has; nothing ran
        if _OVERRIDES:
            raise
        _NO_ROOM.add(key)
        return on_engine()
    return out, mean, rstd, branch


def norm_grads(g: Tensor, x: Tensor, dout: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
               mean: Optional[Tensor], rstd: Optional[Tensor], norm: str) -> Dict[str, Optional[Tensor]]:
    """Every op's last backward step: {"x": dx, "norm_weight", "norm_bias": fp32, None for an absent
    parameter} from g = dL/dN(x) ((B·S, C) or a (B, S, C) view; fp32 or the weights' dtype) and the
    residual's dout."""
    if norm == "layernorm":
        dx, dnw, dnb = layer_norm_backward(g, x, dout, mean, rstd, norm_weight)
    else:
        dx, dnw, dnb = affine_backward(g, x, dout, norm_weight)
    return {"x": dx, "norm_weight": dnw if norm_weight is not None else None,
            "norm_bias": dnb if norm_bias is not None else None}


def token_mixing_backward(
    dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
    mean: Optional[Tensor], rstd: Optional[Tensor], branch: Optional[Tensor], *, eps: float, approximate: str,
    norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor], allow_tf32: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Gradients of token mixing for dout = dL/dout (B, S, C): keys x, norm_weight, norm_bias, fc1_weight,
    fc1_bias, fc2_weight, fc2_bias, scale (fp32 for parameters; cast by the caller). On the cuBLAS engine,
    cublas_engine's (either engine's backward follows either's forward)."""
    import torch

    def on_engine():
        from . import cublas_engine

        return cublas_engine.token_mixing_backward(
            dout, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, rstd, branch, eps=eps,
            approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale, allow_tf32=allow_tf32)

    key = room_key(x, fc1_weight)
    if on_cublas(fc2_weight, key):
        return on_engine()

    B, S, C = x.shape
    grads: Dict[str, Optional[Tensor]] = {}
    # dO in the weights' dtype (the autocast dtype, if any), scale's gradient, and the output bias's (fc1's
    # in the token linear, fc2's in the MLP) per token, in one pass over dout and branch
    out_bias = fc1_bias if fc2_weight is None else fc2_bias
    res = residual_grad(dout, scale=scale, sample_scale=sample_scale, branch=branch, dtype=fc1_weight.dtype,
                        bias=PER_TOKEN if out_bias is not None else None)
    do = res.do
    grads["scale"] = res.scale
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    prec = _launch.precision(fc1_weight.dtype, allow_tf32)
    if fc2_weight is None:
        # dL/dN(x) in the weights' dtype, as eager rounds it (and as the flash-MLP path keeps it)
        g = _launch.new_output((B * S, C), x, fc1_weight.dtype)
        ws, ds, xs = fc1_weight.stride(), do.stride(), x.stride()
        fused_matmul(fc1_weight, (flat(S, ws[1]), flat(S, ws[0])), do, (flat(S, ds[1]), split(C, ds[0], ds[2])),
                     g, (flat(S, C), split(C, S * C, 1)), S, B * C, S, variant="plain", allow_tf32=allow_tf32)
        xn_src, b_pro, b_vec = x, B_AFFINE_K, (nw, nb)
        if norm == "layernorm":
            # Rare combination (no named model uses it): normalise once here rather than add a kernel mode.
            xn_src = torch.nn.functional.layer_norm(x, (C,), norm_weight, norm_bias, eps).to(fc1_weight.dtype)
            b_pro, b_vec = B_NONE, None
        xs = xn_src.stride()
        dw = _launch.new_output((S, S), x, torch.float32)
        fused_matmul(do, (flat(S, ds[1]), split(C, ds[0], ds[2])), xn_src, (split(C, xs[0], xs[2]), flat(S, xs[1])),
                     dw, (flat(S, S), flat(S, 1)), S, S, B * C, variant="ln_b", b_pro=b_pro, b_vec=b_vec, allow_tf32=allow_tf32)
        grads["fc1_weight"] = dw
        grads["fc1_bias"] = res.bias
    else:
        D = fc1_weight.shape[0]
        # dL/dN(x) rounded to the weights' dtype, as eager's autograd hands it to the norm's backward (a
        # 16-bit tensor there too): half the bytes of fp32 to write and read back, and to hold.
        g = _launch.new_output((B * S, C), x, fc1_weight.dtype)
        features = Features(norm=norm, has_b1=fc1_bias is not None, approximate=approximate, precision=prec,
                            idx64=_launch.needs_int64(x, do, g))
        w1, w2 = token_weights(fc1_weight, fc2_weight, _pad_columns)
        inputs = bwd_inputs(x, do, mean, rstd, nw, nb, w1, fc1_bias, w2)
        strides = (x.stride(), do.stride(), w1.stride(), w2.stride())
        capability = _launch.capability(x.device)
        plan = launch_plan("token_mlp_dx", S, D, fc1_weight.element_size(), capability)
        try:
            if B:
                with _launch.serialized():
                    _launch.on_grid(token_mlp_dx_kernel, plan.grid(B, C))(
                        *inputs, g, **launch_constexprs("token_mlp_dx", plan, features, S, C, D, *strides,
                                                        _launch.INTERPRET),
                        num_warps=plan.num_warps, num_stages=plan.num_stages)
            plan = launch_plan("token_mlp_dw", S, D, fc1_weight.element_size(), capability)
            grid = plan.dw_grid(B, C, D, _launch.sm_count(x.device))
            splits = grid[1]
            dw1 = _launch.new_output((splits, D, S), x, torch.float32)
            dw2 = _launch.new_output((splits, S, D), x, torch.float32)
            db1 = _launch.new_output((splits, D), x, torch.float32)
            meta = launch_constexprs("token_mlp_dw", plan, features, S, C, D, *strides, _launch.INTERPRET)
            for part in plan.parts:  # runs with B = 0 too: it writes the zero gradients
                with _launch.serialized():
                    _launch.on_grid(token_mlp_dw_kernel, grid)(*inputs, B, splits, dw1, dw2, db1, **meta, PART=part,
                                                               num_warps=plan.num_warps, num_stages=plan.num_stages)
        except OutOfResources:  # a plan needs more shared memory than the device has: the whole backward there
            if _OVERRIDES:
                raise
            _NO_ROOM.add(key)
            return on_engine()
        grads["fc1_weight"], grads["fc2_weight"] = dw1.sum(0), dw2.sum(0)
        grads["fc1_bias"] = db1.sum(0) if fc1_bias is not None else None
        grads["fc2_bias"] = res.bias
    grads.update(norm_grads(g, x, dout, norm_weight, norm_bias, mean, rstd, norm))
    return grads
