"""The cuBLAS engine: the mixing ops on torch's GEMMs (cuBLAS on a GPU) with fused Triton element-wise
passes around them, each one pass over its tensors; same arguments and saved tensors as the fused kernels,
so either engine's backward follows either's forward. Chosen per process: matmul.gemm_engine() for the
channel GEMMs (channel mixing, gMLP's fc1 / fc2, ResMLP's token linear), token_mixing.token_engine() for
Mixer's token MLP.

Issue 17's fallback (and issue 16's, for the flash-MLP kernels): where the fused kernels cannot reach
cuBLAS speed, the GEMMs run in cuBLAS and only the memory-bound steps around them are fused.

Channel mixing:
forward   norm_apply: x → N(x) in the weights' dtype, the LayerNorm statistics, and r = x + scale ⊙ b2
          Z = N(x) · W1ᵀ + b1 (cuBLAS, bias in its epilogue); gelu_forward: H = GELU(Z) (in place without a
          backward; Triton's GELU, which the backward recomputes bit for bit)
          out = r + H · (scale ⊙ W2)ᵀ (cuBLAS accumulating into r: the residual add is the GEMM's C operand)
          With drop path, a learned layer scale or autocast's mixed dtypes the scale cannot fold into W2:
          Y = H · W2ᵀ + b2, then out = x + scale · ss · Y in one pass (and Y is the stored branch).
backward  residual_grad: dO, scale's and b2's gradients (as the fused engine's)
          dH = dO · W2 (cuBLAS); gelu_backward: dZ = dH ⊙ GELU'(Z) in place, H = GELU(Z), Σ dZ (b1's gradient)
          dW2 = dOᵀ · H; N(x) recomputed from x and the statistics; dW1 = dZᵀ · N(x); g = dZ · W1 (cuBLAS)
          norm_grads: dx = dout + N's backward of g, and the norm parameters' gradients.
Against eager, the forward saves x and Z only (eager: x, N(x), Z, H) and makes no separate bias, scale or
residual passes; the backward holds Z, dZ and H at its peak (eager: Z, H, dH, dZ).

gMLP's spatial gating (spatial_gating.py) runs its channel GEMMs (fc1, fc2 and their backward) on the same
pieces, keeping its fused token GEMMs for the gate. Token mixing: see its section below.

The weight gradients come from cuBLAS in the weights' dtype, as eager's do. cuBLAS is deterministic run to
run on one stream and GPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import gelu, gelu_grad, round_to
from .layer_norm import norm_apply
from .residual import PER_CHANNEL, PER_TOKEN, residual_add, residual_grad
from .token_mixing import norm_grads

if TYPE_CHECKING:  # torch loads when a launcher runs
    import torch

    Tensor = torch.Tensor


# Which sums of dZ gelu_backward_kernel makes (bias gradients): none, per column (channel mixing's fc1
# bias: Z is (tokens, hidden)) or per row (token mixing's: Z is (hidden, image · channel)).
DB_NONE, DB_COLUMNS, DB_ROWS = 0, 1, 2
_DB_COLUMNS = tl.constexpr(DB_COLUMNS)
_DB_ROWS = tl.constexpr(DB_ROWS)


@triton.jit
def gelu_backward_kernel(
    dh_ptr, z_ptr, bias_ptr, M, D,
    dz_ptr, h_ptr, db_part_ptr, D_BLOCKS,
    APPROX_TANH: tl.constexpr, ROW_BIAS: tl.constexpr, DB: tl.constexpr, INTERPRETER: tl.constexpr,
    ROW_GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For rows pid_r · ROW_GROUP … and columns pid_d · BLOCK_D … of (M, D) contiguous dH and Z, z = Z (+ the
    row's bias under ROW_BIAS): dZ = dH ⊙ GELU'(z) (dz_ptr may be dh_ptr: each element is read before it is
    written, by the same program) and H = GELU(z) rounded to h's dtype (as the forward made it); partial sums
    of dZ (fp32, before rounding): DB_COLUMNS into row pid_r of ``db_part`` (·, D), DB_ROWS into row pid_d
    of ``db_part`` (·, M), summed afterwards in a fixed order (deterministic). A 1-D grid of row groups ×
    D_BLOCKS column blocks: token mixing's D = B·C passes 65 535 · BLOCK_D (CUDA's limit on grid axis 1,
    which Triton's launcher does not check) from B·C = 8.4 M, batch 10 923 at Mixer-B/16."""
    pid = tl.program_id(0)
    pid_r = pid // D_BLOCKS
    pid_d = pid % D_BLOCKS
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(pid_r * ROW_GROUP, pid_r * ROW_GROUP + ROW_GROUP, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < M
        m = mask_r[:, None] & mask_d[None, :]
        offs = rows.to(tl.int64)[:, None] * D + c64[None, :]
        z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if ROW_BIAS:
            z += tl.load(bias_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)[:, None]
        dz = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32) * gelu_grad(z, APPROX_TANH)
        tl.store(dz_ptr + offs, round_to(dz, dz_ptr.dtype.element_ty, INTERPRETER), mask=m)
        tl.store(h_ptr + offs, round_to(gelu(z, APPROX_TANH), h_ptr.dtype.element_ty, INTERPRETER), mask=m)
        if DB == _DB_COLUMNS:
            acc += tl.sum(dz, axis=0)
        if DB == _DB_ROWS:  # masked elements are zero: dH loaded as 0
            tl.store(db_part_ptr + pid_d.to(tl.int64) * M + rows, tl.sum(dz, axis=1), mask=mask_r)
    if DB == _DB_COLUMNS:
        tl.store(db_part_ptr + pid_r.to(tl.int64) * D + c64, acc, mask=mask_d)


