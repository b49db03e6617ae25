"""The norms' pieces that the mixing ops share: LayerNorm's per-token statistics and row-wise backward,
the backward of ResMLP's affine, and either norm applied in a pass of its own (for cuBLAS GEMMs).

The fused ops apply LayerNorm while loading tiles, but the statistics span all C channels of a token
while the GEMMs tile C, so they are computed once here (fp32 mean and 1/std per token) and read back.
The backward needs two sums over all C per token, so it runs once the GEMMs have produced dL/dLN(x).
Tokens are addressed as row r → (r // S, r % S) of a (B, S, C) tensor with arbitrary strides.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import gelu, gelu_grad, round_to

if TYPE_CHECKING:  # torch loads when a launcher runs; the JAX path (jax_launch.py) never needs it
    import torch

    Tensor = torch.Tensor


@triton.jit
def ln_stats_kernel(
    x_ptr, R, S, C, eps,
    sxb, sxs, sxc,
    mean_ptr, rstd_ptr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Parameters here and in ln_backward_kernel run inputs, scalars, outputs, constexprs: jax-triton's
    # order, so the JAX launchers (jax_launch.py) launch these kernels themselves.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    r64 = rows.to(tl.int64)
    base = (r64 // S) * sxb + (r64 % S) * sxs
    # Two passes (mean, then squared deviations): the one-pass E[x²] − E[x]² loses digits when |mean| ≫ std.
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = mask_r[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + base[:, None] + cols.to(tl.int64)[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        total += tl.sum(x, axis=1)
    mean = total / C
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = mask_r[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + base[:, None] + cols.to(tl.int64)[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[:, None], 0.0)
        sq += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def ln_backward_kernel(
    g_ptr, x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr,
    R, S, C,
    sgb, sgs, sgc, sxb, sxs, sxc, syb, sys, syc, sdb, sds, sdc,
    dx_ptr, dw_part_ptr, db_part_ptr,
    HAS_W: tl.constexpr, HAS_DY: tl.constexpr, GELU_IN: tl.constexpr, APPROX_TANH: tl.constexpr,
    G_SPLIT: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = dy + rstd · (ĝ − mean_c(ĝ) − x̂ · mean_c(ĝ · x̂)), ĝ = g · w, per token; and this program's
    partial sums over its rows of g · x̂ and g (the LayerNorm weight and bias gradients), one row of
    ``dw_part`` / ``db_part`` per program, summed afterwards in a fixed order (deterministic).

    GELU_IN (gMLP's gate): ``x_ptr`` holds z and the normalised input was GELU(z) rounded to z's dtype;
    it is recomputed, and dx is the gradient with respect to z (× GELU'(z)). Without HAS_DY, no dy term."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    r64 = rows.to(tl.int64)
    x_base = (r64 // S) * sxb + (r64 % S) * sxs
    y_base = (r64 // S) * syb + (r64 % S) * sys
    d_base = (r64 // S) * sdb + (r64 % S) * sds
    # G_SPLIT: g addressed by (image, token) strides (the cuBLAS engine's token-major g); else rows of stride
    # sgs, 43 registers fewer (report, triton 3.8, sm_90a: 143 against 186)
    if G_SPLIT:
        g_base = (r64 // S) * sgb + (r64 % S) * sgs
    else:
        g_base = r64 * sgs
    mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
    sum_g = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c64 = cols.to(tl.int64)
        m = mask_r[:, None] & (cols < C)[None, :]
        g = tl.load(g_ptr + g_base[:, None] + c64[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + x_base[:, None] + c64[None, :] * sxc, mask=m, other=0.0)
        if GELU_IN:
            x = round_to(gelu(x.to(tl.float32), APPROX_TANH), x_ptr.dtype.element_ty, INTERPRETER)
        x = x.to(tl.float32)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = g * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
    mean_g = sum_g / C
    mean_gx = sum_gx / C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c64 = cols.to(tl.int64)
        mask_c = cols < C
        m = mask_r[:, None] & mask_c[None, :]
        g = tl.load(g_ptr + g_base[:, None] + c64[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
        z = tl.load(x_ptr + x_base[:, None] + c64[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        x = z
        if GELU_IN:
            x = round_to(gelu(z, APPROX_TANH), x_ptr.dtype.element_ty, INTERPRETER).to(tl.float32)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        # int64: the partials hold cdiv(R, rows a program) · C values, past 2³¹ from R · C ≈ 2³⁴
        tl.store(dw_part_ptr + pid.to(tl.int64) * C + c64, tl.sum(g * xhat, axis=0), mask=mask_c)
        tl.store(db_part_ptr + pid.to(tl.int64) * C + c64, tl.sum(g, axis=0), mask=mask_c)
        if HAS_W:
            g = g * tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        if GELU_IN:
            dx = dx * gelu_grad(z, APPROX_TANH)
        if HAS_DY:
            dx += tl.load(dy_ptr + y_base[:, None] + c64[None, :] * syc, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + d_base[:, None] + c64[None, :] * sdc, round_to(dx, dx_ptr.dtype.element_ty, INTERPRETER), mask=m)


@triton.jit
def token_tile(ptr, r64, c64, mask, S, sb, ss, sc):
    """Tokens r64 (row r: image r // S, token r % S) × channels c64 of a (B, S, C) tensor with strides (sb, ss,
    sc), in fp32; zero outside ``mask``."""
    return tl.load(ptr + ((r64 // S) * sb + (r64 % S) * ss)[:, None] + c64[None, :] * sc, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def channel_vector(ptr, cols, mask_c, HAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """ptr[cols] in fp32 (zero outside ``mask_c``), or ones where there is no such vector (not HAS)."""
    if HAS:
        return tl.load(ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    else:
        return tl.full((BLOCK_C,), 1.0, tl.float32)


@triton.jit
def norm_apply_kernel(
    x_ptr, w_ptr, b_ptr, rb_ptr, rs_ptr,
    R, S, C, eps,
    sxb, sxs, sxc, snb, sns,
    mean_ptr, rstd_ptr, xn_ptr, r_ptr,
    LAYERNORM: tl.constexpr, STATS_GIVEN: tl.constexpr, STORE_R: tl.constexpr, HAS_RS: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """N(x) = x̂ · w + b (in xn's dtype; token (b, s) at b · snb + s · sns, channels contiguous) for tokens
    of x (B, S, C) with strides (sxb, sxs, sxc); x̂ = (x − mean) · rstd under LAYERNORM (statistics read when STATS_GIVEN, else computed as
    ln_stats_kernel does and stored), x under ResMLP's affine. STORE_R: also r = x + rs ⊙ rb ((R, C) in r's
    dtype; rb, rs per channel, rs 1 without HAS_RS): the residual stream a cuBLAS GEMM then accumulates into.
    The row is re-read per loop from L1/L2: x comes from HBM once."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    r64 = rows.to(tl.int64)
    base = (r64 // S) * sxb + (r64 % S) * sxs
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
    rstd = tl.full((BLOCK_R,), 1.0, tl.float32)
    if LAYERNORM:
        if STATS_GIVEN:
            mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        else:
            total = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m = mask_r[:, None] & (cols < C)[None, :]
                total += tl.sum(tl.load(x_ptr + base[:, None] + cols.to(tl.int64)[None, :] * sxc, mask=m,
                                        other=0.0).to(tl.float32), axis=1)
            mean = total / C
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m = mask_r[:, None] & (cols < C)[None, :]
                x = tl.load(x_ptr + base[:, None] + cols.to(tl.int64)[None, :] * sxc, mask=m, other=0.0)
                d = tl.where(m, x.to(tl.float32) - mean[:, None], 0.0)
                sq += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(sq / C + eps)
            tl.store(mean_ptr + rows, mean, mask=mask_r)
            tl.store(rstd_ptr + rows, rstd, mask=mask_r)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < C
        c64 = cols.to(tl.int64)
        m = mask_r[:, None] & mask_c[None, :]
        x = token_tile(x_ptr, r64, c64, m, S, sxb, sxs, sxc)
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
        xn = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        out = r64[:, None] * C + c64[None, :]
        xn_out = ((r64 // S) * snb + (r64 % S) * sns)[:, None] + c64[None, :]
        tl.store(xn_ptr + xn_out, round_to(xn, xn_ptr.dtype.element_ty, INTERPRETER), mask=m)
        if STORE_R:
            rb = tl.load(rb_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
            rs = channel_vector(rs_ptr, cols, mask_c, HAS_RS, BLOCK_C)
            tl.store(r_ptr + out, round_to(x + rs[None, :] * rb[None, :], r_ptr.dtype.element_ty, INTERPRETER),
                     mask=m)


@triton.jit
def affine_backward_kernel(
    g_ptr, x_ptr, dy_ptr, w_ptr,
    R, S, C,
    sgb, sgs, sgc, sxb, sxs, sxc, syb, sys, syc,
    dx_ptr, dw_part_ptr, db_part_ptr,
    HAS_W: tl.constexpr, INTERPRETER: tl.constexpr, ROW_GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ResMLP's affine N(x) = w ⊙ x + b backward with the residual: dx = dy + g · w ((R, C) contiguous, in
    dx's dtype), and partial sums of g · x and g (w's and b's gradients) over tokens pid_r · ROW_GROUP …
    into row pid_r of ``dw_part`` / ``db_part`` (·, C). No statistics: a program owns a channel block."""
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    c64 = cols.to(tl.int64)
    w = channel_vector(w_ptr, cols, mask_c, HAS_W, BLOCK_C)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(pid_r * ROW_GROUP, pid_r * ROW_GROUP + ROW_GROUP, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r64 = rows.to(tl.int64)
        m = (rows < R)[:, None] & mask_c[None, :]
        g = token_tile(g_ptr, r64, c64, m, S, sgb, sgs, sgc)
        x = token_tile(x_ptr, r64, c64, m, S, sxb, sxs, sxc)
        dy = token_tile(dy_ptr, r64, c64, m, S, syb, sys, syc)
        dw_acc += tl.sum(g * x, axis=0)
        db_acc += tl.sum(g, axis=0)
        tl.store(dx_ptr + r64[:, None] * C + c64[None, :], round_to(dy + g * w[None, :], dx_ptr.dtype.element_ty,
                 INTERPRETER), mask=m)
    tl.store(dw_part_ptr + pid_r.to(tl.int64) * C + c64, dw_acc, mask=mask_c)
    tl.store(db_part_ptr + pid_r.to(tl.int64) * C + c64, db_acc, mask=mask_c)


# ---------------------------------------------------------------------------------------------------------
# Launchers


ROWS = 8


def gpu_block_c(C: int) -> int:
    # 8 rows × 256 channels: no spills on sm_90a (measured: 16 × 1024 spilled 38 KB in the backward).
    return min(_launch.pow2(C), 256)


def block_c(C: int) -> int:
    """The channel block of the LayerNorm kernels (smaller in the interpreter, where it only costs time)."""
    return min(_launch.pow2(C), 128) if _launch.INTERPRET else gpu_block_c(C)


def rows_launch(R: int, C: int) -> Tuple[Tuple[int], Dict[str, int]]:
    """(grid, tile constexprs) of the row kernels (ln_stats, norm_apply, ln_backward) over R token rows of C
    channels, for the torch and the JAX launchers alike: ROWS rows a program."""
    return (triton.cdiv(R, ROWS),), dict(BLOCK_R=ROWS, BLOCK_C=block_c(C))


def ln_backward_flags(*, has_w: bool, has_dy: bool, gelu_in: Optional[str], g_split: bool,
                      interpreter: bool) -> Dict[str, object]:
    """ln_backward_kernel's flags, for both launchers: a norm weight, a residual gradient dy, the input
    through GELU (``gelu_in`` "none" / "tanh", gMLP's gate; None: plain x), g token-major (``g_split``)."""
    return dict(HAS_W=has_w, HAS_DY=has_dy, GELU_IN=gelu_in is not None, G_SPLIT=g_split,
                APPROX_TANH=gelu_in == "tanh", INTERPRETER=interpreter)


def layer_norm_stats(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and 1/std over C of x (B, S, C), each fp32 (B·S,)."""
    import torch

    B, S, C = x.shape
    R = B * S
    mean = _launch.new_output((R,), x, torch.float32)
    rstd = _launch.new_output((R,), x, torch.float32)
    if R:
        grid, tiles = rows_launch(R, C)
        with _launch.serialized():
            _launch.on_grid(ln_stats_kernel, grid)(x, R, S, C, eps, *x.stride(), mean, rstd, **tiles)
    return mean, rstd


def norm_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, norm: str, eps: float,
               dtype: torch.dtype, stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               res_bias: Optional[torch.Tensor] = None, res_scale: Optional[torch.Tensor] = None,
               token_major: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """N(x) for x (B, S, C): LayerNorm (``norm`` "layernorm") or ResMLP's affine ("affine"), weight and bias
    (C,). Returns (xn in ``dtype``: (B·S, C) contiguous, or with ``token_major`` (S, B·C) contiguous, the
    token GEMMs' operand; mean, rstd (B·S,) fp32 or None under the affine; r).
    ``stats``: LayerNorm's (mean, rstd) to use instead of computing them (the backward's recompute).
    ``res_bias`` (C,): also r = x + res_scale ⊙ res_bias ((B·S, C) in x's dtype; ``res_scale`` (C,) or
    None), in the same pass; else r is None."""
    import torch

    if norm not in ("layernorm", "affine"):
        raise ValueError(f"norm: expected 'layernorm' or 'affine', got {norm!r}")
    B, S, C = x.shape
    R = B * S
    layernorm = norm == "layernorm"
    xn = _launch.new_output((S, B * C) if token_major else (R, C), x, dtype)
    snb, sns = (C, B * C) if token_major else (S * C, C)
    r = _launch.new_output((R, C), x, x.dtype) if res_bias is not None else None
    mean = rstd = None
    if layernorm:
        mean, rstd = stats if stats is not None else (_launch.new_output((R,), x, torch.float32),
                                                      _launch.new_output((R,), x, torch.float32))
    if R and C:
        grid, tiles = rows_launch(R, C)
        with _launch.serialized():
            _launch.on_grid(norm_apply_kernel, grid)(
                x, weight, bias, res_bias if res_bias is not None else weight,
                res_scale if res_scale is not None else weight, R, S, C, eps, *x.stride(), snb, sns,
                mean if mean is not None else xn, rstd if rstd is not None else xn, xn, r if r is not None else xn,
                LAYERNORM=layernorm, STATS_GIVEN=stats is not None, STORE_R=r is not None,
                HAS_RS=res_scale is not None, INTERPRETER=_launch.INTERPRET, **tiles)
    return xn, mean, rstd, r


def token_strides(t: torch.Tensor, S: int) -> Tuple[int, int, int]:
    """(image, token, channel) strides of a (B, S, C) tensor, or of a (B·S, C) table of its tokens (rows
    image-major; a (B, S, C) view of token-major storage, (S, B, C), has strides (C, B·C, 1))."""
    if t.dim() == 2:
        return S * t.stride(0), t.stride(0), t.stride(1)
    return tuple(t.stride())


def layer_norm_backward(g: torch.Tensor, x: torch.Tensor, dy: Optional[torch.Tensor], mean: torch.Tensor,
                        rstd: torch.Tensor, weight: Optional[torch.Tensor], *, gelu_in: Optional[str] = None,
                        dx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx = dy + LayerNorm-backward(g) for x (B, S, C), g = dL/dLN(x) (B·S, C or B, S, C, any strides; any
    float dtype); returns
    (dx (B, S, C) in x's dtype, dweight (C,) fp32, dbias (C,) fp32). ``dy`` None: no residual term.
    ``gelu_in`` ("none" / "tanh", gMLP's gate): x holds z, the normalised input was GELU(z), and dx is
    with respect to z. ``dx``: a (B, S, C) view to write into (strided: a half of gMLP's dZ)."""
    import torch

    B, S, C = x.shape
    R = B * S
    grid, tiles = rows_launch(R, C)
    programs = grid[0]
    g_strides = token_strides(g, S)
    if dx is None:
        dx = _launch.new_output((B, S, C), x, x.dtype)
    dw_part = _launch.new_output((programs, C), x, torch.float32)
    db_part = _launch.new_output((programs, C), x, torch.float32)
    if R:
        with _launch.serialized():
            _launch.on_grid(ln_backward_kernel, grid)(
                g, x, dy if dy is not None else x, mean, rstd, weight if weight is not None else mean, R, S, C,
                *g_strides, *x.stride(), *(dy if dy is not None else x).stride(), *dx.stride(), dx, dw_part, db_part,
                **ln_backward_flags(has_w=weight is not None, has_dy=dy is not None, gelu_in=gelu_in,
                                    g_split=g_strides[0] != S * g_strides[1], interpreter=_launch.INTERPRET),
                **tiles)
    return dx, dw_part.sum(0), db_part.sum(0)


# affine_backward_kernel's tiles: a memory-bound pass, as residual.residual_grad_kernel's (8 × 128 on 4
# warps, 16 tiles a program: 64 registers, report sm_90a), so the partial rows are R / 128 × C fp32.
AFFINE_ROW_GROUP, AFFINE_BLOCK_R, AFFINE_BLOCK_C = 128, 8, 128


def affine_backward(g: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, weight: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx = dy + g ⊙ weight for x (B, S, C) under ResMLP's affine norm, g = dL/dN(x) (B·S, C or B, S, C, any
    strides; any float dtype); returns (dx (B, S, C) contiguous in x's dtype, dweight = Σ g ⊙ x (C,) fp32, dbias = Σ g (C,)
    fp32), in one pass over g, x and dy."""
    import torch

    B, S, C = x.shape
    R = B * S
    groups = triton.cdiv(R, AFFINE_ROW_GROUP)
    dx = _launch.new_output((B, S, C), x, x.dtype)
    dw_part = _launch.new_output((groups, C), x, torch.float32)
    db_part = _launch.new_output((groups, C), x, torch.float32)
    if R and C:
        with _launch.serialized():
            _launch.on_grid(affine_backward_kernel, (groups, triton.cdiv(C, AFFINE_BLOCK_C)))(
                g, x, dy, weight if weight is not None else dy, R, S, C, *token_strides(g, S), *x.stride(),
                *dy.stride(),
                dx, dw_part, db_part, HAS_W=weight is not None, INTERPRETER=_launch.INTERPRET,
                ROW_GROUP=AFFINE_ROW_GROUP, BLOCK_R=AFFINE_BLOCK_R, BLOCK_C=AFFINE_BLOCK_C)
    return dx, dw_part.sum(0), db_part.sum(0)
