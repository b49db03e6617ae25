"""Fused token-mixing MLP kernels: per image, LN → W1 · (·) + b1 → GELU → W2 · (·) + b2 → scale → + x.

One program owns one image's S × BLOCK_C slab: the normalised slab is loaded once, and the hidden
D_S × BLOCK_C tile lives only in registers/shared memory, one BLOCK_D slice at a time, so the hidden
activations never reach global memory (forward or backward) and no transpose is materialised: the
token MLP is a left-multiplication of the S × C table. S is padded to S_PAD, a power of two.

Backward: ``token_mlp_dx_kernel`` (per image and channel slab) recomputes the hidden tile and produces
dL/dLN(x); ``token_mlp_dw_kernel`` (per BLOCK_D slice of the hidden, over a share of the images)
recomputes it again and accumulates dW1, dW2, db1 in registers, one partial per share, summed in a
fixed order afterwards (deterministic: no atomics).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import gelu, gelu_grad, round_to
from .layer_norm import layer_norm_backward, layer_norm_stats
from .matmul import flat, fused_matmul, split

if TYPE_CHECKING:  # torch loads when a launcher runs; the JAX path (jax_launch.py) never needs it
    import torch

    Tensor = torch.Tensor

# The token weights' row strides and the widths the kernels read them at are multiples of GRANULE
# elements (the MMA granule; 16 elements are 16-byte aligned in every dtype): Triton only learns that an
# integer argument is a multiple of 16, so a 16-byte-aligned but otherwise odd stride (fp32 at S = 196)
# would still load element by element. token_weights makes the copies.
GRANULE = 16
_GRANULE = tl.constexpr(GRANULE)  # the same, as kernels see it


@triton.jit
def _slab_offsets(b, offs_s, offs_c, sb, ss, sc, IDX64: tl.constexpr):
    # int64 only when the launch has a tensor of 2³¹ or more elements (2-D int64 offsets cost registers).
    if IDX64:
        return b.to(tl.int64) * sb + offs_s.to(tl.int64)[:, None] * ss + offs_c.to(tl.int64)[None, :] * sc
    else:
        return b * sb + offs_s[:, None] * ss + offs_c[None, :] * sc


@triton.jit
def _load_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, IDX64: tl.constexpr):
    mask = (offs_s < S)[:, None] & (offs_c < C)[None, :]
    off = _slab_offsets(b, offs_s, offs_c, sxb, sxs, sxc, IDX64)
    return tl.load(x_ptr + off, mask=mask, other=0.0), mask, off


@triton.jit
def _w1_slice(w1_ptr, d0, D, S, sw1d, sw1s, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr):
    """W1[d0:d0+BLOCK_D, :S_PAD], zero outside W1. A block pointer, not a tensor of per-element pointers:
    a 64 × 256 slice of those holds 128 registers a thread at 8 warps (measured: spills).

    W1 is the launchers' copy (:func:`token_weights`): row stride a multiple of GRANULE elements, zero
    columns from S up to the next multiple of GRANULE. So the slice is bounded at that width, not at S:
    both the row stride and the bound are then known multiples of 16 and the rows load in 16-byte
    vectors (at S = 196 a 392-byte row stride compiled to 2-byte scalar loads). The column stride is
    that copy's 1, so ``sw1s`` goes unused (kept: jax_kernels.py and aot.py restate the signature)."""
    s_al = tl.cdiv(S, _GRANULE) * _GRANULE
    bp = tl.make_block_ptr(w1_ptr, shape=(D, s_al), strides=(tl.multiple_of(sw1d, _GRANULE), 1), offsets=(d0, 0),
                           block_shape=(BLOCK_D, S_PAD), order=(1, 0))
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _w2t_slice(w2_ptr, d0, D, S, sw2s, sw2d, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr):
    """W2ᵀ[d0:d0+BLOCK_D, :S_PAD] (W2 is (S, D)), zero outside W2; read along D, W2's rows. W2 is the
    launchers' copy as W1 is: row stride a multiple of GRANULE, zero columns from D to the next multiple,
    unit column stride (``sw2d`` unused)."""
    d_al = tl.cdiv(D, _GRANULE) * _GRANULE
    bp = tl.make_block_ptr(w2_ptr, shape=(d_al, S), strides=(1, tl.multiple_of(sw2s, _GRANULE)), offsets=(d0, 0),
                           block_shape=(BLOCK_D, S_PAD), order=(0, 1))
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _normalise(x, mask, b, offs_s, offs_c, S, C, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, NORM: tl.constexpr):
    """N(x) of a slab in fp32 (zero outside ``mask``): LayerNorm with stored stats, or ResMLP's affine."""
    xf = x.to(tl.float32)
    if NORM == 1:
        rows = b.to(tl.int64) * S + offs_s
        mean = tl.load(mean_ptr + rows, mask=offs_s < S, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=offs_s < S, other=0.0)
        xf = (xf - mean[:, None]) * rstd[:, None]
    w = tl.load(nw_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    bias = tl.load(nb_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    return tl.where(mask, xf * w[None, :] + bias[None, :], 0.0)


@triton.jit
def _operand(t, INTERPRETER: tl.constexpr):
    """A tl.dot operand: widened to fp32 in Triton's interpreter, whose bf16 dot is wrong (products of
    16-bit floats are exact in fp32, so the result is the GPU's)."""
    if INTERPRETER:
        t = t.to(tl.float32)
    return t


@triton.jit
def _normalised_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
                     dtype: tl.constexpr, NORM: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr):
    """N(x) of one image's S_PAD × BLOCK_C slab, rounded to the weights' ``dtype`` (x's own, or the
    autocast dtype) as eager's LayerNorm output is, as a dot operand (zero outside the tensor); and the
    slab's mask."""
    x, mask, _ = _load_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, IDX64)
    xn = _normalise(x, mask, b, offs_s, offs_c, S, C, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, NORM)
    return _operand(round_to(xn, dtype, INTERPRETER), INTERPRETER), mask


