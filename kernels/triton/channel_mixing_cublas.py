"""Channel mixing on torch's GEMMs (cuBLAS on a GPU) with fused Triton element-wise passes: the
GEMM_CUBLAS engine of channel_mixing.py (matmul.gemm_engine), same arguments and saved tensors.

Issue 17's fallback: where the fused GEMMs cannot reach cuBLAS speed, the GEMMs run in cuBLAS and only
the memory-bound steps around them are fused, each one pass over its tensors:

forward   norm_apply: x → N(x) in the weights' dtype, the LayerNorm statistics, and r = x + scale ⊙ b2
          Z = N(x) · W1ᵀ + b1 (cuBLAS, bias in its epilogue); H = GELU(Z) (in place without a backward)
          out = r + H · (scale ⊙ W2)ᵀ (cuBLAS accumulating into r: the residual add is the GEMM's C operand)
          With drop path, a learned layer scale or autocast's mixed dtypes the scale cannot fold into W2:
          Y = H · W2ᵀ + b2, then out = x + scale · ss · Y in one pass (and Y is the stored branch).
backward  residual_grad: dO, scale's and b2's gradients (as the fused engine's)
          dH = dO · W2 (cuBLAS); gelu_backward: dZ = dH ⊙ GELU'(Z) in place, H = GELU(Z), Σ dZ (b1's gradient)
          dW2 = dOᵀ · H; N(x) recomputed from x and the statistics; dW1 = dZᵀ · N(x); g = dZ · W1 (cuBLAS)
          norm_backward: dx = dout + N's backward of g, and the norm parameters' gradients.

Against eager, the forward saves x and Z only (eager: x, N(x), Z, H) and makes no separate bias, scale or
residual passes; the backward holds Z, dZ and H at its peak (eager: Z, H, dH, dZ). The weight gradients come
from cuBLAS in the weights' dtype, as eager's do. cuBLAS is deterministic run to run on one stream and GPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import gelu, gelu_grad, round_to
from .layer_norm import norm_apply
from .residual import PER_CHANNEL, residual_grad
from .token_mixing import norm_backward

if TYPE_CHECKING:  # torch loads when a launcher runs
    import torch

    Tensor = torch.Tensor


@triton.jit
def gelu_backward_kernel(
    dh_ptr, z_ptr, M, D,
    dz_ptr, h_ptr, db_part_ptr,
    APPROX_TANH: tl.constexpr, HAS_DB: tl.constexpr, INTERPRETER: tl.constexpr, ROW_GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For rows pid_r · ROW_GROUP … of (M, D) contiguous dH and Z: dZ = dH ⊙ GELU'(Z) (dz_ptr may be dh_ptr:
    each element is read before it is written, by the same program), H = GELU(Z) rounded to h's dtype (as the
    forward made it), and under HAS_DB the partial column sums of dZ (fp32, before rounding) into row pid_r
    of ``db_part``, summed afterwards in a fixed order (deterministic)."""
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(pid_r * ROW_GROUP, pid_r * ROW_GROUP + ROW_GROUP, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < M)[:, None] & mask_d[None, :]
        offs = rows.to(tl.int64)[:, None] * D + c64[None, :]
        z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dz = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32) * gelu_grad(z, APPROX_TANH)
        tl.store(dz_ptr + offs, round_to(dz, dz_ptr.dtype.element_ty, INTERPRETER), mask=m)
        tl.store(h_ptr + offs, round_to(gelu(z, APPROX_TANH), h_ptr.dtype.element_ty, INTERPRETER), mask=m)
        if HAS_DB:
            acc += tl.sum(dz, axis=0)
    if HAS_DB:
        tl.store(db_part_ptr + pid_r.to(tl.int64) * D + c64, acc, mask=mask_d)


# A memory-bound pass, tiled as residual.residual_grad_kernel's (8 × 128 on 4 warps, 16 tiles a program);
# the partial sums are M / 128 rows × D fp32 (4.7 MB at Mixer-B/16, batch 256).
GELU_ROW_GROUP, GELU_BLOCK_R, GELU_BLOCK_D = 128, 8, 128


