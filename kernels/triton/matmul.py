"""One GEMM kernel with the prologues and epilogues that the mixing ops ride on.

    out[m, n] = epilogue( Σ_k  pro_A(A)[m, k] · pro_B(B)[k, n] )

Every operand index is decomposed as ``i → (i // inner) * stride_outer + (i % inner) * stride_inner``, so
an axis can span two tensor dims, e.g. the token axis (b, s) of a (B, S, C) tensor with arbitrary
strides, or a (b, c) axis for ResMLP's per-image token linear. No input is ever copied to make it
contiguous and no transpose is materialised. Offsets are computed in int64.

Prologues (applied to each loaded tile in fp32, then rounded to the *other* operand's dtype, as eager does:
under torch.autocast an fp32 activation meets a 16-bit weight, and the normalised tile is what autocast
would have cast), named by the constants below (the kernel's A_PRO / B_PRO):
    A: A_NONE | A_LAYERNORM (row stats per m, weight/bias per k) | A_AFFINE (per k)
       | A_LAYERNORM_FOLDED (LayerNorm folded into B and the epilogue: A is read as it is, B holds
       W ⊙ w, and the epilogue applies rstd · (acc − mean · u[n]) with ``a_w`` = u; channel_mixing.fc1_operands)
    B: B_NONE | B_LAYERNORM (stats per k, weight/bias per n) | B_AFFINE_N (affine per n) | B_AFFINE_K (per k)
       | B_GELU | B_TOKEN_LAYERNORM (the per-image token linear: stats of token (n // inner, k), weight/bias
       per n) | B_GATE_LAYERNORM (GELU then LayerNorm for gMLP's gate, B[k = (image, channel), n = token]:
       stats of token (k // inner, n), weight/bias per k % inner; the gate's weight gradient from the saved
       pre-activation)
Epilogue, in order: the folded LayerNorm (A_LAYERNORM_FOLDED), + bias (per n, or per m), store to
``aux`` (the pre-activation, or the branch before scale), GELU or × GELU'(aux), × scale[n % inner],
× sample_scale[sample], + residual (or × ``res``: gMLP's u ⊙ gate, RES_MUL).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import gelu, gelu_grad, round_to

if TYPE_CHECKING:  # torch loads when a launcher runs; the JAX path (jax_launch.py) never needs it
    import torch

    Tensor = torch.Tensor


# Prologue codes (the kernel's A_PRO / B_PRO; module docstring). Python ints for the launchers, tl.constexpr
# twins (leading underscore) for the kernel, which may read only constexpr globals.
A_NONE, A_LAYERNORM, A_AFFINE, A_LAYERNORM_FOLDED = 0, 1, 2, 3
B_NONE, B_LAYERNORM, B_AFFINE_N, B_AFFINE_K, B_GELU, B_TOKEN_LAYERNORM, B_GATE_LAYERNORM = 0, 1, 2, 3, 4, 5, 6
_A_NONE, _A_LAYERNORM = tl.constexpr(A_NONE), tl.constexpr(A_LAYERNORM)
_A_LAYERNORM_FOLDED = tl.constexpr(A_LAYERNORM_FOLDED)
_B_NONE, _B_LAYERNORM, _B_AFFINE_N = tl.constexpr(B_NONE), tl.constexpr(B_LAYERNORM), tl.constexpr(B_AFFINE_N)
_B_AFFINE_K, _B_TOKEN_LAYERNORM = tl.constexpr(B_AFFINE_K), tl.constexpr(B_TOKEN_LAYERNORM)
_B_GATE_LAYERNORM = tl.constexpr(B_GATE_LAYERNORM)
# How an operand's tiles are loaded (the kernel's A_TMA / B_TMA): by pointers (TMA_NONE), or by the Hopper
# tensor-memory accelerator through a tensor descriptor over the operand as stored, whose contiguous inner
# dim is K (TMA_K_INNER) or the operand's other axis (TMA_K_OUTER; the tile is transposed after the load).
TMA_NONE, TMA_K_INNER, TMA_K_OUTER = 0, 1, 2
_TMA_NONE, _TMA_K_INNER, _TMA_K_OUTER = tl.constexpr(TMA_NONE), tl.constexpr(TMA_K_INNER), tl.constexpr(TMA_K_OUTER)


@triton.jit
def _offsets(i, inner, stride_outer, stride_inner, SPLIT: tl.constexpr, IDX64: tl.constexpr):
    # Division in int32 (indices < 2³¹; int64 division is a slow, register-hungry software routine), and
    # only for axes that really span two dims. Offsets are int64 only when a tensor of the launch spans
    # 2³¹ elements or more (IDX64, set by the launcher): 2-D int64 offsets cost twice the registers.
    if IDX64:
        i = i.to(tl.int64)
    if SPLIT:
        return (i // inner) * stride_outer + (i % inner) * stride_inner
    else:
        return i * stride_inner


@triton.jit
def fused_matmul_kernel(
    a_ptr, b_ptr, aux_in_ptr, res_ptr,
    a_mean_ptr, a_rstd_ptr, a_w_ptr, a_b_ptr,
    b_mean_ptr, b_rstd_ptr, b_w_ptr, b_b_ptr,
    bias_ptr, scale_ptr, ss_ptr,
    M, N, K,
    a_mi, a_smo, a_smi, a_ki, a_sko, a_ski,
    b_ki, b_sko, b_ski, b_ni, b_sno, b_sni,
    o_mi, o_smo, o_smi, o_ni, o_sno, o_sni,
    x_smo, x_smi, x_sno, x_sni,
    r_smo, r_smi, r_sno, r_sni,
    k_len, o_split,
    out_ptr, aux_out_ptr, col_sum_ptr,
    A_PRO: tl.constexpr, B_PRO: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_ON_M: tl.constexpr,
    EPI_GELU: tl.constexpr, EPI_GELU_GRAD: tl.constexpr, STORE_BRANCH: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SS: tl.constexpr, SS_ON_N: tl.constexpr, HAS_RES: tl.constexpr,
    RES_MUL: tl.constexpr, APPROX_TANH: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    A_M_SPLIT: tl.constexpr, A_K_SPLIT: tl.constexpr, B_K_SPLIT: tl.constexpr, B_N_SPLIT: tl.constexpr,
    O_M_SPLIT: tl.constexpr, O_N_SPLIT: tl.constexpr, X_M_SPLIT: tl.constexpr, X_N_SPLIT: tl.constexpr,
    R_M_SPLIT: tl.constexpr, R_N_SPLIT: tl.constexpr, IDX64: tl.constexpr, K_SPLIT: tl.constexpr,
    EPI_SUBTILE: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr, SCALED16: tl.constexpr,
    COL_SUM: tl.constexpr, COL_SUM_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Parameters run inputs, scalars, outputs, constexprs (jax-triton's order, so JAX launches this kernel
    # itself). The aux tensor is an output where the epilogue stores the pre-activation or branch
    # (STORE_BRANCH) and an input where it reads GELU'(aux) (EPI_GELU_GRAD); jax-triton needs the two
    # apart, and a launch never sets both.
    if STORE_BRANCH:
        aux_ptr = aux_out_ptr
    else:
        aux_ptr = aux_in_ptr
    # SCALED16: a bit per integer argument, in order, that came divided by 16 (plan: scale_scalars). Known
    # multiples of 16 again after the multiply, as Triton's own launcher marks them: jax-triton gives
    # integer arguments no divisibility hints, and without them the loads are neither vectorised nor
    # pipelined (at the 128-row tiles: 110-4156 B of spills, one stage of shared memory; bench/NOTES.md).
    M, N, K = _x16(M, SCALED16, 0), _x16(N, SCALED16, 1), _x16(K, SCALED16, 2)
    a_mi, a_smo, a_smi = _x16(a_mi, SCALED16, 3), _x16(a_smo, SCALED16, 4), _x16(a_smi, SCALED16, 5)
    a_ki, a_sko, a_ski = _x16(a_ki, SCALED16, 6), _x16(a_sko, SCALED16, 7), _x16(a_ski, SCALED16, 8)
    b_ki, b_sko, b_ski = _x16(b_ki, SCALED16, 9), _x16(b_sko, SCALED16, 10), _x16(b_ski, SCALED16, 11)
    b_ni, b_sno, b_sni = _x16(b_ni, SCALED16, 12), _x16(b_sno, SCALED16, 13), _x16(b_sni, SCALED16, 14)
    o_mi, o_smo, o_smi = _x16(o_mi, SCALED16, 15), _x16(o_smo, SCALED16, 16), _x16(o_smi, SCALED16, 17)
    o_ni, o_sno, o_sni = _x16(o_ni, SCALED16, 18), _x16(o_sno, SCALED16, 19), _x16(o_sni, SCALED16, 20)
    x_smo, x_smi = _x16(x_smo, SCALED16, 21), _x16(x_smi, SCALED16, 22)
    x_sno, x_sni = _x16(x_sno, SCALED16, 23), _x16(x_sni, SCALED16, 24)
    r_smo, r_smi = _x16(r_smo, SCALED16, 25), _x16(r_smi, SCALED16, 26)
    r_sno, r_sni = _x16(r_sno, SCALED16, 27), _x16(r_sni, SCALED16, 28)
    k_len, o_split = _x16(k_len, SCALED16, 29), _x16(o_split, SCALED16, 30)
    # With A_TMA / B_TMA the operand is a tensor descriptor (the launcher's, block (BLOCK_M or BLOCK_N,
    # BLOCK_K) in its layout): loads need no addresses or masks (outside the tensor TMA reads zeros), which
    # frees the registers and issue slots that pointer loads spend on them.
    if A_TMA == _TMA_NONE:
        a_ty = a_ptr.dtype.element_ty
    else:
        a_ty = a_ptr.dtype
    if B_TMA == _TMA_NONE:
        b_ty = b_ptr.dtype.element_ty
    else:
        b_ty = b_ptr.dtype
    # Grouped tile order: GROUP_M row-tiles share each column of B while it is in L2. With K_SPLIT the
    # second grid axis splits K (plan: split_k): program (tile, s) sums K range [s·k_len, (s + 1)·k_len)
    # into slice s of the output, o_split elements on; the launcher adds the slices in a fixed order (no
    # atomics). A constexpr, so that launches without it compile as before (the range bounds cost the
    # epilogue-heavy configs up to 120 B of spills under triton 3.8).
    pid = tl.program_id(0)
    if K_SPLIT:
        k_part = tl.program_id(1)
        k_start = k_part * k_len
        k_end = tl.minimum(K, k_start + k_len)
    else:
        k_start = 0
        k_end = K
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    if A_TMA == _TMA_NONE:
        a_row = _offsets(rm, a_mi, a_smo, a_smi, A_M_SPLIT, IDX64)
    if B_TMA == _TMA_NONE:
        b_col = _offsets(rn, b_ni, b_sno, b_sni, B_N_SPLIT, IDX64)
    if A_PRO == _A_LAYERNORM:
        a_mean = tl.load(a_mean_ptr + rm, mask=mask_m, other=0.0)
        a_rstd = tl.load(a_rstd_ptr + rm, mask=mask_m, other=0.0)
    if B_PRO == _B_LAYERNORM or B_PRO == _B_AFFINE_N or B_PRO == _B_TOKEN_LAYERNORM:
        b_wn = tl.load(b_w_ptr + rn % b_ni, mask=mask_n, other=0.0).to(tl.float32)
        b_bn = tl.load(b_b_ptr + rn % b_ni, mask=mask_n, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < k_end
        a_mask = mask_m[:, None] & mask_k[None, :]
        b_mask = mask_k[:, None] & mask_n[None, :]
        # A descriptor load may run past k_end into the next K range of a split: never, since a range is a
        # multiple of SPLIT_K_GRANULE, itself a multiple of every BLOCK_K; past K it reads zeros.
        if A_TMA == _TMA_K_INNER:
            a = a_ptr.load([pid_m * BLOCK_M, k0])
        elif A_TMA == _TMA_K_OUTER:
            a = tl.trans(a_ptr.load([k0, pid_m * BLOCK_M]))
        else:
            a = tl.load(a_ptr + a_row[:, None] + _offsets(rk, a_ki, a_sko, a_ski, A_K_SPLIT, IDX64)[None, :],
                        mask=a_mask, other=0.0)
        if B_TMA == _TMA_K_INNER:
            b = tl.trans(b_ptr.load([pid_n * BLOCK_N, k0]))
        elif B_TMA == _TMA_K_OUTER:
            b = b_ptr.load([k0, pid_n * BLOCK_N])
        else:
            b = tl.load(b_ptr + _offsets(rk, b_ki, b_sko, b_ski, B_K_SPLIT, IDX64)[:, None] + b_col[None, :],
                        mask=b_mask, other=0.0)
        if A_PRO != _A_NONE and A_PRO != _A_LAYERNORM_FOLDED:
            af = a.to(tl.float32)
            wk = tl.load(a_w_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
            bk = tl.load(a_b_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
            if A_PRO == _A_LAYERNORM:
                af = (af - a_mean[:, None]) * a_rstd[:, None]
            af = af * wk[None, :] + bk[None, :]
            a = round_to(tl.where(a_mask, af, 0.0), b_ty, INTERPRETER)
        if B_PRO != _B_NONE:
            bf = b.to(tl.float32)
            if B_PRO == _B_LAYERNORM:
                mk = tl.load(b_mean_ptr + rk, mask=mask_k, other=0.0)
                sk = tl.load(b_rstd_ptr + rk, mask=mask_k, other=0.0)
                bf = (bf - mk[:, None]) * sk[:, None] * b_wn[None, :] + b_bn[None, :]
            elif B_PRO == _B_AFFINE_N:
                bf = bf * b_wn[None, :] + b_bn[None, :]
            elif B_PRO == _B_TOKEN_LAYERNORM:
                # Per-image token linear (ResMLP layout) with LayerNorm: B[k = token, n = (image, channel)]
                # needs the stats of token (n // b_ni, k).
                st = (rn // b_ni)[None, :] * K + rk[:, None]
                if IDX64:
                    st = st.to(tl.int64)
                mk = tl.load(b_mean_ptr + st, mask=b_mask, other=0.0)
                sk = tl.load(b_rstd_ptr + st, mask=b_mask, other=0.0)
                bf = (bf - mk) * sk * b_wn[None, :] + b_bn[None, :]
            elif B_PRO == _B_AFFINE_K:
                wk = tl.load(b_w_ptr + rk % b_ki, mask=mask_k, other=0.0).to(tl.float32)
                bk = tl.load(b_b_ptr + rk % b_ki, mask=mask_k, other=0.0).to(tl.float32)
                bf = bf * wk[:, None] + bk[:, None]
            elif B_PRO == _B_GATE_LAYERNORM:
                # gMLP's gate input v = GELU(z_v), rounded to z's dtype as the forward stored it (its
                # statistics were taken of the rounded values), then normalised per (image, token).
                bf = round_to(gelu(bf, APPROX_TANH), b_ty, INTERPRETER).to(tl.float32)
                st = (rk // b_ki)[:, None] * N + rn[None, :]
                if IDX64:
                    st = st.to(tl.int64)
                mk = tl.load(b_mean_ptr + st, mask=b_mask, other=0.0)
                sk = tl.load(b_rstd_ptr + st, mask=b_mask, other=0.0)
                wk = tl.load(b_w_ptr + rk % b_ki, mask=mask_k, other=0.0).to(tl.float32)
                bk = tl.load(b_b_ptr + rk % b_ki, mask=mask_k, other=0.0).to(tl.float32)
                bf = (bf - mk) * sk * wk[:, None] + bk[:, None]
            else:  # B_GELU
                bf = gelu(bf, APPROX_TANH)
            b = round_to(tl.where(b_mask, bf, 0.0), a_ty, INTERPRETER)
        if INTERPRETER:  # Triton's interpreter mis-multiplies bf16 dots; products of bf16/fp16 are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if K_SPLIT:
        if IDX64:
            out_ptr += k_part.to(tl.int64) * o_split
        else:
            out_ptr += k_part * o_split
    if EPI_SUBTILE:
        # The epilogue on two column halves in turn: its temporaries (GELU, the stored pre-activation,
        # the residual tile) for half the tile at a time, so that a 128 × 256 tile does not spill.
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc_lo, acc_hi = tl.split(halves)
        rn_lo = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _epilogue(acc_lo, rm, rn_lo, M, N, out_ptr, aux_ptr, res_ptr, bias_ptr, scale_ptr, ss_ptr,
                  o_mi, o_smo, o_smi, o_ni, o_sno, o_sni, x_smo, x_smi, x_sno, x_sni, r_smo, r_smi, r_sno, r_sni,
                  HAS_BIAS, BIAS_ON_M, EPI_GELU, EPI_GELU_GRAD, STORE_BRANCH, HAS_SCALE, HAS_SS, SS_ON_N, HAS_RES,
                  RES_MUL, APPROX_TANH, INTERPRETER, O_M_SPLIT, O_N_SPLIT, X_M_SPLIT, X_N_SPLIT, R_M_SPLIT,
                  R_N_SPLIT, IDX64, col_sum_ptr, pid_m, COL_SUM, COL_SUM_ROWS, a_mean_ptr, a_rstd_ptr, a_w_ptr,
                  A_PRO)
        _epilogue(acc_hi, rm, rn_lo + BLOCK_N // 2, M, N, out_ptr, aux_ptr, res_ptr, bias_ptr, scale_ptr, ss_ptr,
                  o_mi, o_smo, o_smi, o_ni, o_sno, o_sni, x_smo, x_smi, x_sno, x_sni, r_smo, r_smi, r_sno, r_sni,
                  HAS_BIAS, BIAS_ON_M, EPI_GELU, EPI_GELU_GRAD, STORE_BRANCH, HAS_SCALE, HAS_SS, SS_ON_N, HAS_RES,
                  RES_MUL, APPROX_TANH, INTERPRETER, O_M_SPLIT, O_N_SPLIT, X_M_SPLIT, X_N_SPLIT, R_M_SPLIT,
                  R_N_SPLIT, IDX64, col_sum_ptr, pid_m, COL_SUM, COL_SUM_ROWS, a_mean_ptr, a_rstd_ptr, a_w_ptr,
                  A_PRO)
    else:
        _epilogue(acc, rm, rn, M, N, out_ptr, aux_ptr, res_ptr, bias_ptr, scale_ptr, ss_ptr,
                  o_mi, o_smo, o_smi, o_ni, o_sno, o_sni, x_smo, x_smi, x_sno, x_sni, r_smo, r_smi, r_sno, r_sni,
                  HAS_BIAS, BIAS_ON_M, EPI_GELU, EPI_GELU_GRAD, STORE_BRANCH, HAS_SCALE, HAS_SS, SS_ON_N, HAS_RES,
                  RES_MUL, APPROX_TANH, INTERPRETER, O_M_SPLIT, O_N_SPLIT, X_M_SPLIT, X_N_SPLIT, R_M_SPLIT,
                  R_N_SPLIT, IDX64, col_sum_ptr, pid_m, COL_SUM, COL_SUM_ROWS, a_mean_ptr, a_rstd_ptr, a_w_ptr,
                  A_PRO)


@triton.jit
def _x16(v, SCALED16: tl.constexpr, I: tl.constexpr):
    """Integer argument I of the fused GEMM as the launcher meant it: v · 16 where SCALED16's bit I is set."""
    if (SCALED16 >> I) & 1:
        return v * 16
    else:
        return v


