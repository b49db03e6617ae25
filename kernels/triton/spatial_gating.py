"""gMLP's spatial-gating block (timm ``SpatialGatingBlock``) as fused GEMMs:

    out = x + ss · fc2(u ⊙ (W_p · LN_g(v) + b_p)),   (u, v) = halves of GELU(fc1(LN(x)))

Forward, three GEMMs of matmul.py and one statistics pass:
  1. H = GELU(LN(x) · W1ᵀ + b1) (M × 2h), LayerNorm as the A prologue, bias + GELU as the epilogue (channel
     mixing's fc1; Z, the pre-activation, kept for the backward);
  2. LN_g's per-token statistics of v = H[:, h:] read in place (a strided view, no copy);
  3. Q = u ⊙ (W_p · LN_g(v) + b_p): per image, the S × S token linear with LN_g applied to each loaded v tile
     (as ResMLP's token linear), bias per output token, and u multiplied in the epilogue; the gate P before
     the product is kept for the backward;
  4. out = x + ss · (Q · W2ᵀ + b2), bias, drop path and residual in the epilogue.
No transpose is materialised and LN_g(v) never reaches memory.

Backward (dQ = ss · dout · W2):
  dZ_u = dQ ⊙ P ⊙ GELU'(z_u) and dP = dQ ⊙ u   (one element-wise kernel, u recomputed from Z, with the
  bias gradients' partial sums of dZ_u and dP);
  dW_p = dP · LN_g(GELU(z_v))ᵀ per image, v and LN_g recomputed on the B tile; db_p = Σ dP;
  g_v = W_pᵀ · dP, then LN_g's backward × GELU'(z_v) writes dZ_v (the other half of dZ) in one pass;
  then channel mixing's: g = dZ · W1, dW1 = dZᵀ · LN(x), dW2 = dOᵀ · Q (Q kept by the forward), LayerNorm backward.
Every reduction runs over fixed tiles in a fixed order: deterministic.

Under matmul.gemm_engine() GEMM_CUBLAS the channel GEMMs (fc1 with its norm and GELU, fc2 with the residual,
dQ, g, dW1, dW2) run in torch's GEMMs with cublas_engine's passes, as channel mixing's do; the gate's
token GEMMs stay fused (their LN_g on load and u ⊙ in the epilogue save whole passes over (B, S, H/2)).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from . import cublas_engine as cublas
from .elementwise import gelu, gelu_grad, round_to
from .channel_mixing import fc1_operands
from .layer_norm import layer_norm_backward, layer_norm_stats
from .matmul import (B_GATE_LAYERNORM, B_LAYERNORM, B_TOKEN_LAYERNORM, GEMM_CUBLAS, flat, fused_matmul, gemm_engine,
                     split)
from .residual import PER_CHANNEL, residual_grad
from .token_mixing import norm_grads

if TYPE_CHECKING:  # torch loads when a launcher runs
    import torch

    Tensor = torch.Tensor


@triton.jit
def gate_grad_kernel(
    dq_ptr, z_ptr, p_ptr, M, Hh, sdq, sz, sp, sdz, sdp,
    dz_ptr, dp_ptr, db1_part_ptr, dbp_part_ptr,
    APPROX_TANH: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, BIAS_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dZ_u = dQ ⊙ P ⊙ GELU'(z_u) (into the first half of dZ) and dP = dQ ⊙ u, u = GELU(z_u) rounded to z's
    dtype as the forward stored it. Rows of M tokens, ``s*`` the row strides (columns are contiguous).
    BIAS_SUMS: also the bias gradients' partial sums, of the fp32 values: dZ_u's column sums (fc1's bias, u
    half) into row pid_m of ``db1_part`` (·, Hh), and dP's row sums (the gate's bias, per token) into row
    pid_h of ``dbp_part`` (·, M), so that neither tensor is read again for them."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    if IDX64:
        rows = rows.to(tl.int64)
    mask = (rows < M)[:, None] & (cols < Hh)[None, :]
    r = rows[:, None]
    c = cols[None, :]
    dq = tl.load(dq_ptr + r * sdq + c, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r * sz + c, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + r * sp + c, mask=mask, other=0.0).to(tl.float32)
    u = round_to(gelu(z, APPROX_TANH), z_ptr.dtype.element_ty, INTERPRETER).to(tl.float32)
    dz = dq * p * gelu_grad(z, APPROX_TANH)
    dp = dq * u
    tl.store(dz_ptr + r * sdz + c, round_to(dz, dz_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    tl.store(dp_ptr + r * sdp + c, round_to(dp, dp_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    if BIAS_SUMS:  # masked elements are zero: dq loaded as 0
        tl.store(db1_part_ptr + pid_m.to(tl.int64) * Hh + cols, tl.sum(dz, axis=0), mask=cols < Hh)
        tl.store(dbp_part_ptr + pid_h.to(tl.int64) * M + rows, tl.sum(dp, axis=1), mask=rows < M)


GATE_BLOCK = (32, 64)  # rows × columns of gate_grad_kernel: 16-byte accesses along the contiguous columns


def _tokens(t: Tensor):
    """The (image, channel) axis of a (B, S, ·) table with contiguous channels as a GEMM axis."""
    return split(t.shape[-1], t.stride(0), 1)


def spatial_gating_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], gate_norm_weight: Optional[Tensor], gate_norm_bias: Optional[Tensor],
    proj_weight: Tensor, proj_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor], *,
    eps: float, gate_eps: float, approximate: str, sample_scale: Optional[Tensor], save: bool,
    allow_tf32: bool = False,
) -> Tuple[Tensor, ...]:
    """x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32, gate_mean, gate_rstd (B·S,) fp32, and with
    ``save`` (for the backward; else None) Z (B, S, H), P (B, S, H/2) and Q (B, S, H/2) in the weights' dtype)."""
    _launch.check_device(x)
    B, S, C = x.shape
    H = fc1_weight.shape[0]
    Hh = H // 2
    M = B * S
    wdt = fc1_weight.dtype  # the hidden activations' dtype: x's own, or the autocast dtype
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    on_cublas = gemm_engine() == GEMM_CUBLAS
    if on_cublas:
        fold = cublas.folds(x, fc1_weight, fc2_weight, sample_scale, store_branch=False)
        h, z, mean, rstd, r = cublas.fc1_gelu(x, nw, nb, fc1_weight, fc1_bias, norm="layernorm", eps=eps,
                                              approximate=approximate, save_hidden=save,
                                              res_bias=fc2_bias if fold else None)
        h = h.view(B, S, H)
        z = z.view(B, S, H) if z is not None else None
    else:
        mean, rstd = layer_norm_stats(x, eps)
        h = _launch.new_output((B, S, H), x, wdt)
        z = _launch.new_output((B, S, H), x, wdt) if save else None
        h_axes = (flat(M, H), flat(H, 1))
        w1, norm_args = fc1_operands(x, fc1_weight, fc1_bias, nw, nb, (mean, rstd))
        fused_matmul(
            x, (split(S, x.stride(0), x.stride(1)), flat(C, x.stride(2))), w1,
            (flat(C, w1.stride(1)), flat(H, w1.stride(0))), h, h_axes, M, H, C, variant="ln_gelu", **norm_args,
            aux=z, aux_axes=h_axes if save else None, store_branch=save, epi_gelu=True, approximate=approximate,
            allow_tf32=allow_tf32)
        del w1
    u, v = h[..., :Hh], h[..., Hh:]
    gate_mean, gate_rstd = layer_norm_stats(v, gate_eps)
    gw = _launch.vec_or(gate_norm_weight, Hh, 1.0, v)
    gb = _launch.vec_or(gate_norm_bias, Hh, 0.0, v)
    # Q[b, s, c] = u[b, s, c] · (Σ_t W_p[s, t] · LN_g(v)[b, t, c] + b_p[s]): M = S output tokens,
    # N = (image, channel), K = S tokens, as ResMLP's token linear.
    q = _launch.new_output((B, S, Hh), x, wdt)
    p = _launch.new_output((B, S, Hh), x, wdt) if save else None
    q_axes = (flat(S, q.stride(1)), _tokens(q))
    fused_matmul(
        proj_weight, (flat(S, proj_weight.stride(0)), flat(S, proj_weight.stride(1))),
        v, (flat(S, v.stride(1)), _tokens(v)), q, q_axes, S, B * Hh, S,
        variant="gate_proj", b_pro=B_TOKEN_LAYERNORM, b_stats=(gate_mean, gate_rstd), b_vec=(gw, gb), bias=proj_bias,
        bias_on_m=True, aux=p, aux_axes=q_axes if save else None, store_branch=save,
        res=u, res_axes=(flat(S, u.stride(1)), _tokens(u)), res_mul=True, allow_tf32=allow_tf32)
    # H is dead once the gate has read u and v (the backward recomputes them from Z): gone before fc2's
    # output is allocated, it is not part of the block's peak (the forward's, at small batches).
    del h, u, v
    if on_cublas:
        out = cublas.fc2_residual(q.view(M, Hh), fc2_weight, fc2_bias, x, r, fold=fold, scale=None,
                                  sample_scale=sample_scale, store_branch=False)[0]
        return out, mean, rstd, gate_mean, gate_rstd, z, p, q if save else None
    out = _launch.new_output((B, S, C), x, x.dtype)
    fused_matmul(
        q, (flat(M, Hh), flat(Hh, 1)), fc2_weight, (flat(Hh, fc2_weight.stride(1)), flat(C, fc2_weight.stride(0))),
        out, (split(S, S * C, C), flat(C, 1)), M, C, Hh,
        variant="residual", bias=fc2_bias, ss=sample_scale, res=x,
        res_axes=(split(S, x.stride(0), x.stride(1)), flat(C, x.stride(2))), allow_tf32=allow_tf32)
    return out, mean, rstd, gate_mean, gate_rstd, z, p, q if save else None