def gelu_backward(dh: Tensor, z: Tensor, *, approximate: str, bias_grad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """For dH and Z (M, D) contiguous: (dZ = dH ⊙ GELU'(Z), written over dH; H = GELU(Z) (M, D) in Z's dtype;
    Σ_rows dZ (D,) fp32 when ``bias_grad``, else None)."""
    import torch

    M, D = z.shape
    groups = triton.cdiv(M, GELU_ROW_GROUP)
    h = _launch.new_output((M, D), z, z.dtype)
    db_part = _launch.new_output((groups, D), z, torch.float32) if bias_grad else None
    if M and D:
        with _launch.serialized():
            gelu_backward_kernel[(groups, triton.cdiv(D, GELU_BLOCK_D))](
                dh, z, M, D, dh, h, db_part if db_part is not None else h, APPROX_TANH=approximate == "tanh",
                HAS_DB=bias_grad, INTERPRETER=_launch.INTERPRET, ROW_GROUP=GELU_ROW_GROUP, BLOCK_R=GELU_BLOCK_R,
                BLOCK_D=GELU_BLOCK_D)
    return dh, h, db_part.sum(0) if db_part is not None else None


def _mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, acc: Optional[Tensor] = None) -> Tensor:
    """a · b (+ bias per column) (+ acc, accumulated by the GEMM: beta = 1) in torch's GEMM, outside any
    autocast region (the operands are already in the dtype they should multiply in)."""
    import torch

    with torch.autocast(a.device.type, enabled=False):
        if acc is not None:
            return torch.addmm(acc, a, b)
        if bias is not None:
            return torch.addmm(bias, a, b)
        return a @ b


def _gelu(z: Tensor, approximate: str, *, inplace: bool) -> Tensor:
    import torch

    if inplace:
        return torch.ops.aten.gelu_(z, approximate=approximate)
    return torch.nn.functional.gelu(z, approximate=approximate)


def channel_mixing_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor], *,
    eps: float, approximate: str, norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor],
    save_hidden: bool, store_branch: bool, allow_tf32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """As channel_mixing.channel_mixing_forward: x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or
    None, Z (B·S, D_C) or None, branch (B, S, C) or None). TF32 follows torch's own flag, which is what
    ``allow_tf32`` carries (triton_backend._allow_tf32)."""
    import torch

    B, S, C = x.shape
    M = B * S
    wd = fc1_weight.dtype
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    # The layer scale folds into W2 and fc2's bias into the residual stream when nothing else scales the
    # branch, its value is not wanted (scale's gradient) and the GEMM can accumulate in x's dtype.
    fold = sample_scale is None and not store_branch and x.dtype == wd and fc2_weight.dtype == wd
    xn, mean, rstd, r = norm_apply(x, nw, nb, norm=norm, eps=eps, dtype=wd,
                                   res_bias=fc2_bias if fold else None, res_scale=scale if fold else None)
    z = _mm(xn, fc1_weight.t(), bias=fc1_bias)
    del xn
    h = _gelu(z, approximate, inplace=not save_hidden)
    branch = None
    if fold:
        if r is None:
            r = x.reshape(M, C)
        w2 = fc2_weight if scale is None else (fc2_weight.float() * scale.float()[:, None]).to(wd)
        out = _mm(h, w2.t(), acc=r).view(B, S, C)
    else:
        y = _mm(h, fc2_weight.t(), bias=fc2_bias).view(B, S, C)
        out = _launch.new_output((B, S, C), x, x.dtype)
        factor = None
        if scale is not None:
            factor = scale.float().view(1, 1, C)
        if sample_scale is not None:
            ss = sample_scale.float().view(B, 1, 1)
            factor = ss if factor is None else factor * ss
        # one pass in fp32, rounded once to x's dtype
        if factor is None:
            torch.add(x, y, out=out)
        else:
            torch.addcmul(x, y, factor, out=out)
        if store_branch:
            branch = y.to(x.dtype)
    return out, mean, rstd, z if save_hidden else None, branch


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
    wd = fc1_weight.dtype
    grads: Dict[str, Optional[Tensor]] = {}
    res = residual_grad(dout, scale=scale, sample_scale=sample_scale, branch=branch, dtype=wd,
                        bias=PER_CHANNEL if fc2_bias is not None else None)
    grads["scale"], grads["fc2_bias"] = res.scale, res.bias
    do = res.do.reshape(M, C)
    dz, h, grads["fc1_bias"] = gelu_backward(_mm(do, fc2_weight), z, approximate=approximate,
                                             bias_grad=fc1_bias is not None)
    grads["fc2_weight"] = _mm(do.t(), h)
    del h, do, res
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    # eps is spent: the statistics are given (the affine has none)
    xn = norm_apply(x, nw, nb, norm=norm, eps=0.0, dtype=wd,
                    stats=(mean, rstd) if norm == "layernorm" else None)[0]
    grads["fc1_weight"] = _mm(dz.t(), xn)
    del xn
    g = _mm(dz, fc1_weight)
    del dz
    grads["x"], dnw, dnb = norm_backward(g, x, dout, norm_weight, mean, rstd, norm)
    grads["norm_weight"] = dnw if norm_weight is not None else None
    grads["norm_bias"] = dnb if norm_bias is not None else None
    return grads
