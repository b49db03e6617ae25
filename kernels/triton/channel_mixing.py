"""Channel mixing: x + scale · ss · (GELU(N(x) · W1ᵀ + b1) · W2ᵀ + b2), as two fused GEMMs.

LayerNorm (or ResMLP's affine) is the first GEMM's prologue, applied to each x tile as it is loaded
with per-token statistics computed once, or folded into its weight and epilogue (fc1_operands); bias +
GELU is its epilogue, which also keeps the pre-activation Z for the backward (GELU is recomputed from Z,
never stored). Bias, layer scale, drop path and the residual add are the second GEMM's epilogue. Fusing
the two GEMMs is not worth it at C ≥ 512 (DESIGN.md): the hidden row would not fit on chip.

Backward, after the residual's (residual.py: dO, scale's and fc2 bias's gradients in one pass), all GEMMs
of the same kernel: dZ = (dO · W2) ⊙ GELU'(Z), with fc1's bias gradient as that epilogue's partial column
sums; g = dZ · W1 (then the row-wise LayerNorm backward); dW1 = dZᵀ · N(x) with N recomputed on load;
dW2 = dOᵀ · GELU(Z) with GELU recomputed on load. Reductions run over fixed tiles in a fixed order:
deterministic.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import round_to
from . import cublas_engine
from .matmul import (A_AFFINE, A_LAYERNORM, A_LAYERNORM_FOLDED, A_NONE, B_AFFINE_N, B_GELU, B_LAYERNORM, GEMM_CUBLAS,
                     LN_FOLDED, flat, fused_matmul, gemm_engine, ln_placement, split)
from .residual import PER_CHANNEL, residual_grad
from .token_mixing import norm_grads
from .layer_norm import layer_norm_stats

if TYPE_CHECKING:  # torch loads when a launcher runs; the JAX path (jax_launch.py) never needs it
    import torch

    Tensor = torch.Tensor


def _token_axis(t: Tensor, S: int):
    """The (b, s) token axis of a (B, S, C) tensor."""
    return split(S, t.stride(0), t.stride(1))


@triton.jit
def fold_weight_kernel(
    w_ptr, nw_ptr, nb_ptr, b1_ptr, N, K, swn, swk,
    folded_ptr, u_ptr, v_ptr,
    HAS_B1: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The folded norm's operands (fc1_operands) for rows n of a weight W (N, K) (strides swn, swk): W' = W ⊙ nw
    rounded to ``folded``'s dtype ((N, K) contiguous), u = Σ_k W'[n, k] as rounded and v = Σ_k W[n, k] ·
    nb[k] + b1[n], fp32: one read of W."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    r64 = rows.to(tl.int64)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask_k = cols < K
        m = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + r64[:, None] * swn + cols.to(tl.int64)[None, :] * swk, mask=m, other=0.0).to(tl.float32)
        g = tl.load(nw_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
        b = tl.load(nb_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
        f = round_to(w * g[None, :], folded_ptr.dtype.element_ty, INTERPRETER)
        tl.store(folded_ptr + r64[:, None] * K + cols[None, :], f, mask=m)
        u += tl.sum(f.to(tl.float32), axis=1)
        v += tl.sum(w * b[None, :], axis=1)
    if HAS_B1:
        v += tl.load(b1_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(u_ptr + rows, u, mask=mask_n)
    tl.store(v_ptr + rows, v, mask=mask_n)


FOLD_BLOCK_N, FOLD_BLOCK_K = 16, 128  # 16 weight rows a program (Mixer-B/16's fc1: 192 programs)


def fold_launch(N: int, has_b1: bool, interpreter: bool) -> Tuple[Tuple[int], Dict[str, object]]:
    """(grid, constexprs) of fold_weight_kernel for a weight of N rows, for the torch and the JAX launchers."""
    return (triton.cdiv(N, FOLD_BLOCK_N),), dict(HAS_B1=has_b1, INTERPRETER=interpreter, BLOCK_N=FOLD_BLOCK_N,
                                                 BLOCK_K=FOLD_BLOCK_K)


def fold_weight(w: Tensor, nw: Tensor, nb: Tensor, b1: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(W' (N, K) in w's dtype, u (N,) fp32, v (N,) fp32) of fold_weight_kernel for a weight w (N, K)."""
    import torch

    N, K = w.shape
    folded = _launch.new_output((N, K), w, w.dtype)
    u = _launch.new_output((N,), w, torch.float32)
    v = _launch.new_output((N,), w, torch.float32)
    if N:
        with _launch.serialized():
            grid, meta = fold_launch(N, b1 is not None, _launch.INTERPRET)
            _launch.on_grid(fold_weight_kernel, grid)(w, nw, nb, b1 if b1 is not None else nw, N, K, *w.stride(),
                                                      folded, u, v, **meta)
    return folded, u, v


