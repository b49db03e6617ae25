"""Argument checks shared by every PyTorch entry point (DESIGN.md, "Bad input").

Each check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, device or value) with a
message that names the argument, what was expected and what was given, before anything is launched.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
APPROXIMATIONS = ("none", "tanh")
NORMS = ("layernorm", "affine")


def tensor(name: str, t: object, *, optional: bool = False) -> Optional[Tensor]:
    """t itself if it is a floating tensor (or None where allowed)."""
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        want = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name}: expected {want}, got {type(t).__name__}")
    if type(t).__name__ == "DTensor":  # by name: importing torch.distributed.tensor here costs every user
        raise TypeError(f"{name}: expected a local tensor, got a DTensor (placements {list(t.placements)}): "
                        "the fused ops read a block's parameters directly, so fully_shard (FSDP2) and tensor "
                        "parallelism must wrap the mixer_fast block or a module above it, not its submodules")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    return t


def shape(name: str, t: Optional[Tensor], expected: Sequence[int], meaning: str) -> None:
    """t.shape == expected; ``meaning`` spells the dims, e.g. "(D_S, S)"."""
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def same_device(name: str, t: Optional[Tensor], ref: Tensor) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of x), got one on {t.device}")


def same_dtype(name: str, t: Optional[Tensor], ref: Tensor) -> None:
    # Under torch.autocast the parameters stay fp32 while activations are low precision, as in eager.
    if t is None or t.dtype == ref.dtype or torch.is_autocast_enabled(ref.device.type):
        return
    raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of x), got {t.dtype}")


def finite_float(name: str, v: object, *, low: float, high: float = math.inf,
                 low_open: bool = True, high_open: bool = True) -> float:
    """v as a float, finite and inside the interval (low, high) (ends open or closed as flagged)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    v = float(v)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a finite number in {interval}, got {v}")
    return v