@triton.jit
def token_mlp_fwd_kernel(
    x_ptr, out_ptr, branch_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr, ss_ptr,
    S, C, D,
    sxb, sxs, sxc, sob, sos, soc,
    sw1d, sw1s, sw2s, sw2d,
    NORM: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SS: tl.constexpr, STORE_BRANCH: tl.constexpr, APPROX_TANH: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    xn, mask = _normalised_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
                                w1_ptr.dtype.element_ty, NORM, INTERPRETER, IDX64)
    acc = tl.zeros((S_PAD, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w1 = _operand(_w1_slice(w1_ptr, d0, D, S, sw1d, sw1s, BLOCK_D, S_PAD), INTERPRETER)
        w2 = _operand(tl.trans(_w2t_slice(w2_ptr, d0, D, S, sw2s, sw2d, BLOCK_D, S_PAD)), INTERPRETER)
        z = tl.dot(w1, xn, input_precision=PRECISION)  # (BLOCK_D, BLOCK_C)
        if HAS_B1:
            z += tl.load(b1_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        h = _operand(round_to(gelu(z, APPROX_TANH), w2_ptr.dtype.element_ty, INTERPRETER), INTERPRETER)
        acc = tl.dot(w2, h, acc, input_precision=PRECISION)  # padded rows of w2 are zero
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_s, mask=offs_s < S, other=0.0).to(tl.float32)[:, None]
    out_off = _slab_offsets(b, offs_s, offs_c, sob, sos, soc, IDX64)
    if STORE_BRANCH:
        tl.store(branch_ptr + out_off, round_to(acc, branch_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    if HAS_SS:
        acc *= tl.load(ss_ptr + b).to(tl.float32)
    # x is re-read here rather than kept live through the loop: it would cost S_PAD·BLOCK_C registers.
    x, mask, _ = _load_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, IDX64)
    tl.store(out_ptr + out_off, round_to(x.to(tl.float32) + acc, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def token_mlp_dx_kernel(
    x_ptr, do_ptr, g_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
    w1_ptr, b1_ptr, w2_ptr,
    S, C, D,
    sxb, sxs, sxc, sdb, sds, sdc,
    sw1d, sw1s, sw2s, sw2d,
    NORM: tl.constexpr, HAS_B1: tl.constexpr, APPROX_TANH: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g = dL/dN(x) = W1ᵀ · (GELU'(Z) ⊙ (W2ᵀ · dO)) for one image's slab, written in fp32 to ``g``
    ((B·S, C) contiguous); dO = dL/d(branch before scale)."""
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    xn, mask = _normalised_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
                                w1_ptr.dtype.element_ty, NORM, INTERPRETER, IDX64)
    do = _operand(_load_slab(do_ptr, b, offs_s, offs_c, S, C, sdb, sds, sdc, IDX64)[0], INTERPRETER)
    g = tl.zeros((S_PAD, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w1 = _operand(_w1_slice(w1_ptr, d0, D, S, sw1d, sw1s, BLOCK_D, S_PAD), INTERPRETER)
        w2t = _operand(_w2t_slice(w2_ptr, d0, D, S, sw2s, sw2d, BLOCK_D, S_PAD), INTERPRETER)
        z = tl.dot(w1, xn, input_precision=PRECISION)
        if HAS_B1:
            z += tl.load(b1_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        da = tl.dot(w2t, do, input_precision=PRECISION)  # (BLOCK_D, BLOCK_C)
        dz = _operand(round_to(da * gelu_grad(z, APPROX_TANH), w1_ptr.dtype.element_ty, INTERPRETER),
                      INTERPRETER)
        g = tl.dot(tl.trans(w1), dz, g, input_precision=PRECISION)
    g_off = _slab_offsets(b, offs_s, offs_c, S * C, C, 1, IDX64)
    tl.store(g_ptr + g_off, g, mask=mask)


@triton.jit
def token_mlp_dw_kernel(
    x_ptr, do_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
    w1_ptr, b1_ptr, w2_ptr, dw1_ptr, dw2_ptr, db1_ptr,
    B, S, C, D, SPLITS,
    sxb, sxs, sxc, sdb, sds, sdc,
    sw1d, sw1s, sw2s, sw2d,
    NORM: tl.constexpr, HAS_B1: tl.constexpr, APPROX_TANH: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, PART: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial dW1 (D, S) and db1 (D,) (PART 0 or 1) and dW2 (S, D) (PART 0 or 2) over images split,
    split + SPLITS, … for one BLOCK_D slice, written to slot ``split`` of fp32 buffers (SPLITS, …).
    At S_PAD ≥ 128 the two BLOCK_D × S_PAD accumulators do not fit in registers together (measured:
    spills), so the launcher runs PART 1 and PART 2 as two kernels, each recomputing the hidden tile."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_s = offs_s < S
    w1 = _operand(_w1_slice(w1_ptr, pid_d * BLOCK_D, D, S, sw1d, sw1s, BLOCK_D, S_PAD), INTERPRETER)
    w2t = _operand(_w2t_slice(w2_ptr, pid_d * BLOCK_D, D, S, sw2s, sw2d, BLOCK_D, S_PAD), INTERPRETER)
    if HAS_B1:
        b1 = tl.load(b1_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dw1 = tl.zeros((BLOCK_D, S_PAD), dtype=tl.float32)
    dw2t = tl.zeros((BLOCK_D, S_PAD), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_c = tl.cdiv(C, BLOCK_C)
    for item in range(split, B * n_c, SPLITS):
        b = item // n_c
        offs_c = (item % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        xn, _ = _normalised_slab(x_ptr, b, offs_s, offs_c, S, C, sxb, sxs, sxc, mean_ptr, rstd_ptr, nw_ptr,
                                 nb_ptr, w1_ptr.dtype.element_ty, NORM, INTERPRETER, IDX64)
        do = _operand(_load_slab(do_ptr, b, offs_s, offs_c, S, C, sdb, sds, sdc, IDX64)[0], INTERPRETER)
        z = tl.dot(w1, xn, input_precision=PRECISION)  # (BLOCK_D, BLOCK_C)
        if HAS_B1:
            z += b1[:, None]
        h = _operand(round_to(gelu(z, APPROX_TANH), w2_ptr.dtype.element_ty, INTERPRETER), INTERPRETER)
        if PART != 1:
            dw2t = tl.dot(h, tl.trans(do), dw2t, input_precision=PRECISION)  # (BLOCK_D, S_PAD) = (dO · Hᵀ)ᵀ
        if PART != 2:
            da = tl.dot(w2t, do, input_precision=PRECISION)
            dz = da * gelu_grad(z, APPROX_TANH)
            dz = tl.where((offs_c < C)[None, :], dz, 0.0)
            db1 += tl.sum(dz, axis=1)
            dz = _operand(round_to(dz, w1_ptr.dtype.element_ty, INTERPRETER), INTERPRETER)
            dw1 = tl.dot(dz, tl.trans(xn), dw1, input_precision=PRECISION)
    out_mask = mask_d[:, None] & mask_s[None, :]
    base = split.to(tl.int64) * D * S
    if PART != 2:
        tl.store(dw1_ptr + base + offs_d[:, None] * S + offs_s[None, :], dw1, mask=out_mask)
        tl.store(db1_ptr + split.to(tl.int64) * D + offs_d, db1, mask=mask_d)
    if PART != 1:
        tl.store(dw2_ptr + base + offs_s[None, :] * D + offs_d[:, None], dw2t, mask=out_mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers


NORMS = {"layernorm": 1, "affine": 2}


def gpu_config(kernel: str, S_PAD: int, D: int) -> Tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_D, num_warps, num_stages) on a GPU for ``kernel`` (token_mlp_fwd / _dx / _dw).

    The S_PAD × BLOCK_C accumulator and the BLOCK_D × S_PAD weight slices share the register file. In
    bf16 and fp16 every config here compiles with wgmma and no spills on sm_90a under both toolchains the
    backend uses, triton 3.6 assembled by CUDA 13.0's ptxas (toolchain.py) and triton 3.8 with its bundled
    ptxas 12.9, both in ``mixer-fast report`` (no argument specialised) and specialised as a launch is (unit
    strides constant, 16-divisible ones and the pointers marked); one exception below (bench/NOTES.md).

    S_PAD 256 (S = 196). Measured on an H200, token forward at Mixer-B/16 (shared/gpu/2026-11-27-H200):
    (BLOCK_C 16, BLOCK_D 64, 8 warps, 1 stage) 1.75 ms, (64, 64, 8, 1) 0.82, (128, 64, 8, 1) 0.72,
    (64, 32, 4, 2) 0.58: wider channel tiles (fewer CTAs re-streaming both weights) and a second stage
    (the next BLOCK_D step's weight slices load by 16-byte cp.async, given token_weights' aligned rows,
    while this one multiplies) are what pay. But (64, 32, 4, 2) spills under both toolchains (32 B / 744 B
    specialised, over 2 KB in the report), as do BLOCK_C 128 and BLOCK_D 64 at BLOCK_C ≥ 32 in the
    forward; at 2 stages only (32, 16, 8, 2) is spill-free in every compile, the fp32-activation
    (autocast) forward included ((64, 16, 8, 2) spills 128 B there under triton 3.6; (64, 32, 8, 2)
    160-208 B in the report): not yet timed on a GPU. dx: the same (32, 16, 8, 2); (64, 16, 8, 2) spills
    160 B with CUDA 13.5's ptxas (the gpu extra's). dW: every dot has M = BLOCK_D, so wgmma needs
    BLOCK_D 64, and no such config is spill-free for part 1 (dW1, db1) in all compiles: (16, 64, 8, 2) is
    the least-spilling (312 B in triton 3.6's report with ptxas 13.0, 844 B with 13.5; none specialised),
    and part 2, which shares its config, image split and buffers, is spill-free at it.
    S_PAD 64 (S = 49): BLOCK_C 128 for the forward and dx (a quarter of the CTAs of BLOCK_C 32), 64 for
    dW (its programs loop over channel tiles; 128 spills), 2 stages throughout.

    fp32 (``"ieee"`` dots run on the FMA units: never wgmma) spills at all of these, as it did before;
    it fits only 16 × 16 tiles (bench/NOTES.md) and there is no dtype argument to choose them by."""
    if S_PAD <= 64:
        if kernel == "token_mlp_dw":
            return 64, min(64, _launch.pow2(D)), 8, 2
        return 128, min(32, _launch.pow2(D)), 8, 2
    if kernel == "token_mlp_dw":
        return 16, min(64, _launch.pow2(D)), 8, 2
    return 32, 16, 8, 2


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of GRANULE (196 → 208)."""
    return -(-int(n) // GRANULE) * GRANULE


def token_weights(w1, w2, pad_columns):
    """(W1 (D, S), W2 (S, D)) as the token kernels read them, for the torch and the JAX launchers alike:
    unit column stride, a row stride that is a multiple of GRANULE elements, and zero columns from the
    width (S for W1, D for W2) up to ``aligned`` of it (_w1_slice, _w2t_slice rely on all three).
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


def dw_parts(S_PAD: int) -> Tuple[int, ...]:
    """token_mlp_dw_kernel launches: both gradients at once, or dW1 and dW2 apart when they don't fit."""
    return (0,) if (_launch.INTERPRET or S_PAD <= 64) else (1, 2)


def launch_blocks(kernel: str, S_PAD: int, D: int) -> Tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_D, num_warps, num_stages) of a token kernel launch: gpu_config's (the configs the
    static report compiles), or small blocks in the interpreter."""
    if _launch.INTERPRET:
        return max(16, min(64, 16384 // S_PAD)), 16, 4, 1
    return gpu_config(kernel, S_PAD, D)


def dw_splits(n_d_tiles: int, work: int) -> int:
    """Image shares for the dW kernel: enough programs to fill a GPU, each a deterministic partial."""
    if _launch.INTERPRET:
        return min(2, work)
    return max(1, min(work, 264 // max(n_d_tiles, 1)))


def token_mixing_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], *,
    eps: float, approximate: str, norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor],
    store_branch: bool, allow_tf32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or None, branch (B, S, C) or None).

    ``branch`` is the MLP output before scale/sample_scale, kept only when ``store_branch`` (the
    backward needs it for the gradient of ``scale``)."""
    _launch.check_device(x)
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
            b_pro=5 if norm == "layernorm" else 2, b_vec=(nw, nb),
            b_stats=(mean, rstd) if mean is not None else None, bias=fc1_bias, bias_on_m=True,
            aux=branch, aux_axes=o_axes if branch is not None else None, store_branch=store_branch,
            scale=scale, ss=sample_scale, ss_on_n=True, res=x, res_axes=(flat(S, xs[1]), n_axis),
            approximate=approximate, allow_tf32=allow_tf32)
        return out, mean, rstd, branch
    D = fc1_weight.shape[0]
    S_PAD = _launch.pow2(S)
    block_c, block_d, warps, stages = launch_blocks("token_mlp_fwd", S_PAD, D)
    w1, w2 = token_weights(fc1_weight, fc2_weight, _pad_columns)
    dummy = nw
    with _launch.serialized():
        token_mlp_fwd_kernel[(triton.cdiv(C, block_c), B)](
            x, out, branch if branch is not None else out, mean if mean is not None else nw,
            rstd if rstd is not None else nw, nw, nb,
            w1, fc1_bias if fc1_bias is not None else dummy, w2,
            fc2_bias if fc2_bias is not None else dummy, scale if scale is not None else dummy,
            sample_scale if sample_scale is not None else dummy,
            S, C, D, *x.stride(), *out.stride(), *w1.stride(), *w2.stride(),
            NORM=NORMS[norm], HAS_B1=fc1_bias is not None, HAS_B2=fc2_bias is not None,
            HAS_SCALE=scale is not None, HAS_SS=sample_scale is not None, STORE_BRANCH=store_branch,
            APPROX_TANH=approximate == "tanh", PRECISION=_launch.precision(fc1_weight.dtype, allow_tf32),
            INTERPRETER=_launch.INTERPRET, IDX64=_launch.needs_int64(x, out), S_PAD=S_PAD, BLOCK_C=block_c,
            BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return out, mean, rstd, branch


def branch_grad(dout: Tensor, scale: Optional[Tensor], sample_scale: Optional[Tensor]) -> Tensor:
    """dL/d(branch before scale) = dout · scale · sample_scale, in dout's dtype (dout itself if neither):
    one multiply in fp32 (the factor is fp32, C or B × C elements) rounded once into dout's dtype, with no
    fp32 copy of dout."""
    import torch

    if scale is None and sample_scale is None:
        return dout
    f = scale.float() if scale is not None else 1.0
    if sample_scale is not None:
        f = sample_scale.float().view(-1, 1, 1) * f
    return torch.mul(dout, f, out=torch.empty_like(dout))


def scale_grad(dout: Tensor, branch: Tensor, sample_scale: Optional[Tensor]) -> Tensor:
    """dL/dscale (C,) fp32 = Σ_(b, s) dout · branch · sample_scale. The product is rounded to the
    activations' dtype, as eager autograd forms it, and summed in fp32: no fp32 copy of either activation
    (``x.float()`` made three). sample_scale multiplies the per-image sums (B × C)."""
    import torch

    if sample_scale is None:
        return torch.mul(dout, branch).sum((0, 1), dtype=torch.float32)
    return (torch.mul(dout, branch).sum(1, dtype=torch.float32) * sample_scale.float()[:, None]).sum(0)


def norm_backward(g: Tensor, x: Tensor, dout: Tensor, norm_weight: Optional[Tensor], mean: Optional[Tensor],
                  rstd: Optional[Tensor], norm: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dnorm_weight, dnorm_bias) from g = dL/dN(x) (B·S, C) fp32 and the residual's dout."""
    import torch

    if norm == "layernorm":
        return layer_norm_backward(g, x, dout, mean, rstd, norm_weight)
    B, S, C = x.shape
    g3 = g.view(B, S, C)
    dx = torch.empty_like(x)  # dout + g·w computed in fp32, rounded once into x's dtype
    if norm_weight is not None:
        torch.addcmul(dout, g3, norm_weight.float(), out=dx)
    else:
        torch.add(dout, g3, out=dx)
    return dx, (g3 * x).sum((0, 1)), g3.sum((0, 1))


def token_mixing_backward(
    dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
    mean: Optional[Tensor], rstd: Optional[Tensor], branch: Optional[Tensor], *, eps: float, approximate: str,
    norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor], allow_tf32: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Gradients of token mixing for dout = dL/dout (B, S, C): keys x, norm_weight, norm_bias, fc1_weight,
    fc1_bias, fc2_weight, fc2_bias, scale (fp32 for parameters; cast by the caller)."""
    import torch

    B, S, C = x.shape
    grads: Dict[str, Optional[Tensor]] = {}
    do = branch_grad(dout, scale, sample_scale).to(fc1_weight.dtype)  # the autocast dtype, if any
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    g = _launch.new_output((B * S, C), x, torch.float32)
    prec = _launch.precision(fc1_weight.dtype, allow_tf32)
    if scale is not None:
        grads["scale"] = scale_grad(dout, branch, sample_scale)
    if fc2_weight is None:
        ws, ds, xs = fc1_weight.stride(), do.stride(), x.stride()
        fused_matmul(fc1_weight, (flat(S, ws[1]), flat(S, ws[0])), do, (flat(S, ds[1]), split(C, ds[0], ds[2])),
                     g, (flat(S, C), split(C, S * C, 1)), S, B * C, S, variant="plain", allow_tf32=allow_tf32)
        xn_src, b_pro, b_vec = x, 3, (nw, nb)
        if norm == "layernorm":
            # Rare combination (no named model uses it): normalise once here rather than add a kernel mode.
            xn_src = torch.nn.functional.layer_norm(x, (C,), norm_weight, norm_bias, eps).to(fc1_weight.dtype)
            b_pro, b_vec = 0, None
        xs = xn_src.stride()
        dw = _launch.new_output((S, S), x, torch.float32)
        fused_matmul(do, (flat(S, ds[1]), split(C, ds[0], ds[2])), xn_src, (split(C, xs[0], xs[2]), flat(S, xs[1])),
                     dw, (flat(S, S), flat(S, 1)), S, S, B * C, variant="ln_b", b_pro=b_pro, b_vec=b_vec, allow_tf32=allow_tf32)
        grads["fc1_weight"] = dw
        grads["fc1_bias"] = do.sum((0, 2), dtype=torch.float32) if fc1_bias is not None else None
    else:
        D = fc1_weight.shape[0]
        S_PAD = _launch.pow2(S)
        stats = (mean, rstd) if mean is not None else (nw, nw)
        common = dict(NORM=NORMS[norm], HAS_B1=fc1_bias is not None, APPROX_TANH=approximate == "tanh",
                      PRECISION=prec, INTERPRETER=_launch.INTERPRET, IDX64=_launch.needs_int64(x, do, g), S_PAD=S_PAD)
        b1 = fc1_bias if fc1_bias is not None else nw
        w1, w2 = token_weights(fc1_weight, fc2_weight, _pad_columns)
        block_c, block_d, warps, stages = launch_blocks("token_mlp_dx", S_PAD, D)
        if B:
            with _launch.serialized():
                token_mlp_dx_kernel[(triton.cdiv(C, block_c), B)](
                    x, do, g, *stats, nw, nb, w1, b1, w2, S, C, D, *x.stride(), *do.stride(),
                    *w1.stride(), *w2.stride(), **common, BLOCK_C=block_c, BLOCK_D=block_d,
                    num_warps=warps, num_stages=stages)
        block_c, block_d, warps, stages = launch_blocks("token_mlp_dw", S_PAD, D)
        n_d = triton.cdiv(D, block_d)
        splits = max(1, dw_splits(n_d, B * triton.cdiv(C, block_c)))
        dw1 = _launch.new_output((splits, D, S), x, torch.float32)
        dw2 = _launch.new_output((splits, S, D), x, torch.float32)
        db1 = _launch.new_output((splits, D), x, torch.float32)
        for part in dw_parts(S_PAD):  # runs with B = 0 too: it writes the zero gradients
            with _launch.serialized():
                token_mlp_dw_kernel[(n_d, splits)](
                    x, do, *stats, nw, nb, w1, b1, w2, dw1, dw2, db1, B, S, C, D, splits,
                    *x.stride(), *do.stride(), *w1.stride(), *w2.stride(), **common, PART=part,
                    BLOCK_C=block_c, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
        grads["fc1_weight"], grads["fc2_weight"] = dw1.sum(0), dw2.sum(0)
        grads["fc1_bias"] = db1.sum(0) if fc1_bias is not None else None
        grads["fc2_bias"] = do.sum((0, 2), dtype=torch.float32) if fc2_bias is not None else None
    grads["x"], dnw, dnb = norm_backward(g, x, dout, norm_weight, mean, rstd, norm)
    grads["norm_weight"] = dnw if norm_weight is not None else None
    grads["norm_bias"] = dnb if norm_bias is not None else None
    return grads