@triton.jit
def gelu_kernel(z_ptr, bias_ptr, N, NCOLS, h_ptr, APPROX_TANH: tl.constexpr, ROW_BIAS: tl.constexpr,
                INTERPRETER: tl.constexpr, BLOCK: tl.constexpr):
    """H = GELU(z) over N contiguous elements of Z (h_ptr may be z_ptr), z = Z (+ its row's bias under
    ROW_BIAS, rows of NCOLS elements), rounded to h's dtype: the same function as the backward's recompute
    (gelu_backward_kernel, the gMLP gate's kernels), bit for bit. torch's own GELU differs from it in the
    last bit now and then, which a LayerNorm over one value (gMLP's narrow gate) turns into a wrong gradient."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ROW_BIAS:
        z += tl.load(bias_ptr + offs // NCOLS, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, round_to(gelu(z, APPROX_TANH), h_ptr.dtype.element_ty, INTERPRETER), mask=m)


GELU_BLOCK = 1024  # elements a program: 8 per thread on 4 warps, 16-byte accesses in bf16


def gelu_forward(z: Tensor, approximate: str, *, inplace: bool, row_bias: Optional[Tensor] = None) -> Tensor:
    """GELU(Z (+ row_bias per row)) for a contiguous Z (M, N), written over it when ``inplace``."""
    h = z if inplace else _launch.new_output(z.shape, z, z.dtype)
    if z.numel():
        with _launch.serialized():
            _launch.on_grid(gelu_kernel, (triton.cdiv(z.numel(), GELU_BLOCK),))(
                z, row_bias if row_bias is not None else z, z.numel(), z.shape[-1], h,
                APPROX_TANH=approximate == "tanh", ROW_BIAS=row_bias is not None, INTERPRETER=_launch.INTERPRET,
                BLOCK=GELU_BLOCK)
    return h


# A memory-bound pass, tiled as residual.residual_grad_kernel's (8 × 128 on 4 warps, 16 tiles a program);
# the partial sums are M / 128 rows × D fp32 (4.7 MB at Mixer-B/16, batch 256).
GELU_ROW_GROUP, GELU_BLOCK_R, GELU_BLOCK_D = 128, 8, 128


def gelu_backward_grid(M: int, D: int) -> Tuple[Tuple[int], int, int]:
    """(gelu_backward_kernel's grid, row groups, column blocks) for (M, D): one axis (CUDA allows 2³¹ − 1
    programs on axis 0, 65 535 on the others)."""
    groups, d_blocks = triton.cdiv(M, GELU_ROW_GROUP), triton.cdiv(D, GELU_BLOCK_D)
    return (groups * d_blocks,), groups, d_blocks


def gelu_backward(dh: Tensor, z: Tensor, *, approximate: str, bias_grad: bool, row_bias: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """For dH and Z (M, D) contiguous, z = Z (+ row_bias (M,) per row): (dZ = dH ⊙ GELU'(z), written over dH;
    H = GELU(z) (M, D) in Z's dtype; with ``bias_grad`` the bias's gradient (fp32): Σ_rows dZ (D,), or with
    row_bias Σ_columns dZ (M,); else None)."""
    import torch

    M, D = z.shape
    grid, groups, d_blocks = gelu_backward_grid(M, D)
    db = DB_NONE if not bias_grad else DB_ROWS if row_bias is not None else DB_COLUMNS
    h = _launch.new_output((M, D), z, z.dtype)
    db_part = None
    if db != DB_NONE:
        db_part = _launch.new_output((d_blocks, M) if db == DB_ROWS else (groups, D), z, torch.float32)
    if M and D:
        with _launch.serialized():
            _launch.on_grid(gelu_backward_kernel, grid)(
                dh, z, row_bias if row_bias is not None else z, M, D, dh, h,
                db_part if db_part is not None else h, d_blocks, APPROX_TANH=approximate == "tanh",
                ROW_BIAS=row_bias is not None, DB=db, INTERPRETER=_launch.INTERPRET, ROW_GROUP=GELU_ROW_GROUP,
                BLOCK_R=GELU_BLOCK_R, BLOCK_D=GELU_BLOCK_D)
    return dh, h, db_part.sum(0) if db_part is not None else None


def mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, acc: Optional[Tensor] = None) -> Tensor:
    """a · b (+ bias per column) (+ acc, accumulated by the GEMM: beta = 1) in torch's GEMM, outside any
    autocast region (the operands are already in the dtype they should multiply in)."""
    import torch

    with torch.autocast(a.device.type, enabled=False):
        if acc is not None:
            return torch.addmm(acc, a, b)
        if bias is not None:
            return torch.addmm(bias, a, b)
        return a @ b


def folds(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, sample_scale: Optional[Tensor], store_branch: bool) -> bool:
    """Whether fc2's GEMM can take the residual add as its C operand (:func:`fc2_residual`): no drop path
    scales the branch, its value is not wanted (a layer scale's gradient), and the GEMM can accumulate in
    x's dtype (not under autocast's fp32 activations with 16-bit weights)."""
    return sample_scale is None and not store_branch and x.dtype == fc1_weight.dtype == fc2_weight.dtype


def fc1_gelu(x: Tensor, nw: Tensor, nb: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], *, norm: str,
             eps: float, approximate: str, save_hidden: bool, res_bias: Optional[Tensor] = None,
             res_scale: Optional[Tensor] = None
             ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """For x (B, S, C): (H = GELU(N(x) · W1ᵀ + b1) (B·S, D), Z = its pre-activation (B·S, D) when
    ``save_hidden``, else None (GELU then runs in place over it), mean, rstd (B·S,) fp32 or None, and r =
    x + res_scale ⊙ res_bias (B·S, C) when ``res_bias`` is given, else None), in the weights' dtype."""
    xn, mean, rstd, r = norm_apply(x, nw, nb, norm=norm, eps=eps, dtype=fc1_weight.dtype, res_bias=res_bias,
                                   res_scale=res_scale)
    z = mm(xn, fc1_weight.t(), bias=fc1_bias)
    del xn
    h = gelu_forward(z, approximate, inplace=not save_hidden)
    return h, z if save_hidden else None, mean, rstd, r


