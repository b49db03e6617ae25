"""An independent float64 computation of the mixing core, for checking the reference.

Written differently from mixer_fast.reference on purpose: explicit mean/variance LayerNorm, einsum
contractions along the token axis (no transposes), and GELU from its formula.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


def gelu64(z: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def norm64(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], norm: str, eps: float) -> Tensor:
    if norm == "layernorm":
        mu = x.sum(-1, keepdim=True) / x.shape[-1]
        var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]
        x = (x - mu) / torch.sqrt(var + eps)
    if w is not None:
        x = x * w
    return x if b is None else x + b


def _d(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().double()


def token_mixing64(x, nw, nb, w1, b1, w2, b2, *, eps=1e-6, approximate="none", norm="layernorm",
                   scale=None, sample_scale=None) -> Tensor:
    x, nw, nb, w1, b1, w2, b2, scale, sample_scale = map(_d, (x, nw, nb, w1, b1, w2, b2, scale, sample_scale))
    h = norm64(x, nw, nb, norm, eps)
    z = torch.einsum("ds,bsc->bdc", w1, h)  # W1 · LN(X), per image, along tokens
    if b1 is not None:
        z = z + b1[None, :, None]
    if w2 is not None:
        z = torch.einsum("sd,bdc->bsc", w2, gelu64(z, approximate))
        if b2 is not None:
            z = z + b2[None, :, None]
    if scale is not None:
        z = z * scale
    if sample_scale is not None:
        z = z * sample_scale[:, None, None]
    return x + z


def channel_mixing64(x, nw, nb, w1, b1, w2, b2, *, eps=1e-6, approximate="none", norm="layernorm",
                     scale=None, sample_scale=None) -> Tensor:
    x, nw, nb, w1, b1, w2, b2, scale, sample_scale = map(_d, (x, nw, nb, w1, b1, w2, b2, scale, sample_scale))
    h = norm64(x, nw, nb, norm, eps)
    z = torch.einsum("bsc,ec->bse", h, w1)
    if b1 is not None:
        z = z + b1
    z = torch.einsum("bse,ce->bsc", gelu64(z, approximate), w2)
    if b2 is not None:
        z = z + b2
    if scale is not None:
        z = z * scale
    if sample_scale is not None:
        z = z * sample_scale[:, None, None]
    return x + z


def mixer_block64(block, x: Tensor, approximate: str = "none") -> Tensor:
    """A reference/timm MixerBlock in eval mode, recomputed in float64 from its parameters."""
    t, c = block.mlp_tokens, block.mlp_channels
    x = token_mixing64(x, block.norm1.weight, block.norm1.bias, t.fc1.weight, t.fc1.bias, t.fc2.weight, t.fc2.bias,
                       eps=block.norm1.eps, approximate=approximate)
    return channel_mixing64(x, block.norm2.weight, block.norm2.bias, c.fc1.weight, c.fc1.bias, c.fc2.weight,
                            c.fc2.bias, eps=block.norm2.eps, approximate=approximate)


def resmlp_block64(block, x: Tensor, approximate: str = "none") -> Tensor:
    """A reference/timm ResMLP block in eval mode, recomputed in float64 from its parameters."""
    c = block.mlp_channels
    x = token_mixing64(x, block.norm1.alpha.reshape(-1), block.norm1.beta.reshape(-1), block.linear_tokens.weight,
                       block.linear_tokens.bias, None, None, norm="affine", scale=block.ls1)
    return channel_mixing64(x, block.norm2.alpha.reshape(-1), block.norm2.beta.reshape(-1), c.fc1.weight,
                            c.fc1.bias, c.fc2.weight, c.fc2.bias, norm="affine", approximate=approximate,
                            scale=block.ls2)