def spatial_gating_backward(
    dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], gate_norm_weight: Optional[Tensor], gate_norm_bias: Optional[Tensor],
    proj_weight: Tensor, proj_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, gate_mean: Tensor, gate_rstd: Tensor, z: Tensor, p: Tensor, q: Tensor, *,
    approximate: str, sample_scale: Optional[Tensor], allow_tf32: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Gradients for dout = dL/dout (B, S, C), keyed by the op's argument names (parameters in fp32)."""
    import torch

    B, S, C = x.shape
    H = fc1_weight.shape[0]
    Hh = H // 2
    M = B * S
    wdt = fc1_weight.dtype
    grads: Dict[str, Optional[Tensor]] = {}
    res = residual_grad(dout, scale=None, sample_scale=sample_scale, branch=None, dtype=wdt,
                        bias=PER_CHANNEL if fc2_bias is not None else None)
    do = res.do
    do_tok, do_ch = split(S, do.stride(0), do.stride(1)), flat(C, do.stride(2))
    on_cublas = gemm_engine() == GEMM_CUBLAS
    # dQ = dO · W2, then dZ_u and dP element-wise. dQ and g_v below are whole activations: kept in the
    # weights' dtype, as eager's autograd rounds a linear layer's input gradient (fp32, they were 154 MB
    # each at gMLP-S/16, batch 256; the gMLP block trained at 2.2x eager's memory on the H200).
    if on_cublas:
        dq = cublas.mm(do.reshape(M, C), fc2_weight)
    else:
        dq = _launch.new_output((M, Hh), x, wdt)
        fused_matmul(do, (do_tok, do_ch), fc2_weight, (flat(C, fc2_weight.stride(0)), flat(Hh, fc2_weight.stride(1))),
                     dq, (flat(M, Hh), flat(Hh, 1)), M, Hh, C, variant="plain", allow_tf32=allow_tf32)
    dz = _launch.new_output((B, S, H), x, wdt)
    dp = _launch.new_output((B, S, Hh), x, wdt)
    bm, bh = GATE_BLOCK
    # fc1's bias gradient (its u half) and the gate's, as the kernel's partial sums: no second read of dZ_u
    # or dP (77 MB each at gMLP-S/16, batch 256, bf16)
    bias_sums = fc1_bias is not None or proj_bias is not None
    db1_part = _launch.new_output((triton.cdiv(M, bm), Hh), x, torch.float32) if bias_sums else None
    dbp_part = _launch.new_output((triton.cdiv(Hh, bh), M), x, torch.float32) if bias_sums else None
    if M and Hh:
        with _launch.serialized():
            _launch.on_grid(gate_grad_kernel, (triton.cdiv(M, bm), triton.cdiv(Hh, bh)))(
                dq, z, p, M, Hh, dq.stride(0), z.stride(1), p.stride(1), dz.stride(1), dp.stride(1), dz, dp,
                db1_part if bias_sums else dz, dbp_part if bias_sums else dz,
                APPROX_TANH=approximate == "tanh", INTERPRETER=_launch.INTERPRET,
                IDX64=_launch.needs_int64(dq, z, p, dz, dp), BIAS_SUMS=bias_sums, BLOCK_M=bm, BLOCK_H=bh)
    # Whole-activation temporaries go as soon as they are dead (dQ here, dP and g_v below): held to the end,
    # they were alive through the channel part's GEMMs, the backward's peak (231 MB at gMLP-S/16, batch 256,
    # bf16).
    del dq
    # The gate: dW_p[s, t] = Σ_(b, c) dP[b, s, c] · LN_g(v)[b, t, c], LN_g(GELU(z_v)) recomputed on load.
    zv = z[..., Hh:]
    gw = _launch.vec_or(gate_norm_weight, Hh, 1.0, zv)
    gb = _launch.vec_or(gate_norm_bias, Hh, 0.0, zv)
    dwp = _launch.new_output((S, S), x, torch.float32)
    fused_matmul(dp, (flat(S, dp.stride(1)), _tokens(dp)), zv, (_tokens(zv), flat(S, zv.stride(1))),
                 dwp, (flat(S, S), flat(S, 1)), S, S, B * Hh, variant="gate_b", b_pro=B_GATE_LAYERNORM,
                 b_stats=(gate_mean, gate_rstd), b_vec=(gw, gb), approximate=approximate, allow_tf32=allow_tf32)
    grads["proj_weight"] = dwp
    # (with no tokens or no hidden units the partials are empty and their sums the zeros they should be)
    grads["proj_bias"] = dbp_part.view(triton.cdiv(Hh, bh), B, S).sum((0, 1)) if proj_bias is not None else None
    # g_v[b, t, c] = Σ_s W_p[s, t] · dP[b, s, c], then LN_g's backward × GELU'(z_v) into dZ's v half.
    gv = _launch.new_output((M, Hh), x, wdt)
    fused_matmul(proj_weight, (flat(S, proj_weight.stride(1)), flat(S, proj_weight.stride(0))),
                 dp, (flat(S, dp.stride(1)), _tokens(dp)), gv, (flat(S, Hh), split(Hh, S * Hh, 1)),
                 S, B * Hh, S, variant="plain", allow_tf32=allow_tf32)
    del dp
    _, dgw, dgb = layer_norm_backward(gv, zv, None, gate_mean, gate_rstd, gate_norm_weight, gelu_in=approximate,
                                      dx=dz[..., Hh:])
    del gv
    grads["gate_norm_weight"] = dgw if gate_norm_weight is not None else None
    grads["gate_norm_bias"] = dgb if gate_norm_bias is not None else None
    # Channel mixing's backward from dZ, with fc2's input Q kept by the forward.
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    if on_cublas:
        g, dw1 = cublas.fc1_backward(dz.view(M, H), x, nw, nb, fc1_weight, mean, rstd, norm="layernorm")
        dw2 = cublas.mm(do.reshape(M, C).t(), q.view(M, Hh))
    else:
        h_axes = (flat(M, H), flat(H, 1))
        g = _launch.new_output((M, C), x, fc1_weight.dtype)  # as channel mixing's: eager rounds it so too
        fused_matmul(dz, h_axes, fc1_weight, (flat(H, fc1_weight.stride(0)), flat(C, fc1_weight.stride(1))),
                     g, (flat(M, C), flat(C, 1)), M, C, H, variant="plain", allow_tf32=allow_tf32)
        dw1 = _launch.new_output((H, C), x, torch.float32)
        fused_matmul(dz, (flat(H, 1), flat(M, H)), x, (split(S, x.stride(0), x.stride(1)), flat(C, x.stride(2))),
                     dw1, (flat(H, C), flat(C, 1)), H, C, M, variant="ln_b", b_pro=B_LAYERNORM,
                     b_stats=(mean, rstd), b_vec=(nw, nb), allow_tf32=allow_tf32)
        dw2 = _launch.new_output((C, Hh), x, torch.float32)
        fused_matmul(do, (do_ch, do_tok), q, (flat(M, Hh), flat(Hh, 1)), dw2, (flat(C, Hh), flat(Hh, 1)), C, Hh,
                     M, variant="plain", allow_tf32=allow_tf32)
    grads["fc1_weight"], grads["fc2_weight"] = dw1, dw2
    if fc1_bias is not None:  # the v half's sums over the tokens here; the u half's came with dZ_u
        grads["fc1_bias"] = torch.cat((db1_part.sum(0), dz[..., Hh:].sum((0, 1), dtype=torch.float32)))
    else:
        grads["fc1_bias"] = None
    grads["fc2_bias"] = res.bias
    grads.update(norm_grads(g, x, dout, norm_weight, norm_bias, mean, rstd, "layernorm"))
    return grads