def choice(name: str, v: object, options: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {v!r}")
    return v


def mixing_args(op: str, x: object, norm_weight: object, norm_bias: object, fc1_weight: object,
                fc1_bias: object, fc2_weight: object, fc2_bias: object, *, eps: object, approximate: object,
                norm: object, scale: object, sample_scale: object, dropout: object) -> float:
    """Checks the arguments of ``token_mixing`` / ``channel_mixing`` (``op``); returns eps as a float."""
    x = tensor("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected a 3-D tensor (B, S, C), got shape {tuple(x.shape)}")
    B, S, C = x.shape
    fc1_weight = tensor("fc1_weight", fc1_weight)
    fc2_weight = tensor("fc2_weight", fc2_weight, optional=(op == "token_mixing"))
    named = {
        "norm_weight": tensor("norm_weight", norm_weight, optional=True),
        "norm_bias": tensor("norm_bias", norm_bias, optional=True),
        "fc1_weight": fc1_weight,
        "fc1_bias": tensor("fc1_bias", fc1_bias, optional=True),
        "fc2_weight": fc2_weight,
        "fc2_bias": tensor("fc2_bias", fc2_bias, optional=True),
        "scale": tensor("scale", scale, optional=True),
        "sample_scale": tensor("sample_scale", sample_scale, optional=True),
    }
    for name, t in named.items():
        same_device(name, t, x)
        same_dtype(name, t, x)
    if fc1_weight.ndim != 2:
        raise ValueError(f"fc1_weight: expected a 2-D weight (out, in), got shape {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    shape("norm_weight", named["norm_weight"], (C,), "(C,)")
    shape("norm_bias", named["norm_bias"], (C,), "(C,)")
    shape("fc1_bias", named["fc1_bias"], (hidden,), "(D,)")
    shape("scale", named["scale"], (C,), "(C,)")
    shape("sample_scale", named["sample_scale"], (B,), "(B,)")
    if op == "token_mixing":
        shape("fc1_weight", fc1_weight, (hidden, S), "(D_S, S) with S from x")
        if fc2_weight is None:
            shape("fc1_weight", fc1_weight, (S, S), "(S, S) when fc2_weight is None")
            if named["fc2_bias"] is not None:
                raise ValueError("fc2_bias: expected None when fc2_weight is None, got a tensor")
        else:
            shape("fc2_weight", fc2_weight, (S, hidden), "(S, D_S)")
            shape("fc2_bias", named["fc2_bias"], (S,), "(S,)")
    else:
        shape("fc1_weight", fc1_weight, (hidden, C), "(D_C, C) with C from x")
        shape("fc2_weight", fc2_weight, (C, hidden), "(C, D_C)")
        shape("fc2_bias", named["fc2_bias"], (C,), "(C,)")
    choice("approximate", approximate, APPROXIMATIONS)
    choice("norm", norm, NORMS)
    finite_float("dropout", dropout, low=0.0, high=1.0, low_open=False)
    return finite_float("eps", eps, low=0.0)


def gating_args(x: object, norm_weight: object, norm_bias: object, fc1_weight: object, fc1_bias: object,
                gate_norm_weight: object, gate_norm_bias: object, proj_weight: object, proj_bias: object,
                fc2_weight: object, fc2_bias: object, *, eps: object, gate_eps: object, approximate: object,
                sample_scale: object, dropout: object) -> Tuple[float, float]:
    """Checks the arguments of ``spatial_gating``; returns (eps, gate_eps) as floats."""
    x = tensor("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected a 3-D tensor (B, S, C), got shape {tuple(x.shape)}")
    B, S, C = x.shape
    named = {
        "norm_weight": tensor("norm_weight", norm_weight, optional=True),
        "norm_bias": tensor("norm_bias", norm_bias, optional=True),
        "fc1_weight": tensor("fc1_weight", fc1_weight),
        "fc1_bias": tensor("fc1_bias", fc1_bias, optional=True),
        "gate_norm_weight": tensor("gate_norm_weight", gate_norm_weight, optional=True),
        "gate_norm_bias": tensor("gate_norm_bias", gate_norm_bias, optional=True),
        "proj_weight": tensor("proj_weight", proj_weight),
        "proj_bias": tensor("proj_bias", proj_bias, optional=True),
        "fc2_weight": tensor("fc2_weight", fc2_weight),
        "fc2_bias": tensor("fc2_bias", fc2_bias, optional=True),
        "sample_scale": tensor("sample_scale", sample_scale, optional=True),
    }
    for name, t in named.items():
        same_device(name, t, x)
        same_dtype(name, t, x)
    fc1_weight = named["fc1_weight"]
    if fc1_weight.ndim != 2:
        raise ValueError(f"fc1_weight: expected a 2-D weight (out, in), got shape {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    if hidden % 2:
        raise ValueError(f"fc1_weight: expected an even number of rows H (split into the halves u and v), "
                         f"got shape {tuple(fc1_weight.shape)}")
    half = hidden // 2
    shape("norm_weight", named["norm_weight"], (C,), "(C,)")
    shape("norm_bias", named["norm_bias"], (C,), "(C,)")
    shape("fc1_weight", fc1_weight, (hidden, C), "(H, C) with C from x")
    shape("fc1_bias", named["fc1_bias"], (hidden,), "(H,)")
    shape("gate_norm_weight", named["gate_norm_weight"], (half,), "(H/2,)")
    shape("gate_norm_bias", named["gate_norm_bias"], (half,), "(H/2,)")
    shape("proj_weight", named["proj_weight"], (S, S), "(S, S) with S from x")
    shape("proj_bias", named["proj_bias"], (S,), "(S,)")
    shape("fc2_weight", named["fc2_weight"], (C, half), "(C, H/2)")
    shape("fc2_bias", named["fc2_bias"], (C,), "(C,)")
    shape("sample_scale", named["sample_scale"], (B,), "(B,)")
    choice("approximate", approximate, APPROXIMATIONS)
    finite_float("dropout", dropout, low=0.0, high=1.0, low_open=False)
    return finite_float("eps", eps, low=0.0), finite_float("gate_eps", gate_eps, low=0.0)


TRANSFORMS = "torch.func transforms and forward-mode AD"


def under_transform(*tensors: Optional[Tensor]) -> bool:
    """Whether some tensor is wrapped by a torch.func transform (grad, vjp, jvp, vmap, …) or carries a
    forward-mode tangent (torch.autograd.forward_ad). The fused kernels see only raw data: a tangent
    would be dropped silently (seen: triton's torch.func.jvp gave wrong tangents, forward_ad none)."""
    if torch.compiler.is_compiling():  # dynamo's FakeTensors; it rejects what it cannot trace itself
        return False
    forward_ad = torch.autograd.forward_ad._current_level >= 0
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if forward_ad and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False