def fc1_operands(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], nw: Tensor, nb: Tensor,
                 stats: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Dict[str, object]]:
    """fc1's weight as the ln_gelu GEMM reads it ((D, C)) and the fused_matmul arguments that apply the norm
    (LayerNorm with ``stats`` = (mean, rstd), else the affine; weight ``nw``, bias ``nb``) and fc1's bias,
    on load or folded (matmul.ln_placement). Folded: W' = W ⊙ nw rounded to W's dtype, u = Σ_k W'[:, k]
    (from W' as rounded, which the GEMM multiplies) and v = W · nb + b1 in fp32, so that
    N(x) · Wᵀ + b1 = rstd · (x · W'ᵀ − mean · u) + v; the affine's is x · W'ᵀ + v. One pass over W
    (fold_weight_kernel), made every call: D · C elements against the GEMM's M · D · C."""
    if ln_placement() != LN_FOLDED or x.dtype != fc1_weight.dtype:
        return fc1_weight, dict(a_pro=A_LAYERNORM if stats is not None else A_AFFINE, a_stats=stats,
                                a_vec=(nw, nb), bias=fc1_bias)
    folded, u, v = fold_weight(fc1_weight, nw, nb, fc1_bias)
    if stats is None:
        return folded, dict(a_pro=A_NONE, bias=v)
    return folded, dict(a_pro=A_LAYERNORM_FOLDED, a_stats=stats, a_vec=(u, u), bias=v)


def channel_mixing_forward(
    x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor], *,
    eps: float, approximate: str, norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor],
    save_hidden: bool, store_branch: bool, allow_tf32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """x (B, S, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or None, Z (B·S, D_C) pre-activation or None,
    branch (B, S, C) before scale or None). Under matmul.gemm_engine() GEMM_CUBLAS, cublas_engine's
    (the same outputs)."""
    _launch.check_device(x)
    if gemm_engine() == GEMM_CUBLAS:
        return cublas_engine.channel_mixing_forward(
            x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps, approximate=approximate,
            norm=norm, scale=scale, sample_scale=sample_scale, save_hidden=save_hidden, store_branch=store_branch,
            allow_tf32=allow_tf32)
    B, S, C = x.shape
    D = fc1_weight.shape[0]
    M = B * S
    mean = rstd = None
    if norm == "layernorm":
        mean, rstd = layer_norm_stats(x, eps)
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    # Hidden activations in the weights' dtype: x's own, or the autocast dtype.
    hidden = _launch.new_output((M, D), x, fc1_weight.dtype)
    z = _launch.new_output((M, D), x, fc1_weight.dtype) if save_hidden else None
    out = _launch.new_output((B, S, C), x, x.dtype)
    branch = _launch.new_output(out.shape, out) if store_branch else None
    h_axes = (flat(M, D), flat(D, 1))
    w1, norm_args = fc1_operands(x, fc1_weight, fc1_bias, nw, nb, (mean, rstd) if mean is not None else None)
    fused_matmul(
        x, (_token_axis(x, S), flat(C, x.stride(2))), w1, (flat(C, w1.stride(1)), flat(D, w1.stride(0))),
        hidden, h_axes, M, D, C, variant="ln_gelu", **norm_args, aux=z, aux_axes=h_axes if z is not None else None,
        store_branch=z is not None, epi_gelu=True, approximate=approximate, allow_tf32=allow_tf32)
    del w1
    o_axes = (split(S, S * C, C), flat(C, 1))
    fused_matmul(
        hidden, h_axes, fc2_weight, (flat(D, fc2_weight.stride(1)), flat(C, fc2_weight.stride(0))),
        out, o_axes, M, C, D,
        variant="residual", bias=fc2_bias, aux=branch, aux_axes=o_axes if branch is not None else None, store_branch=store_branch,
        scale=scale, ss=sample_scale, res=x, res_axes=(_token_axis(x, S), flat(C, x.stride(2))),
        allow_tf32=allow_tf32)
    return out, mean, rstd, z, branch


