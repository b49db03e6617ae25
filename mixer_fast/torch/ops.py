"""The two fused ops of the mixing core, for PyTorch: checked arguments, then the chosen backend.

Weights are in nn.Linear layout (out, in); each op returns the block input plus its branch, (B, S, C).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import dispatch
from . import checks

Tensor = torch.Tensor


@torch._dynamo.assume_constant_result
def _backend_name(device_type: str, backend: Optional[str], needs: Tuple[str, ...]) -> str:
    # Under torch.compile the choice (registry lock, imports, the environment variable) is made once,
    # at trace time, and the graph calls the chosen backend's ops directly: no graph break.
    return dispatch.choose("torch", device_type, backend, needs).name


def _run(op: str, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate,
         norm, scale, sample_scale, dropout, backend) -> Tensor:
    eps = checks.mixing_args(op, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                             eps=eps, approximate=approximate, norm=norm, scale=scale,
                             sample_scale=sample_scale, dropout=dropout)
    # Features a backend must have for this call; an automatic choice skips those that lack one (the
    # dtype is one: the C++ kernels have no float16/float64, Triton no float64).
    needs = (("dropout",) * (dropout > 0) + ("autocast",) * torch.is_autocast_enabled(x.device.type)
             + (str(x.dtype).replace("torch.", ""),)
             + (checks.TRANSFORMS,) * checks.under_transform(x, norm_weight, norm_bias, fc1_weight, fc1_bias,
                                                             fc2_weight, fc2_bias, scale, sample_scale))
    impl = dispatch.loaded(_backend_name(x.device.type, backend, needs), "torch")
    return getattr(impl, op)(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps,
                             approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale,
                             dropout=float(dropout))


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
    backend: Optional[str] = None,
) -> Tensor:
    """x + scale · sample_scale · (W2 · GELU(W1 · N(x) + b1) + b2): the MLP along tokens, (B, S, C) → (B, S, C).

    Args:
        x: (B, S, C) block input.
        norm_weight, norm_bias: (C,) LayerNorm weight and bias, or ResMLP Affine alpha and beta
            (``norm="affine"``); None for none.
        fc1_weight: (D_S, S); fc1_bias: (D_S,) or None.
        fc2_weight: (S, D_S); fc2_bias: (S,) or None. With ``fc2_weight=None`` the branch is the single
            linear ``fc1`` (ResMLP's ``linear_tokens``, (S, S)) with no activation.
        eps: LayerNorm epsilon (finite, > 0). approximate: GELU, "none" (erf) or "tanh".
        scale: (C,) per-channel layer scale (ResMLP ``ls1``) or None.
        sample_scale: (B,) per-sample factor (drop path: mask / keep_prob) or None.
        dropout: training dropout probability after the GELU and after fc2, as timm's Mlp.
        backend: a backend name, or None for ``MIXER_FAST_BACKEND`` / the best available.
    """
    return _run("token_mixing", x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps,
                approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale, dropout=dropout,
                backend=backend)


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
    backend: Optional[str] = None,
) -> Tensor:
    """x + scale · sample_scale · (GELU(N(x) · W1ᵀ + b1) · W2ᵀ + b2): the MLP along channels, (B, S, C) → (B, S, C).

    Args as :func:`token_mixing`, with fc1_weight (D_C, C), fc1_bias (D_C,), fc2_weight (C, D_C),
    fc2_bias (C,).
    """
    return _run("channel_mixing", x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                eps=eps, approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale,
                dropout=dropout, backend=backend)
