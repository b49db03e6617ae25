"""The fused ops, for PyTorch: checked arguments, then the chosen backend.

The two ops of the mixing core (``token_mixing``, ``channel_mixing``) and gMLP's ``spatial_gating``.
Weights are in nn.Linear layout (out, in); each op returns the block input plus its branch, (B, S, C).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import dispatch
from . import checks

Tensor = torch.Tensor


@torch._dynamo.assume_constant_result
def _backend_name(device_type: str, backend: Optional[str], needs: Tuple[str, ...], op: str, mode: str,
                  dtype: str, device_index: Optional[int]) -> str:
    # Under torch.compile the choice (registry lock, imports, the environment variable, the wins table) is
    # made once, at trace time, and the graph calls the chosen backend's ops directly: no graph break.
    return dispatch.choose("torch", device_type, backend, needs, op=op, mode=mode, dtype=dtype,
                           device_index=device_index).name


def _choice(op: str, x: Tensor, backend: Optional[str], needs: Tuple[str, ...],
            tensors: Tuple[Optional[Tensor], ...]) -> str:
    """The backend name for ``op`` on ``x``: training mode when a gradient will be taken."""
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    dtype = str(torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype)
    return _backend_name(x.device.type, backend, needs, op, "training" if training else "forward",
                         dtype.replace("torch.", ""), x.device.index)


def _needs(x: Tensor, dropout: float, tensors: Tuple[Optional[Tensor], ...]) -> Tuple[str, ...]:
    # Features a backend must have for this call; an automatic choice skips those that lack one (the
    # dtype is one: the C++ kernels have no float16/float64, Triton no float64).
    return (("dropout",) * (dropout > 0) + ("autocast",) * torch.is_autocast_enabled(x.device.type)
            + (str(x.dtype).replace("torch.", ""),)
            + (checks.TRANSFORMS,) * checks.under_transform(*tensors))


def _run(op: str, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate,
         norm, scale, sample_scale, dropout, backend) -> Tensor:
    eps = checks.mixing_args(op, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                             eps=eps, approximate=approximate, norm=norm, scale=scale,
                             sample_scale=sample_scale, dropout=dropout)
    tensors = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, sample_scale)
    impl = dispatch.loaded(_choice(op, x, backend, _needs(x, dropout, tensors), tensors), "torch")
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
    backend: Optional[str] = None,
) -> Tensor:
    """gMLP's block, timm ``SpatialGatingBlock``: x + sample_scale · fc2(u ⊙ (W_p · LN_g(v) + b_p)), where
    (u, v) = chunk(GELU(fc1(LN(x))), 2, dim=-1) and W_p (S, S) mixes along tokens. (B, S, C) → (B, S, C).

    Args:
        x: (B, S, C) block input.
        norm_weight, norm_bias: (C,) LayerNorm weight and bias (``norm``), or None.
        fc1_weight: (H, C) with H even; fc1_bias: (H,) or None (``mlp_channels.fc1``).
        gate_norm_weight, gate_norm_bias: (H/2,) the gate's LayerNorm on v, or None (``mlp_channels.gate.norm``).
        proj_weight: (S, S); proj_bias: (S,) or None: the linear along tokens (``mlp_channels.gate.proj``).
        fc2_weight: (C, H/2); fc2_bias: (C,) or None (``mlp_channels.fc2``).
        eps: the block LayerNorm's epsilon (timm's gMLP: 1e-6). gate_eps: the gate LayerNorm's (timm: 1e-5).
        approximate: GELU, "none" (erf) or "tanh".
        sample_scale: (B,) per-sample factor (drop path: mask / keep_prob) or None.
        dropout: training dropout probability after the GELU and after fc2, as timm's GatedMlp.
        backend: a backend name, or None for ``MIXER_FAST_BACKEND`` / the best available. Only backends
            with the ``"spatial_gating"`` feature run it (``reference`` and ``triton``); another one asked
            for by name (``cpu``) raises NotImplementedError.
    """
    eps, gate_eps = checks.gating_args(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight, proj_bias,
        fc2_weight, fc2_bias, eps=eps, gate_eps=gate_eps, approximate=approximate, sample_scale=sample_scale,
        dropout=dropout)
    tensors = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight,
               proj_bias, fc2_weight, fc2_bias, sample_scale)
    needs = ("spatial_gating",) + _needs(x, dropout, tensors)
    impl = dispatch.loaded(_choice("spatial_gating", x, backend, needs, tensors), "torch")
    return impl.spatial_gating(x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias,
                               proj_weight, proj_bias, fc2_weight, fc2_bias, eps=eps, gate_eps=gate_eps,
                               approximate=approximate, sample_scale=sample_scale, dropout=float(dropout))