@triton.jit
def _epilogue(acc, rm, rn, M, N, out_ptr, aux_ptr, res_ptr, bias_ptr, scale_ptr, ss_ptr,
              o_mi, o_smo, o_smi, o_ni, o_sno, o_sni, x_smo, x_smi, x_sno, x_sni, r_smo, r_smi, r_sno, r_sni,
              HAS_BIAS: tl.constexpr, BIAS_ON_M: tl.constexpr, EPI_GELU: tl.constexpr, EPI_GELU_GRAD: tl.constexpr,
              STORE_BRANCH: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SS: tl.constexpr, SS_ON_N: tl.constexpr,
              HAS_RES: tl.constexpr, RES_MUL: tl.constexpr, APPROX_TANH: tl.constexpr, INTERPRETER: tl.constexpr,
              O_M_SPLIT: tl.constexpr, O_N_SPLIT: tl.constexpr, X_M_SPLIT: tl.constexpr, X_N_SPLIT: tl.constexpr,
              R_M_SPLIT: tl.constexpr, R_N_SPLIT: tl.constexpr, IDX64: tl.constexpr, col_sum_ptr, pid_m,
              COL_SUM: tl.constexpr, COL_SUM_ROWS: tl.constexpr, a_mean_ptr, a_rstd_ptr, a_w_ptr,
              A_PRO: tl.constexpr):
    """The epilogue of one (rows rm, columns rn) tile of the accumulator (module docstring), and its store;
    with COL_SUM also the column sums of what it stores, one partial row per COL_SUM_ROWS rows."""
    mask_m = rm < M
    mask_n = rn < N
    mask = mask_m[:, None] & mask_n[None, :]
    if A_PRO == _A_LAYERNORM_FOLDED:
        # acc = Σ_k x[m, k] · w[k] · W[n, k] = (Σ_k x̂[m, k] · w[k] · W[n, k]) / rstd + mean · u[n]: undone per
        # row (LN's bias went into the GEMM's bias, W · b).
        # The statistics are loaded here, not before the K loop, so they hold no registers through it.
        mean = tl.load(a_mean_ptr + rm, mask=mask_m, other=0.0)
        rstd = tl.load(a_rstd_ptr + rm, mask=mask_m, other=0.0)
        u = tl.load(a_w_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc = (acc - mean[:, None] * u[None, :]) * rstd[:, None]
    if HAS_BIAS:
        if BIAS_ON_M:
            acc += tl.load(bias_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        else:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    o_row = _offsets(rm, o_mi, o_smo, o_smi, O_M_SPLIT, IDX64)
    o_col = _offsets(rn, o_ni, o_sno, o_sni, O_N_SPLIT, IDX64)
    if STORE_BRANCH or EPI_GELU_GRAD:
        x_off = _offsets(rm, o_mi, x_smo, x_smi, X_M_SPLIT, IDX64)[:, None] + _offsets(rn, o_ni, x_sno, x_sni, X_N_SPLIT, IDX64)[None, :]
    if STORE_BRANCH:  # the pre-activation (with EPI_GELU) or the branch before scale
        tl.store(aux_ptr + x_off, round_to(acc, aux_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    if EPI_GELU:
        # GELU of the pre-activation as stored (rounded to the output dtype), as eager applies it to the
        # linear layer's rounded output: a backward that recomputes GELU from the stored Z then sees the
        # forward's exact values (gMLP normalises them; over a narrow gate a 1-ulp mismatch is amplified).
        acc = gelu(round_to(acc, out_ptr.dtype.element_ty, INTERPRETER).to(tl.float32), APPROX_TANH)
    if EPI_GELU_GRAD:
        z = tl.load(aux_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        acc = acc * gelu_grad(z, APPROX_TANH)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn % o_ni, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SS:
        if SS_ON_N:
            acc *= tl.load(ss_ptr + rn // o_ni, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            acc *= tl.load(ss_ptr + rm // o_mi, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:
        r_off = _offsets(rm, o_mi, r_smo, r_smi, R_M_SPLIT, IDX64)[:, None] + _offsets(rn, o_ni, r_sno, r_sni, R_N_SPLIT, IDX64)[None, :]
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        if RES_MUL:
            acc *= r
        else:
            acc += r
    val = round_to(acc, out_ptr.dtype.element_ty, INTERPRETER)
    tl.store(out_ptr + o_row[:, None] + o_col[None, :], val, mask=mask)
    if COL_SUM:
        # A bias gradient as per-tile partial sums (dz's column sums for fc1's bias): of the values as
        # stored, which eager's dz.sum(0) adds, with no second pass over the (M, N) output. A fixed
        # COL_SUM_ROWS, not BLOCK_M, sets the partials' rows, so that every config of a launch site fills
        # the same (cdiv(M, COL_SUM_ROWS), N) buffer (JAX allocates it before Triton's autotuner picks one).
        PARTS: tl.constexpr = rm.shape[0] // COL_SUM_ROWS
        v = tl.where(mask, val.to(tl.float32), 0.0)
        part = tl.sum(tl.reshape(v, (PARTS, COL_SUM_ROWS, rn.shape[0])), axis=1)
        rows = pid_m * PARTS + tl.arange(0, PARTS)
        if IDX64:
            rows = rows.to(tl.int64)
        tl.store(col_sum_ptr + rows[:, None] * N + rn[None, :], part,
                 mask=(rows * COL_SUM_ROWS < M)[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launcher


@dataclass(frozen=True)
class Axis:
    """How one logical GEMM axis maps to memory: i → (i // inner) · outer + (i % inner) · stride.

    ``inner`` also gives the per-channel / per-sample indexing of the epilogue vectors; ``split`` is
    False when the two dims collapse into one stride (the kernel then skips the division)."""

    inner: int
    outer: int
    stride: int
    split: bool


def flat(size: int, stride: int) -> Axis:
    """A plain axis of ``size`` elements ``stride`` apart."""
    return Axis(max(int(size), 1), 0, int(stride), False)


def split(inner: int, outer_stride: int, inner_stride: int) -> Axis:
    """An axis spanning two tensor dims: (outer, inner) with the inner dim of ``inner`` elements."""
    inner = max(int(inner), 1)
    return Axis(inner, int(outer_stride), int(inner_stride), int(outer_stride) != inner * int(inner_stride))


_DUMMY = {}


def _dummy(device: torch.device) -> torch.Tensor:
    import torch

    if device not in _DUMMY:
        _DUMMY[device] = torch.zeros(1, device=device)
    return _DUMMY[device]


# Per launch site: the flags the static report compiles (the heaviest combination the site uses) and the
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) configs the tuner may choose on a GPU. Listed: configs
# that compile for sm_90a with wgmma and without register spills under triton 3.8 (dev machines) and 3.6
# with CUDA 13's ptxas (the lent GPU machines), specialised as a launch at the named models' shapes
# (``mixer-fast report``: aot.gemm_ints; bench/NOTES.md has the sweeps). Specialised, 128 × 128 fits every
# site (the unspecialised compile, which Triton never runs, spilled there); 128 × 256 fits the
# epilogue-free sites, and with the epilogue on two column halves (epi_subtile) ln_gelu, residual and
# token_linear (at BLOCK_K 32) too; gelu_grad still spills 32-40 B there.
# The gMLP gate sites at gMLP-S/16 (aot.gemm_site), since 2026-11-27's third session: before, compiled
# unspecialised, they had kept 64-row tiles.
VARIANTS: Dict[str, Tuple[Dict[str, object], Tuple[Tuple[int, int, int, int, int], ...]]] = {
    # channel fc1: LayerNorm prologue, bias + GELU epilogue keeping Z
    "ln_gelu": (dict(A_PRO=A_LAYERNORM, HAS_BIAS=True, EPI_GELU=True, STORE_BRANCH=True),
                ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 8, 3),
                 (64, 64, 32, 4, 3))),
    # channel fc2: bias, layer scale, drop path, residual
    "residual": (dict(HAS_BIAS=True, HAS_SCALE=True, HAS_SS=True, HAS_RES=True, STORE_BRANCH=True),
                 ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3))),
    # dZ = (dO · W2) ⊙ GELU'(Z), and fc1's bias gradient as column sums (128 × 256 spills 32-40 B even
    # with the epilogue subtiled)
    "gelu_grad": (dict(EPI_GELU_GRAD=True, COL_SUM=True),
                  ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 8, 4), (64, 64, 64, 4, 3))),
    # weight gradients with the norm recomputed on the B tile (dW1 = dZᵀ · LN(x); ResMLP's dW)
    # (128 × 256 × 64: 254 registers, and 20 B of spills through jax-triton under triton 3.6 + ptxas 13.5)
    "ln_b": (dict(B_PRO=B_LAYERNORM), ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 8, 3))),
    # dW2 = dOᵀ · GELU(Z), GELU recomputed on the B tile
    "gelu_b": (dict(B_PRO=B_GELU), ((256, 128, 64, 8, 3), (128, 256, 32, 8, 3), (128, 128, 64, 8, 3),
                               (128, 128, 32, 8, 4))),
    # gMLP's gate: per-image S×S token linear of LN(v), + bias, kept (backward), × u (BLOCK_K 64 and
    # 128 × 256 spill 212-472 B)
    "gate_proj": (dict(B_PRO=B_TOKEN_LAYERNORM, HAS_BIAS=True, BIAS_ON_M=True, STORE_BRANCH=True, HAS_RES=True, RES_MUL=True),
                  ((128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3),
                   (64, 64, 32, 4, 3))),
    # gMLP's gate weight gradient dW_p = dP · LN(GELU(z_v))ᵀ, the B tile recomputed from z (BLOCK_K 64 spills)
    "gate_b": (dict(B_PRO=B_GATE_LAYERNORM), ((128, 256, 32, 8, 3), (128, 128, 32, 8, 3), (128, 128, 32, 8, 4),
                                            (64, 128, 32, 8, 3))),
    # ResMLP's per-image S×S token linear with its whole epilogue
    "token_linear": (dict(B_PRO=B_AFFINE_N, HAS_BIAS=True, BIAS_ON_M=True, HAS_SCALE=True, HAS_SS=True, SS_ON_N=True,
                          HAS_RES=True, STORE_BRANCH=True),
                     ((128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (64, 128, 32, 8, 3),
                      (64, 64, 64, 8, 3))),
    # g = dZ · W1 and ResMLP's dx GEMM
    "plain": (dict(), ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 8, 4))),
}
# Split-K launches of the weight-gradient sites (plan: split_k) compile with K_SPLIT and their own configs:
# their outputs are small (S × S), so 128 × 128 and 64-wide tiles, spill-free specialised at ResMLP-24's
# token-linear weight gradient (gate_b unspecialised: 128×128×32 spilled 12 B under triton 3.8).
SPLIT_CONFIGS: Dict[str, Tuple[Tuple[int, int, int, int, int], ...]] = {
    "ln_b": ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 8, 3)),
    "gelu_b": ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3)),
    "gate_b": ((128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 8, 3)),  # 128 × 256 spills 40 B
    "plain": ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3)),
}
# The JAX path runs the same configs: jax-triton gives integer arguments no divisibility hints, and the
# launch passes its multiples of 16 divided by 16 instead (plan: scale_scalars), which the kernel multiplies
# back; specialised that way the report compiles them as the torch launches (no spills; pruned configs for
# the unhinted compile, JAX_CONFIGS, are gone).
# fp32 operands on both sides (no autocast): "ieee" dots run on the FMA units, never wgmma, and the tiles
# above spill kilobytes there (ln_b 128×128: 38 KB). Every fp32 config below is spill-free at the sites
# that launch it (report --dtype fp32, under triton 3.8 + ptxas 12.9 and triton 3.6 + ptxas 13.5, the lent
# GPUs' toolchain). Not yet timed against cuBLAS fp32.
# The first was 64 × 64 × 16 at 4 warps, which spilled 24 B at residual through jax-triton under triton 3.6 +
# ptxas 13.5; no 64 × 64 form tried was clean at every site under both toolchains (8 warps, 2-4 stages:
# 8-16 B at ln_gelu or ln_b, 80-128 registers). 64 × 32 at 8 warps is: 125-126 registers at most.
FP32_CONFIGS: Tuple[Tuple[int, int, int, int, int], ...] = ((64, 32, 16, 8, 3), (32, 64, 32, 4, 2))
# Where the 64 × 64 and 32 × 64 tiles spilled, specialised (report --dtype fp32, triton 3.8): the split-K
# weight gradients (32 × 64: 12-52 B; gate_b's 64 × 64: 12 B) and the per-image S × S token linears
# (gate_proj 64 × 64: 92 B, gate_b 32 × 64 × 32: 44 B; ResMLP's token_linear 64 × 64 × 16: 8 B through
# jax-triton).
# 32 × 32 × 32 spilled 16 B at gate_b under triton 3.6 + ptxas 13.5; with 16-wide K steps 96-128 registers.
FP32_SPLIT_CONFIGS: Tuple[Tuple[int, int, int, int, int], ...] = ((64, 32, 16, 4, 3), (32, 32, 16, 4, 2))
FP32_TOKEN_LINEAR_CONFIGS: Tuple[Tuple[int, int, int, int, int], ...] = ((32, 64, 16, 4, 3), (32, 32, 32, 4, 2))
FP32_TOKEN_LINEAR_SITES = frozenset({"token_linear", "gate_proj", "gate_b"})
INTERPRET_CONFIG = (32, 32, 32, 4, 1)
_VARIANT_CONFIGS = {site: configs for site, (_flags, configs) in VARIANTS.items()}
# The constexprs besides the blocks that change what a launch computes, and so its best tiles.
TUNE_FLAGS = ("A_PRO", "B_PRO", "EPI_GELU", "EPI_GELU_GRAD", "HAS_RES", "RES_MUL", "PRECISION", "IDX64", "K_SPLIT")
AUTOTUNE_KEY = ["M", "N", "K", *TUNE_FLAGS]  # the JAX path's triton.autotune, where the table has no entry
# Tuned configs ship per architecture in the package (TUNED_FILE: {"sm_90": {tune_key: [BLOCK_M, BLOCK_N,
# BLOCK_K, num_warps, num_stages], or the same and "tma"}}), written from tuning runs on that GPU
# (bench/tune_table.py), so that a first call there does not autotune. Keys bucket M, N, K to powers of
# two: a new batch size reuses its bucket's choice instead of tuning again. MIXER_FAST_AUTOTUNE=1 ignores
# the table and times every config of the launch site once per key and process; MIXER_FAST_AUTOTUNE=none
# never times: where the table has no entry, a site's first TMA config where one is offered, else its
# first config, skipping those too big for the GPU's shared memory (untuned_choice). For runs that check
# rather than time: bench/gpu_check.py's correctness processes, which with a cold table compiled and timed
# every config of every site (some 40 compiles an op), and which this way check the TMA path, never run on
# a GPU before, first.
TUNED_FILE = "tuned_gemm.json"
AUTOTUNE_ENV = "MIXER_FAST_AUTOTUNE"
AUTOTUNE_RETUNE, AUTOTUNE_NONE = "1", "none"
_tuned: Dict[str, object] = {}