def fc2_residual(h: Tensor, fc2_weight: Tensor, fc2_bias: Optional[Tensor], x: Tensor, r: Optional[Tensor], *,
                 fold: bool, scale: Optional[Tensor], sample_scale: Optional[Tensor], store_branch: bool
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """out = x + scale · ss · (H · W2ᵀ + b2) for H (B·S, D) and x (B, S, C): (out (B, S, C) in x's dtype,
    the branch H · W2ᵀ + b2 (B, S, C) when ``store_branch``, else None). With ``fold`` (:func:`folds`) the
    GEMM accumulates into r = x + scale ⊙ b2 from :func:`fc1_gelu` (x itself without b2 and scale), with
    scale folded into W2; else one fp32 pass after the GEMM, rounded once to x's dtype."""
    import torch

    B, S, C = x.shape
    if fold:
        if r is None:
            r = x.reshape(B * S, C)
        w2 = fc2_weight if scale is None else (fc2_weight.float() * scale.float()[:, None]).to(fc2_weight.dtype)
        return mm(h, w2.t(), acc=r).view(B, S, C), None
    y = mm(h, fc2_weight.t(), bias=fc2_bias).view(B, S, C)
    out = _launch.new_output((B, S, C), x, x.dtype)
    factor = None
    if scale is not None:
        factor = scale.float().view(1, 1, C)
    if sample_scale is not None:
        ss = sample_scale.float().view(B, 1, 1)
        factor = ss if factor is None else factor * ss
    if factor is None:
        torch.add(x, y, out=out)
    else:
        torch.addcmul(x, y, factor, out=out)
    return out, y.to(x.dtype) if store_branch else None


def fc1_backward(dz: Tensor, x: Tensor, nw: Tensor, nb: Tensor, fc1_weight: Tensor, mean: Optional[Tensor],
                 rstd: Optional[Tensor], *, norm: str) -> Tuple[Tensor, Tensor]:
    """For dZ (B·S, D): (g = dZ · W1 = dL/dN(x) (B·S, C), dW1 = dZᵀ · N(x) (D, C)), both in the weights'
    dtype, N(x) recomputed from x and the saved statistics (never kept by the forward)."""
    # eps is spent: the statistics are given (the affine has none)
    xn = norm_apply(x, nw, nb, norm=norm, eps=0.0, dtype=fc1_weight.dtype,
                    stats=(mean, rstd) if norm == "layernorm" else None)[0]
    dw1 = mm(dz.t(), xn)
    del xn
    return mm(dz, fc1_weight), dw1


def channel_mixing_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor], *,
    eps: float, approximate: str, norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor],
    save_hidden: bool, store_branch: bool, allow_tf32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """As channel_mixing.channel_mixing_forward: x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or
    None, Z (B·S, D_C) or None, branch (B, S, C) or None). TF32 follows torch's own flag, which is what
    ``allow_tf32`` carries (triton_backend._allow_tf32)."""
    C = x.shape[2]
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    fold = folds(x, fc1_weight, fc2_weight, sample_scale, store_branch)
    h, z, mean, rstd, r = fc1_gelu(x, nw, nb, fc1_weight, fc1_bias, norm=norm, eps=eps, approximate=approximate,
                                   save_hidden=save_hidden, res_bias=fc2_bias if fold else None,
                                   res_scale=scale if fold else None)
    out, branch = fc2_residual(h, fc2_weight, fc2_bias, x, r, fold=fold, scale=scale, sample_scale=sample_scale,
                               store_branch=store_branch)
    return out, mean, rstd, z, branch


