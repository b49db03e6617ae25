"""The mixing core as plain eager PyTorch functions: the ``reference`` backend of ``mixer_fast.ops``.

Every fused kernel is tested against these. They are written for reading, not speed: each line is one
step of the maths in DESIGN.md, with the transpose done the way timm does it.

Shapes: x (B, S, C). Token mixing: fc1_weight (D_S, S), fc2_weight (S, D_S); with ``fc2_weight=None``
the branch is one linear layer (ResMLP's S×S ``linear_tokens``) and has no activation. Channel mixing:
fc1_weight (D_C, C), fc2_weight (C, D_C). gMLP's spatial gating (``spatial_gating``): fc1_weight (H, C),
gate norm (H/2,), proj_weight (S, S), fc2_weight (C, H/2). Weights are in nn.Linear layout (out, in).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], norm: str, eps: float) -> Tensor:
    """LayerNorm over the last dim (``norm="layernorm"``) or ResMLP's Affine ``weight*x + bias`` (``"affine"``)."""
    if norm == "layernorm":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if norm == "affine":
        y = x if weight is None else x * weight
        return y if bias is None else y + bias
    raise ValueError(f"norm: expected 'layernorm' or 'affine', got {norm!r}")


def _branch_scale(branch: Tensor, scale: Optional[Tensor], sample_scale: Optional[Tensor]) -> Tensor:
    # scale: per-channel layer scale (C,); sample_scale: per-sample drop-path factor (B,) = mask / keep_prob.
    if scale is not None:
        branch = branch * scale
    if sample_scale is not None:
        branch = branch * sample_scale.view(-1, 1, 1)
    return branch


def token_mixing(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor],
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    norm: str = "layernorm",
    scale: Optional[Tensor] = None,
    sample_scale: Optional[Tensor] = None,
    dropout: float = 0.0,
) -> Tensor:
    """x + scale · sample_scale · (W2 · GELU(W1 · N(x) + b1) + b2), the MLP acting along tokens. Returns (B, S, C)."""
    h = normalize(x, norm_weight, norm_bias, norm, eps).transpose(1, 2)  # (B, C, S)
    h = F.linear(h, fc1_weight, fc1_bias)  # (B, C, D_S)
    if fc2_weight is not None:
        h = F.gelu(h, approximate=approximate)
        h = F.dropout(h, dropout, training=dropout > 0)
        h = F.linear(h, fc2_weight, fc2_bias)  # (B, C, S)
        h = F.dropout(h, dropout, training=dropout > 0)
    return x + _branch_scale(h.transpose(1, 2), scale, sample_scale)


def channel_mixing(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    norm: str = "layernorm",
    scale: Optional[Tensor] = None,
    sample_scale: Optional[Tensor] = None,
    dropout: float = 0.0,
) -> Tensor:
    """x + scale · sample_scale · (GELU(N(x) · W1ᵀ + b1) · W2ᵀ + b2), the MLP acting along channels. Returns (B, S, C)."""
    h = normalize(x, norm_weight, norm_bias, norm, eps)
    h = F.linear(h, fc1_weight, fc1_bias)  # (B, S, D_C)
    h = F.gelu(h, approximate=approximate)
    h = F.dropout(h, dropout, training=dropout > 0)
    h = F.linear(h, fc2_weight, fc2_bias)  # (B, S, C)
    h = F.dropout(h, dropout, training=dropout > 0)
    return x + _branch_scale(h, scale, sample_scale)


def spatial_gating(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    gate_norm_weight: Optional[Tensor],
    gate_norm_bias: Optional[Tensor],
    proj_weight: Tensor,
    proj_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    eps: float = 1e-6,
    gate_eps: float = 1e-5,
    approximate: str = "none",
    sample_scale: Optional[Tensor] = None,
    dropout: float = 0.0,
) -> Tensor:
    """gMLP's block (timm ``SpatialGatingBlock``): x + sample_scale · fc2(u ⊙ proj_tokens(LN_gate(v))), where
    (u, v) = chunk(GELU(fc1(LN(x))), 2, dim=-1) and proj_tokens is the S×S linear along tokens. Returns (B, S, C).

    Shapes: x (B, S, C); norm_weight, norm_bias (C,); fc1_weight (H, C), fc1_bias (H,) with H even;
    gate_norm_weight, gate_norm_bias (H/2,); proj_weight (S, S), proj_bias (S,); fc2_weight (C, H/2),
    fc2_bias (C,). ``eps`` is the block norm's epsilon (timm: 1e-6), ``gate_eps`` the gate norm's (timm's
    SpatialGatingUnit uses nn.LayerNorm's default, 1e-5). ``dropout`` follows timm's GatedMlp: after the
    GELU (before the split) and after fc2; ``sample_scale`` (B,) is drop path's per-sample factor.
    """
    h = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
    h = F.linear(h, fc1_weight, fc1_bias)  # (B, S, H)
    h = F.gelu(h, approximate=approximate)
    h = F.dropout(h, dropout, training=dropout > 0)
    u, v = h.chunk(2, dim=-1)  # (B, S, H/2) each
    v = F.layer_norm(v, v.shape[-1:], gate_norm_weight, gate_norm_bias, gate_eps)
    v = F.linear(v.transpose(-1, -2), proj_weight, proj_bias)  # (B, H/2, S): the linear along tokens
    h = u * v.transpose(-1, -2)
    h = F.linear(h, fc2_weight, fc2_bias)  # (B, S, C)
    h = F.dropout(h, dropout, training=dropout > 0)
    return x + _branch_scale(h, None, sample_scale)