def tune_key(variant: str, M: int, N: int, K: int, meta: Dict[str, object]) -> str:
    """The table key of a launch: site, power-of-two buckets of M, N, K, and the TUNE_FLAGS."""
    flags = ",".join(f"{name}={meta[name]}" for name in TUNE_FLAGS)
    return f"{variant}|{_launch.pow2(M)}x{_launch.pow2(N)}x{_launch.pow2(K)}|{flags}"


def _nearest(table: Dict[str, list], key: str) -> Optional[list]:
    """The entry of ``table`` for the same site and flags whose M, N, K buckets are nearest ``key``'s (in
    powers of two, summed), or None: a batch size nobody tuned for takes its neighbour's tiles rather
    than a tuning run."""
    import math

    site, dims, flags = key.split("|")
    want = [math.log2(int(v)) for v in dims.split("x")]
    best, best_d, best_key = None, math.inf, ""
    for other, entry in table.items():
        parts = other.split("|")
        if len(parts) != 3 or parts[0] != site or parts[2] != flags:
            continue
        d = sum(abs(math.log2(int(v)) - w) for v, w in zip(parts[1].split("x"), want))
        if d < best_d or (d == best_d and other < best_key):
            best, best_d, best_key = entry, d, other
    return best


class Tuner:
    """Chooses a launch's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, TMA]) on a GPU: the shipped table's
    entry for the device class, else (or with MIXER_FAST_AUTOTUNE=1) the fastest of the site's configs,
    timed once per key; ``chosen`` holds this process's choices, ``timed`` those it timed (what
    bench/tune_table.py writes), ``times`` every timed config's median milliseconds per key (so that a
    tuning run also says what each choice, TMA or not, was worth)."""

    def __init__(self) -> None:
        self.chosen: Dict[str, Dict[str, Tuple]] = {}
        self.timed: Dict[str, Dict[str, Tuple]] = {}
        self.times: Dict[str, Dict[str, Dict[str, float]]] = {}
        self._table: Optional[Dict[str, Dict[str, list]]] = None

    def table(self) -> Dict[str, Dict[str, list]]:
        if self._table is None:
            import importlib.resources
            import json

            try:
                text = importlib.resources.files("mixer_fast").joinpath(TUNED_FILE).read_text()
            except FileNotFoundError:
                text = "{}"
            self._table = json.loads(text)
        return self._table

    def shipped(self, device_class: str, key: str, candidates) -> Optional[Tuple]:
        """The table's config for ``key`` on ``device_class`` if it is one of ``candidates`` (a config
        pruned since the table was written is not used) and MIXER_FAST_AUTOTUNE is not 1; else None."""
        if autotune_mode() == AUTOTUNE_RETUNE:
            return None
        table = self.table().get(device_class, {})
        entry = table.get(key)
        if entry is None:
            entry = _nearest(table, key)
        return tuple(entry) if entry is not None and tuple(entry) in candidates else None

    def config(self, device_class: str, key: str, candidates, run, warm=None, fits=None) -> Tuple:
        """The config for ``key``; ``run(config)`` launches with one (timed when tuning), ``warm(config)``
        compiles it without launching: when tuning, every candidate is compiled at once first
        (:func:`_launch.compile_concurrently`), so that the timing loop meets compiled kernels.
        ``fits(config)``: whether it fits the GPU (untimed choices skip those that do not; timing skips
        them by their launch's OutOfResources). While launches are recorded (_launch.record_launches),
        a key with no table entry records the compiles it would make (``warm``: every candidate, or the
        untimed choice's first) and answers the untimed first choice, unkept."""
        known = self.chosen.setdefault(device_class, {})
        if key in known:
            return known[key]
        shipped = self.shipped(device_class, key, candidates)
        if shipped is not None:
            known[key] = shipped
            return shipped
        if _launch.recording() and warm is not None and not _launch.INTERPRET:
            # A warm-up's run (_launch.record_launches, bench/gpu_check.py's timing groups): the compiles this
            # key would make are recorded with the launches, to compile all at once; the choice is left to
            # the real run, which then finds them compiled. Nothing is launched, nothing kept.
            first = untuned_choice(candidates)
            for cfg in [first] if no_tuning() else candidates:
                _launch.record(functools.partial(warm, cfg))
            return first
        if no_tuning():
            known[key] = untuned_choice(candidates, fits)
            return known[key]
        from triton.testing import do_bench

        if warm is not None:
            _launch.compile_concurrently([functools.partial(warm, cfg) for cfg in candidates])
        times = {}
        with _launch.launching():  # timed for real even while launches are recorded: the choice is kept
            for cfg in candidates:
                try:
                    times[cfg] = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU
                    if "OutOfResources" not in type(e).__name__ and "out of resource" not in str(e):
                        raise
        if not times:
            raise RuntimeError(f"no config of {key} can run on this GPU ({device_class})")
        known[key] = min(times, key=times.get)
        self.timed.setdefault(device_class, {})[key] = known[key]
        self.times.setdefault(device_class, {})[key] = {"x".join(map(str, c)): ms for c, ms in times.items()}
        return known[key]