def channel_mixing_backward(
    dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
    mean: Optional[Tensor], rstd: Optional[Tensor], z: Tensor, branch: Optional[Tensor], *, approximate: str,
    norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor], allow_tf32: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """As channel_mixing.channel_mixing_backward: gradients for dout (B, S, C); the weights' in their dtype,
    the others fp32."""
    B, S, C = x.shape
    M = B * S
    grads: Dict[str, Optional[Tensor]] = {}
    res = residual_grad(dout, scale=scale, sample_scale=sample_scale, branch=branch, dtype=fc1_weight.dtype,
                        bias=PER_CHANNEL if fc2_bias is not None else None)
    grads["scale"], grads["fc2_bias"] = res.scale, res.bias
    do = res.do.reshape(M, C)
    dz, h, grads["fc1_bias"] = gelu_backward(mm(do, fc2_weight), z, approximate=approximate,
                                             bias_grad=fc1_bias is not None)
    grads["fc2_weight"] = mm(do.t(), h)
    del h, do, res
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    g, grads["fc1_weight"] = fc1_backward(dz, x, nw, nb, fc1_weight, mean, rstd, norm=norm)
    del dz
    grads.update(norm_grads(g, x, dout, norm_weight, norm_bias, mean, rstd, norm))
    return grads