def channel_mixing_backward(
    dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
    mean: Optional[Tensor], rstd: Optional[Tensor], z: Tensor, branch: Optional[Tensor], *, approximate: str,
    norm: str, scale: Optional[Tensor], sample_scale: Optional[Tensor], allow_tf32: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Gradients for dout = dL/dout (B, S, C); same keys as token_mixing_backward (parameters in fp32). Under
    GEMM_CUBLAS, cublas_engine's (the two engines save the same tensors: either backward follows
    either forward)."""
    import torch

    if gemm_engine() == GEMM_CUBLAS:
        return cublas_engine.channel_mixing_backward(
            dout, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, rstd, z, branch,
            approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale, allow_tf32=allow_tf32)

    B, S, C = x.shape
    D = fc1_weight.shape[0]
    M = B * S
    grads: Dict[str, Optional[Tensor]] = {}
    # dO in the weights' dtype (the autocast dtype, if any), scale's and fc2 bias's gradients: one pass
    res = residual_grad(dout, scale=scale, sample_scale=sample_scale, branch=branch, dtype=fc1_weight.dtype,
                        bias=PER_CHANNEL if fc2_bias is not None else None)
    do = res.do
    grads["scale"] = res.scale
    nw = _launch.vec_or(norm_weight, C, 1.0, x)
    nb = _launch.vec_or(norm_bias, C, 0.0, x)
    h_axes = (flat(M, D), flat(D, 1))
    do_tok, do_ch = _token_axis(do, S), flat(C, do.stride(2))
    x_tok, x_ch = _token_axis(x, S), flat(C, x.stride(2))
    dz = _launch.new_output((M, D), x, fc1_weight.dtype)
    # fc1's bias gradient Σ_tokens dZ as the epilogue's partial column sums: no second read of dZ (the
    # largest activation of the backward, 308 MB at Mixer-B/16, batch 256, bf16).
    db1 = _launch.new_output((D,), x, torch.float32) if fc1_bias is not None else None
    fused_matmul(do, (do_tok, do_ch), fc2_weight, (flat(C, fc2_weight.stride(0)), flat(D, fc2_weight.stride(1))),
                 dz, h_axes, M, D, C, variant="gelu_grad", aux=z, epi_gelu_grad=True, col_sum=db1,
                 approximate=approximate, allow_tf32=allow_tf32)
    # dL/dN(x) in the weights' dtype, as eager's autograd hands it to the norm's backward: half the bytes
    # of fp32 (77 MB less at Mixer-B/16, batch 256, bf16).
    g = _launch.new_output((M, C), x, fc1_weight.dtype)
    fused_matmul(dz, h_axes, fc1_weight, (flat(D, fc1_weight.stride(0)), flat(C, fc1_weight.stride(1))),
                 g, (flat(M, C), flat(C, 1)), M, C, D, variant="plain", allow_tf32=allow_tf32)
    dw1 = _launch.new_output((D, C), x, torch.float32)
    fused_matmul(dz, (flat(D, 1), flat(M, D)), x, (x_tok, x_ch), dw1, (flat(D, C), flat(C, 1)), D, C, M,
                 variant="ln_b", b_pro=B_LAYERNORM if norm == "layernorm" else B_AFFINE_N, b_stats=(mean, rstd) if mean is not None else None,
                 b_vec=(nw, nb), allow_tf32=allow_tf32)
    del dz  # the largest temporary: gone before dW2's split-K partials and the LayerNorm backward's outputs
    dw2 = _launch.new_output((C, D), x, torch.float32)
    fused_matmul(do, (do_ch, do_tok), z, h_axes, dw2, (flat(C, D), flat(D, 1)), C, D, M,
                 variant="gelu_b", b_pro=B_GELU, approximate=approximate, allow_tf32=allow_tf32)
    grads["fc1_weight"], grads["fc2_weight"] = dw1, dw2
    grads["fc1_bias"] = db1
    grads["fc2_bias"] = res.bias
    grads.update(norm_grads(g, x, dout, norm_weight, norm_bias, mean, rstd, norm))
    return grads