TUNER = Tuner()


def autotune_mode() -> str:
    """MIXER_FAST_AUTOTUNE: "0" (the default: the table, else timed), AUTOTUNE_RETUNE or AUTOTUNE_NONE;
    any other value is refused by name."""
    import os

    value = os.environ.get(AUTOTUNE_ENV, "0")
    if value not in ("0", AUTOTUNE_RETUNE, AUTOTUNE_NONE):
        raise ValueError(f"{AUTOTUNE_ENV}: expected 0, {AUTOTUNE_RETUNE} or {AUTOTUNE_NONE}, got {value!r}")
    return value


def no_tuning() -> bool:
    """Whether MIXER_FAST_AUTOTUNE=none: configs come from the table, else :func:`untuned_choice`."""
    return autotune_mode() == AUTOTUNE_NONE


def untuned_choice(candidates, fits=None) -> Tuple:
    """A launch site's config without timing: its first TMA one where TMA is offered, else its first; with
    ``fits(config)``, the first of those (in that order) that fits the GPU. The first configs are sized for
    Hopper's 227 KB of shared memory a block; sm_86 / sm_89 / sm_120 have 99 KB, where the first needs more
    (115 KB at ln_gelu: bench/stand_in.py --arch 86 failed so, 2026-11-29). Where none fits, the first:
    its launch then says what it needs."""
    order = sorted(candidates, key=lambda c: c[5:] != (TMA,))  # stable: TMA ones first, in the site's order
    if fits is not None:
        return next((c for c in order if fits(c)), order[0])
    return order[0]