# ---------------------------------------------------------------------------------------------------------
# Token mixing (token_mixing.token_engine() TOKEN_CUBLAS; ResMLP's token linear under GEMM_CUBLAS): the token
# GEMMs as plain 2-D GEMMs on token-major operands. The passes that exist anyway
# write their outputs (S, B, C)-contiguous, i.e. as (S, B·C) matrices: W1 · N(x) is then one GEMM with
# N = B·C (196 608 at Mixer-B/16, batch 256), with no batched or transposed copy, and each weight gradient
# one GEMM over K = B·C (fp32 accumulation, rounded once, as eager's).


def _aligned_rows(w: Tensor) -> Tensor:
    """``w`` (rows, cols) with a row stride of a multiple of 16 elements: itself, or a view of a zero-padded
    copy (token_mixing.token_weights' layout). cuBLAS takes the view's stride as the leading dimension; a
    token weight's S = 196 (392 bytes in bf16) is not 16-byte aligned, which keeps the GEMM off its
    aligned tensor-core kernels (the copy is D · 208 elements a call against the GEMM's B · C · D · S)."""
    from .token_mixing import _pad_columns, aligned

    cols = w.shape[1]
    return _pad_columns(w, aligned(cols))[:, :cols]


def token_mixing_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], *,
    eps: float, approximate: str, norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor],
    store_branch: bool, allow_tf32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """As token_mixing.token_mixing_forward: x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or None,
    branch (B, S, C) or None). Without fc2 (ResMLP), one token linear: out = x + scale · ss · (W · N(x) + b).
    Z = W1 · N(x) (D, B·C) is the only hidden tensor, and GELU runs over it in place: nothing is kept."""
    B, S, C = x.shape
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    xn, mean, rstd, _ = norm_apply(x, nw, nb, norm=norm, eps=eps, dtype=fc1_weight.dtype, token_major=True)
    y = mm(_aligned_rows(fc1_weight), xn)
    del xn
    bias = fc1_bias
    if fc2_weight is not None:
        h = gelu_forward(y, approximate, inplace=True, row_bias=fc1_bias)
        y = mm(_aligned_rows(fc2_weight), h)
        del h
        bias = fc2_bias
    out, branch = residual_add(x, y.view(S, B, C).permute(1, 0, 2), bias=bias, scale=scale,
                               sample_scale=sample_scale, store_branch=store_branch)
    return out, mean, rstd, branch


def token_mixing_backward(
    dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
    mean: Optional[Tensor], rstd: Optional[Tensor], branch: Optional[Tensor], *, eps: float, approximate: str,
    norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor], allow_tf32: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """As token_mixing.token_mixing_backward (the same saved tensors: Z is recomputed by one GEMM, as the
    flash kernels recompute the hidden): gradients for dout (B, S, C); the weights' in their dtype, the
    others fp32."""
    B, S, C = x.shape
    grads: Dict[str, Optional[Tensor]] = {}
    out_bias = fc1_bias if fc2_weight is None else fc2_bias
    res = residual_grad(dout, scale=scale, sample_scale=sample_scale, branch=branch, dtype=fc1_weight.dtype,
                        bias=PER_TOKEN if out_bias is not None else None, token_major=True)
    grads["scale"] = res.scale
    do = res.do.permute(1, 0, 2).reshape(S, B * C)  # a view: the storage is token-major
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    # eps is spent: the statistics are given (the affine has none)
    xn = norm_apply(x, nw, nb, norm=norm, eps=0.0, dtype=fc1_weight.dtype, token_major=True,
                    stats=(mean, rstd) if norm == "layernorm" else None)[0]
    w1 = _aligned_rows(fc1_weight)
    if fc2_weight is None:
        grads["fc1_weight"], grads["fc1_bias"] = mm(do, xn.t()), res.bias
        g = mm(w1.t(), do)
    else:
        z = mm(w1, xn)
        dz, h, grads["fc1_bias"] = gelu_backward(mm(_aligned_rows(fc2_weight).t(), do), z, approximate=approximate,
                                                 bias_grad=fc1_bias is not None, row_bias=fc1_bias)
        del z
        grads["fc2_weight"], grads["fc2_bias"] = mm(do, h.t()), res.bias
        del h
        grads["fc1_weight"] = mm(dz, xn.t())
        g = mm(w1.t(), dz)
        del dz
    del xn, do, res
    grads.update(norm_grads(g.view(S, B, C).permute(1, 0, 2), x, dout, norm_weight, norm_bias, mean, rstd, norm))
    return grads