def autotuned(kernel, variant: str, cache: Dict[str, object], split: bool = False, fp32: bool = False):
    """``kernel`` (the fused GEMM, as the JAX launcher calls it) under triton.autotune over the configs of
    launch site ``variant`` (:func:`site_configs`), each config with its EPI_SUBTILE (the caller leaves it
    out of the constexprs it passes), cached in ``cache``; the kernel itself in the interpreter
    (INTERPRET_CONFIG)."""
    if _launch.INTERPRET:
        return kernel
    key = variant + (",split" if split else "") + (",fp32" if fp32 else "")
    if key not in cache:
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, EPI_SUBTILE=epi_subtile(n)),
                                 num_warps=w, num_stages=s)
                   for m, n, k, w, s in site_configs(variant, split, fp32=fp32)]
        tuner = triton.autotune(configs, key=AUTOTUNE_KEY)(kernel)
        tuner.__class__ = _no_prune_class(type(tuner))
        cache[key] = tuner
    return cache[key]


@functools.lru_cache(maxsize=None)
def _no_prune_class(cls: type) -> type:
    """``cls`` (Triton's Autotuner) with no early_config_prune, which ignores being set: jax-triton 0.3.1
    wraps the tuner's early_config_prune in one more closure at every lowering and leaves the chain on it,
    and this tuner is cached per site, so ~940 lowerings in a process overflowed Python's stack (a
    reviewer's emulation). Its pruning drops configs whose constexprs conflict with the launch's, and the
    fused GEMM's launches pass none of a config's (BLOCK_*, GROUP_M, EPI_SUBTILE), so it drops nothing."""
    return type("NoPrune" + cls.__name__, (cls,), {"early_config_prune": property(lambda self: None,
                                                                                   lambda self, value: None)})


def epi_subtile(block_n: int) -> bool:
    """Whether a config runs its epilogue on two column halves: at BLOCK_N 256, where the whole-tile
    epilogue spilled (ln_gelu 352 B, gelu_grad 2.5 KB; bench/NOTES.md)."""
    return block_n >= 256


def site_configs(variant: str, split: bool, fp32: bool = False) -> Tuple[Tuple[int, int, int, int, int], ...]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) a launch site may run with, torch and JAX
    alike (``fp32``: both operands fp32, the FP32_* configs); the torch launcher adds TMA ones
    (tma_configs)."""
    if split and variant not in SPLIT_CONFIGS:
        raise ValueError(f"variant: split-K launches are planned for {sorted(SPLIT_CONFIGS)}, got {variant!r}")
    if variant not in _VARIANT_CONFIGS:
        raise ValueError(f"variant: expected one of {sorted(_VARIANT_CONFIGS)}, got {variant!r}")
    if fp32:
        if split:
            return FP32_SPLIT_CONFIGS
        return FP32_TOKEN_LINEAR_CONFIGS if variant in FP32_TOKEN_LINEAR_SITES else FP32_CONFIGS
    return SPLIT_CONFIGS[variant] if split else _VARIANT_CONFIGS[variant]


# Rows per partial of an epilogue's column sums in Triton's interpreter: half its BLOCK_M, so that CI runs
# tiles that write more than one partial row, as the GPU's 128-row tiles do.
INTERPRET_COL_SUM_ROWS = INTERPRET_CONFIG[0] // 2


def col_sum_rows(variant: str, fp32: bool = False) -> int:
    """Rows per partial column sum at launch site ``variant``: the smallest BLOCK_M among its configs (every
    config's BLOCK_M is a multiple of it, all powers of two), so that whichever config runs fills the same
    (cdiv(M, rows), N) buffer; INTERPRET_COL_SUM_ROWS in the interpreter."""
    if _launch.INTERPRET:
        return INTERPRET_COL_SUM_ROWS
    configs = site_configs(variant, False, fp32=fp32)
    rows = min(c[0] for c in configs)
    assert all(c[0] % rows == 0 for c in configs), variant
    return rows


def scaled16(scalars: list) -> Tuple[list, int]:
    """(scalars with each multiple of 16 divided by 16, the bitmask of those divided). Only values that
    stay int32 either way are divided (the kernel's multiply must not overflow)."""
    out, mask = [], 0
    for i, v in enumerate(scalars):
        if v % 16 == 0 and 0 <= v < 2**31:
            out.append(v // 16)
            mask |= 1 << i
        else:
            out.append(v)
    return out, mask


# A config's optional sixth element: its operands loaded by TMA where :func:`tma_layout` allows (torch on
# sm_90 and newer; jax-triton 0.3.1 passes no tensor descriptors). Offered for the 128-row tiles, whose
# pointer loads spend the most registers on addresses; the tuner times them beside the pointer configs.
TMA = "tma"
TMA_MIN_BLOCK_M = 128
# MIXER_FAST_TMA=0: operands load by pointers only (no descriptors offered or used), e.g. to tell a TMA
# fault on a GPU from the rest.
TMA_ENV = "MIXER_FAST_TMA"

# Where channel mixing's LayerNorm (or ResMLP's affine) meets fc1's GEMM (the ln_gelu site):
# - LN_ON_LOAD: the A prologue normalises each x tile as it is loaded (A_LAYERNORM / A_AFFINE). The
#   normalised tile is the wgmma's register operand: every K step reads it back from shared memory,
#   normalises and rounds it (report TTGIR: 4 local_loads a step).
# - LN_FOLDED: the GEMM reads x as it is against a copy W ⊙ w of the weight (channel_mixing.fc1_operands) and the
#   epilogue undoes the statistics (A_LAYERNORM_FOLDED; the affine folds into the weight and bias alone):
#   both operands straight from shared memory, as the residual site's. Only where x has the weights'
#   dtype: under autocast the GEMM would round x, mean and all, to 16 bits.
# Not yet timed on a GPU: the tune stage times both (bench/tune_table.py), and the faster becomes
# LN_PLACEMENT. MIXER_FAST_LN chooses per process.
LN_ENV = "MIXER_FAST_LN"
LN_ON_LOAD, LN_FOLDED = "load", "fold"
LN_PLACEMENT = LN_ON_LOAD


def ln_placement() -> str:
    """MIXER_FAST_LN, else LN_PLACEMENT: LN_ON_LOAD or LN_FOLDED; any other value is refused by name."""
    return _launch.env_choice(LN_ENV, LN_PLACEMENT, (LN_ON_LOAD, LN_FOLDED))


# Which engine runs torch's channel GEMMs (channel mixing, and gMLP's fc1 / fc2; issue 17: where the fused
# Triton GEMM cannot reach its target after honest tuning, cuBLAS with fused Triton element-wise passes,
# whichever is faster):
# - GEMM_FUSED: this file's fused_matmul, the norm, GELU, bias, scale and residual in its prologues and
#   epilogues (channel_mixing.py, spatial_gating.py);
# - GEMM_CUBLAS: torch's GEMMs (cuBLAS on a GPU) with the norm, GELU and its backward and the residual in
#   Triton passes of their own (cublas_engine.py); what eager runs, less its extra passes and
#   saved activations. gMLP's gate keeps its fused token GEMMs.
# On the 2026-11-27 H200 the fused GEMMs (before issue 17's work) ran channel mixing at 0.50x eager; neither
# engine as it is now has been timed. bench/gpu_check.py times both (the ``triton_cublas`` provider); the
# faster becomes GEMM_ENGINE. MIXER_FAST_GEMM chooses per process. The JAX path keeps the fused GEMMs.
GEMM_ENV = "MIXER_FAST_GEMM"
GEMM_FUSED, GEMM_CUBLAS = "fused", "cublas"
GEMM_ENGINE = GEMM_FUSED


def gemm_engine() -> str:
    """MIXER_FAST_GEMM, else GEMM_ENGINE: GEMM_FUSED or GEMM_CUBLAS; any other value is refused by name."""
    return _launch.env_choice(GEMM_ENV, GEMM_ENGINE, (GEMM_FUSED, GEMM_CUBLAS))


# gelu_grad is left out: at 128 × 128 it holds 255 registers with pointer loads already, and with TMA
# it spilled 8 B under triton 3.6 + ptxas 13.5 (the GPU machines' toolchain; none under 3.8 + 12.9).
TMA_SITES = frozenset({"ln_gelu", "residual", "ln_b", "gelu_b", "plain"})


def tma_configs(variant: str, configs: Tuple[Tuple, ...]) -> Tuple[Tuple, ...]:
    """``configs`` of launch site ``variant`` and, after them, their tiles of TMA_MIN_BLOCK_M rows or more
    again with TMA, where the site is one of TMA_SITES."""
    if variant not in TMA_SITES:
        return tuple(configs)
    return tuple(configs) + tuple((*c[:5], TMA) for c in configs if c[0] >= TMA_MIN_BLOCK_M)


def tma_layout(t: torch.Tensor, other: Axis, k: Axis, K: int) -> int:
    """How a tensor descriptor can load GEMM operand ``t`` (TMA_K_INNER, TMA_K_OUTER), or TMA_NONE: its
    base 16-byte aligned and :func:`axes_tma_layout`; TMA_NONE always under MIXER_FAST_TMA=0."""
    import os

    if os.environ.get(TMA_ENV, "1") == "0" or t.data_ptr() % 16:
        return TMA_NONE
    return axes_tma_layout(other, k, K, t.element_size())


def axes_tma_layout(other: Axis, k: Axis, K: int, element_size: int) -> int:
    """The descriptor layout of an operand whose K axis is ``k`` and other axis ``other``, or TMA_NONE:
    each axis one stride (not split over two dims), one of them contiguous, the other's stride a
    multiple of 16 bytes (TMA's rules), K > 0."""
    if other.split or k.split or K <= 0:
        return TMA_NONE
    if k.stride == 1 and other.stride * element_size % 16 == 0:
        return TMA_K_INNER
    if other.stride == 1 and k.stride * element_size % 16 == 0:
        return TMA_K_OUTER
    return TMA_NONE


def _descriptor(t: torch.Tensor, layout: int, rows: int, K: int, other: Axis, k: Axis, block_rows: int,
                block_k: int):
    """The tensor descriptor of operand ``t`` (``rows`` × K logical) in ``layout``, block as the kernel loads."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if layout == TMA_K_INNER:
        return TensorDescriptor(t, [rows, K], [other.stride, 1], [block_rows, block_k])
    return TensorDescriptor(t, [K, rows], [k.stride, 1], [block_k, block_rows])


@dataclass
class Plan:
    """What one fused GEMM launch passes besides pointers, for either framework: the scalar arguments
    (M, N, K, the axes, the K split) in kernel order, the constexprs, the grid, num_warps / num_stages
    (the autotuner's configs carry their own on a GPU), and ``split_k``: how many K ranges write their own
    slice of an fp32 output (the launcher allocates (split_k, *out) and sums it over the first dim; 1:
    the output itself)."""

    scalars: list
    meta: Dict[str, object]
    grid: object
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


# Split K for the weight gradients (no epilogue, fp32 output) wherever it shortens the launch: their tiles
# are few for the work (K = B·S or B·C), and a GPU runs them in waves of one tile an SM. The S × S token
# linears' (ResMLP, gMLP's gate) are 4 tiles of 128 × 128, which ran on 4 of 132 SMs (the H200 run: gMLP-S
# training at 0.044× eager); Mixer-B/16's channel dW1 and dW2 are 144, i.e. two waves of which the second
# keeps 12 SMs busy: 55 % of the GPU for the whole K. split_k picks the split with the least modelled time
# (split_cost): waves of tiles × parts programs each 1/parts of K, plus the fp32 partials' traffic.
SPLIT_K_TILE = 128  # the tile edge splits are planned for (SPLIT_CONFIGS' main tiles)
SPLIT_K_MAX_WAVES = 4  # ranges considered: at most cdiv(SPLIT_K_MAX_WAVES · sms, tiles)
SPLIT_K_GRANULE = 64  # K elements per range: a multiple of every config's BLOCK_K
SPLIT_K_MIN_LEN = 512  # K elements per range at least (shorter ranges spend their time filling the pipeline)
# 16-bit tensor-core FLOP per byte of HBM: 989 TFLOP/s over 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200). Prices
# the partials (written in fp32, read back by the sum: 8 B an element of each) in MMA time.
MACHINE_BALANCE = 250


def split_ranges(K: int, parts: int) -> Tuple[int, int]:
    """(K elements per range, ranges) of ``parts`` requested: ranges a multiple of SPLIT_K_GRANULE long."""
    k_len = triton.cdiv(triton.cdiv(K, parts), SPLIT_K_GRANULE) * SPLIT_K_GRANULE
    return k_len, triton.cdiv(K, k_len)


def split_cost(M: int, N: int, K: int, parts: int, sms: int = _launch.DEFAULT_SMS) -> float:
    """The modelled time of an M × N × K weight-gradient GEMM split into ``parts`` K ranges, in waves of
    SPLIT_K_TILE² tiles over the whole K on ``sms`` SMs: the waves of tiles × parts programs, each 1/parts
    of the work, and with a split, the partials' fp32 write and read at MACHINE_BALANCE."""
    tiles = triton.cdiv(M, SPLIT_K_TILE) * triton.cdiv(N, SPLIT_K_TILE)
    waves = triton.cdiv(tiles * parts, sms) / parts
    if parts == 1:
        return waves
    wave_flops = 2 * SPLIT_K_TILE * SPLIT_K_TILE * K * sms
    return waves + parts * M * N * 8 * MACHINE_BALANCE / wave_flops


def split_k(M: int, N: int, K: int, sms: int = _launch.DEFAULT_SMS) -> int:
    """How many K ranges a GEMM without epilogue is split into (1: none) on a GPU of ``sms`` SMs: the split
    with the least :func:`split_cost` (the fewer ranges where two tie), each range at least SPLIT_K_MIN_LEN
    long, at most cdiv(SPLIT_K_MAX_WAVES · sms, tiles) ranges (so fewer than SPLIT_K_MAX_WAVES · sms + tiles
    programs). In Triton's interpreter, 2 whenever K spans two ranges of SPLIT_K_GRANULE, so that CI runs
    the split path."""
    if _launch.INTERPRET:
        return 2 if K > SPLIT_K_GRANULE else 1
    if K < 2 * SPLIT_K_MIN_LEN or M <= 0 or N <= 0:  # nothing to split (K = 0: a batch of 0's weight gradients)
        return 1
    tiles = triton.cdiv(M, SPLIT_K_TILE) * triton.cdiv(N, SPLIT_K_TILE)
    best, best_cost = 1, split_cost(M, N, K, 1, sms)
    for wanted in range(2, triton.cdiv(SPLIT_K_MAX_WAVES * sms, tiles) + 1):
        k_len, parts = split_ranges(K, wanted)
        if k_len < SPLIT_K_MIN_LEN:
            break
        cost = split_cost(M, N, K, parts, sms)
        if cost < best_cost - 1e-9:
            best, best_cost = parts, cost
    return best


def plan(M: int, N: int, K: int, a_axes: Tuple[Axis, Axis], b_axes: Tuple[Axis, Axis],
         out_axes: Tuple[Axis, Axis], aux_axes: Optional[Tuple[Axis, Axis]],
         res_axes: Optional[Tuple[Axis, Axis]], *, a_pro: int, b_pro: int, has_bias: bool, bias_on_m: bool,
         epi_gelu: bool, epi_gelu_grad: bool, store_branch: bool, has_scale: bool, has_ss: bool, ss_on_n: bool,
         has_res: bool, approximate: str, precision: str, idx64: bool, res_mul: bool = False,
         allow_split: bool = False, out_numel: int = 0, scale_scalars: bool = False, col_sum_rows: int = 0,
         sms: int = _launch.DEFAULT_SMS) -> Plan:
    """The launch of fused_matmul_kernel (see fused_matmul) shared by the torch and JAX launchers.
    ``out_numel``: the output's elements. ``allow_split``: the caller can take a split-K launch (its
    output fp32 and contiguous); it gets one when there is no epilogue (partial products are summed
    afterwards) and :func:`split_k` says so for a GPU of ``sms`` SMs. ``idx64``: some operand needs 64-bit
    offsets; the plan adds the split-K partial output's own need. ``scale_scalars`` (jax-triton, which gives integer arguments
    no divisibility hints): the integer arguments that are multiples of 16 go divided by 16, flagged in
    SCALED16, and the kernel multiplies them back (:func:`scaled16`). ``col_sum_rows`` (0: none): the
    epilogue also writes the output's column sums, partial over that many rows each
    (:func:`col_sum_rows`; the caller allocates (cdiv(M, col_sum_rows), N) fp32 and sums it over rows)."""
    epilogue = (has_bias, epi_gelu, epi_gelu_grad, store_branch, has_scale, has_ss, has_res, col_sum_rows > 0)
    parts = split_k(M, N, K, sms) if allow_split and not any(epilogue) else 1
    k_len = K
    if parts > 1:
        k_len, parts = split_ranges(K, parts)
    idx64 = idx64 or out_numel * parts >= 2**31 - 1
    am, ak = a_axes
    bk, bn = b_axes
    om, on = out_axes
    xm, xn = aux_axes or out_axes
    rm, rn = res_axes or out_axes
    assert (xm.inner, xn.inner, rm.inner, rn.inner) == (om.inner, on.inner, om.inner, on.inner)
    meta = dict(
        A_PRO=a_pro, B_PRO=b_pro, HAS_BIAS=has_bias, BIAS_ON_M=bias_on_m,
        EPI_GELU=epi_gelu, EPI_GELU_GRAD=epi_gelu_grad, STORE_BRANCH=store_branch,
        HAS_SCALE=has_scale, HAS_SS=has_ss, SS_ON_N=ss_on_n, HAS_RES=has_res, RES_MUL=res_mul,
        APPROX_TANH=approximate == "tanh", PRECISION=precision, INTERPRETER=_launch.INTERPRET,
        A_M_SPLIT=am.split, A_K_SPLIT=ak.split, B_K_SPLIT=bk.split, B_N_SPLIT=bn.split, O_M_SPLIT=om.split,
        O_N_SPLIT=on.split, X_M_SPLIT=xm.split, X_N_SPLIT=xn.split, R_M_SPLIT=rm.split, R_N_SPLIT=rn.split,
        IDX64=idx64, K_SPLIT=parts > 1,
        # a GPU launch sets it per config (epi_subtile); the interpreter always, so that CI runs it
        EPI_SUBTILE=_launch.INTERPRET,
        # the torch launcher sets these per config (tma_layout); jax-triton passes no descriptors
        A_TMA=TMA_NONE, B_TMA=TMA_NONE,
        COL_SUM=col_sum_rows > 0, COL_SUM_ROWS=max(col_sum_rows, 1),
    )
    scalars = [M, N, K, am.inner, am.outer, am.stride, ak.inner, ak.outer, ak.stride,
               bk.inner, bk.outer, bk.stride, bn.inner, bn.outer, bn.stride,
               om.inner, om.outer, om.stride, on.inner, on.outer, on.stride,
               xm.outer, xm.stride, xn.outer, xn.stride, rm.outer, rm.stride, rn.outer, rn.stride,
               max(k_len, 1), out_numel if parts > 1 else 0]
    meta["SCALED16"] = 0
    if scale_scalars:
        scalars, meta["SCALED16"] = scaled16(scalars)
    if _launch.INTERPRET:
        bm, bn_, bk_, warps, stages = INTERPRET_CONFIG
        meta.update(BLOCK_M=bm, BLOCK_N=bn_, BLOCK_K=bk_, GROUP_M=8)
        return Plan(scalars, meta, (triton.cdiv(M, bm) * triton.cdiv(N, bn_), parts), warps, stages, parts)

    return Plan(scalars, meta, TiledGrid(M, N, parts), split_k=parts)


@dataclass(frozen=True)
class TiledGrid:
    """A fused GEMM launch's grid as a function of the config's tiles: (tiles of M × N, K parts). Compared
    and hashed by value: jax-triton caches its launch primitive on its parameters, the grid among them, so
    a new closure per call made every JAX call outside jax.jit lower and compile again (a reviewer's
    emulation of jax-triton 0.3.1: 100 eager channel-mixing calls 10.5 s, 0.3 s with this)."""

    M: int
    N: int
    parts: int

    def __call__(self, meta: Dict[str, object]) -> Tuple[int, int]:
        return (triton.cdiv(self.M, meta["BLOCK_M"]) * triton.cdiv(self.N, meta["BLOCK_N"]), self.parts)


def fused_matmul(
    a: torch.Tensor, a_axes: Tuple[Axis, Axis], b: torch.Tensor, b_axes: Tuple[Axis, Axis],
    out: torch.Tensor, out_axes: Tuple[Axis, Axis], M: int, N: int, K: int, *, variant: str,
    a_pro: int = A_NONE, a_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    a_vec: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    b_pro: int = B_NONE, b_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    b_vec: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    bias: Optional[torch.Tensor] = None, bias_on_m: bool = False,
    aux: Optional[torch.Tensor] = None, aux_axes: Optional[Tuple[Axis, Axis]] = None,
    epi_gelu: bool = False, epi_gelu_grad: bool = False, store_branch: bool = False,
    scale: Optional[torch.Tensor] = None, ss: Optional[torch.Tensor] = None, ss_on_n: bool = False,
    res: Optional[torch.Tensor] = None, res_axes: Optional[Tuple[Axis, Axis]] = None, res_mul: bool = False,
    col_sum: Optional[torch.Tensor] = None, approximate: str = "none", allow_tf32: bool = False,
) -> torch.Tensor:
    """out[m, n] = epilogue(Σ_k pro_A(a)[m, k] · pro_B(b)[k, n]) (see the module docstring). ``aux`` and
    ``res`` share ``out``'s axis decomposition (same ``inner``), with their own strides; ``res_mul``
    multiplies by ``res`` instead of adding it. ``variant`` names the launch site in VARIANTS, among
    whose configs TUNER chooses (the shipped table's, or timed once). A contiguous fp32 ``out`` with no epilogue (the weight gradients) may
    be computed split over K (:func:`split_k`): fp32 partial products, summed in a fixed order.
    ``col_sum`` (N,) fp32 receives Σ_m out[m, n] of the values as stored (a bias gradient), from
    partial sums the epilogue writes (:func:`col_sum_rows`), added in a fixed order."""
    import torch

    if col_sum is not None and M == 0:
        col_sum.zero_()
    if M == 0 or N == 0:
        return out

    dummy = _dummy(out.device)
    fp32 = a.dtype == b.dtype == torch.float32
    sum_rows = col_sum_rows(variant, fp32) if col_sum is not None else 0
    a_mean, a_rstd = a_stats or (dummy, dummy)
    a_w, a_b = a_vec or (dummy, dummy)
    b_mean, b_rstd = b_stats or (dummy, dummy)
    b_w, b_b = b_vec or (dummy, dummy)
    p = plan(M, N, K, a_axes, b_axes, out_axes, aux_axes, res_axes, a_pro=a_pro, b_pro=b_pro,
             has_bias=bias is not None, bias_on_m=bias_on_m, epi_gelu=epi_gelu, epi_gelu_grad=epi_gelu_grad,
             store_branch=store_branch, has_scale=scale is not None, has_ss=ss is not None, ss_on_n=ss_on_n,
             has_res=res is not None, approximate=approximate, precision=_launch.precision(a.dtype, allow_tf32),
             idx64=_launch.needs_int64(a, b, out, aux, res),
             res_mul=res_mul, allow_split=out.dtype == torch.float32 and out.is_contiguous(), out_numel=out.numel(),
             col_sum_rows=sum_rows, sms=_launch.sm_count(out.device))
    target = out if p.split_k == 1 else _launch.new_output((p.split_k, *out.shape), out)
    partials = _launch.new_output((triton.cdiv(M, sum_rows), N), out, torch.float32) if sum_rows else dummy
    aux = aux if aux is not None else dummy  # the kernel's aux input and aux output (one of them is read)
    rest = (aux, res if res is not None else dummy, a_mean, a_rstd, a_w, a_b, b_mean, b_rstd, b_w, b_b,
            bias if bias is not None else dummy, scale if scale is not None else dummy,
            ss if ss is not None else dummy, *p.scalars, target, aux, partials)
    a_tma = tma_layout(a, a_axes[0], a_axes[1], K)
    b_tma = tma_layout(b, b_axes[1], b_axes[0], K)

    def launch(grid, meta: Dict[str, object], tma: bool, warmup: bool = False, **options):
        a_arg, b_arg = a, b
        if tma:  # descriptors' blocks are the config's
            meta = dict(meta, A_TMA=a_tma, B_TMA=b_tma)
            if a_tma != TMA_NONE:
                a_arg = _descriptor(a, a_tma, M, K, a_axes[0], a_axes[1], meta["BLOCK_M"], meta["BLOCK_K"])
            if b_tma != TMA_NONE:
                b_arg = _descriptor(b, b_tma, N, K, b_axes[1], b_axes[0], meta["BLOCK_N"], meta["BLOCK_K"])
        if warmup:  # compiled as the launch would be, not run (the tuner's concurrent compiles)
            return fused_matmul_kernel.warmup(a_arg, b_arg, *rest, grid=grid, **meta, **options)
        return _launch.on_grid(fused_matmul_kernel, grid)(a_arg, b_arg, *rest, **meta, **options)

    def run(cfg: Tuple, warmup: bool = False):
        bm, bn, bk, warps, stages = cfg[:5]
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), p.split_k)
        meta = dict(p.meta, EPI_SUBTILE=epi_subtile(bn), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        return launch(grid, meta, cfg[5:] == (TMA,), warmup, num_warps=warps, num_stages=stages)

    def fits(cfg: Tuple) -> bool:
        kernel = run(cfg, warmup=True)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel  # a caller's AsyncCompileMode
        return kernel.metadata.shared <= _launch.max_shared_memory(out.device)

    with _launch.serialized():
        if _launch.INTERPRET:
            # descriptors wherever the operands allow, so that CI runs the TMA path (the pointer path runs
            # where they do not: split axes, unaligned strides)
            launch(p.grid, p.meta, True, num_warps=p.num_warps, num_stages=p.num_stages)
        else:
            cap = _launch.capability(out.device)
            candidates = site_configs(variant, p.split_k > 1, fp32=fp32)
            if cap >= 90 and not fp32 and (a_tma, b_tma) != (TMA_NONE, TMA_NONE):
                candidates = tma_configs(variant, candidates)
            run(TUNER.config(f"sm_{cap}", tune_key(variant + (",fp32" if fp32 else ""), M, N, K, p.meta),
                             candidates, run, warm=functools.partial(run, warmup=True), fits=fits))
    if p.split_k > 1:
        torch.sum(target, 0, out=out)
    if col_sum is not None:
        torch.sum(partials, 0, out=col_sum)
    return out
