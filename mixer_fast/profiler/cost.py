"""FLOPs and HBM bytes of the mixing ops: one source for the benchmarks, the roofline and the docs.

Conventions (exact under them):
- FLOPs count the matmuls only, 2 per multiply-add; element-wise work (LayerNorm, GELU, adds) is
  not counted, as is usual for a roofline of GEMM-shaped work.
- Bytes are HBM traffic in units of whole tensors, each read or written once per pass; X is one
  activation (B·S·C elements), H the hidden of the MLP (B·C·D_S for token mixing, B·S·D_C for channel
  mixing), W the weights and biases. Per-token statistics (8 bytes a token) are counted where a pass
  writes or reads them.
  - ``min``: the compulsory traffic, every input read once and the output written once: the floor a
    perfect kernel meets.
  - ``unfused``: eager PyTorch as timm writes the block (LayerNorm, fc1, GELU, fc2 and the residual
    add as separate passes; transposes are views).
  - ``fused``: what mixer_fast's Triton kernels move, pass by pass (kernels/triton/*).

Forward, Mixer token mixing:  unfused 7X + 4H (+W)   fused 3X (stats pass, then read x + write out)
Forward, channel mixing:      unfused 7X + 4H (+W)   fused 4X + 2H = 12X at the named configs (stats,
                              fc1: X in + H out, fc2: H in + residual X + out X); a training forward
                              also keeps Z (+H), counted with the backward
These reproduce DESIGN.md's Mixer-B/16 batch-256 table (1144 MB / 1782 MB unfused, 934 MB fused channel;
its 154 MB for fused token mixing is the ``min`` figure).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

OPS = ("token_mixing", "channel_mixing", "block")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Shape:
    """One block's sizes. ``tokens_dim`` is D_S (for ResMLP, whose token branch is one S×S linear, S)."""

    batch: int
    seq_len: int
    dim: int
    tokens_dim: int
    channels_dim: int
    kind: str = "mixer"  # or "resmlp"

    @classmethod
    def from_config(cls, name: str, batch: int) -> "Shape":
        from ..reference.configs import get_config

        c = get_config(name)
        return cls(batch, c.seq_len, c.embed_dim, c.tokens_dim, c.channels_dim, c.kind)


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one op in one mode."""

    flops: float
    min_bytes: float
    unfused_bytes: float
    fused_bytes: float

    def intensity(self, which: str = "fused") -> float:
        """FLOP per byte of ``which`` traffic ("min", "unfused" or "fused")."""
        return self.flops / getattr(self, f"{which}_bytes")

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def _token(s: Shape, e: int, mode: str) -> Cost:
    B, S, C, D = s.batch, s.seq_len, s.dim, s.tokens_dim
    X, st = B * S * C * e, B * S * 8
    if s.kind == "resmlp":  # affine (no statistics) → one S×S linear → scale → + x
        W = (S * S + S) * e
        gemm = 2 * B * C * S * S
        if mode == "fwd":
            # unfused: affine (r X, w X), linear (r X, w X), scale (r X, w X), add (2 r, 1 w)
            return Cost(gemm, 2 * X + W, 9 * X + W, 2 * X + W)
        # bwd: dX = Wᵀ·dO and dW = Σ dO·N(x)ᵀ (2 GEMMs); unfused: scale, linear (dO twice, N(x)), affine,
        # and the residual's gradient add; fused: dO, dx GEMM (read dO, write g fp32), dW GEMM (dO, x),
        # the affine backward (g, x, dout → dx)
        return Cost(2 * gemm, 3 * X + W, 12 * X + 2 * W, 4 * X + 2 * 4 * B * S * C + W)
    H = B * C * D * e
    W = (2 * S * D + D + S) * e
    gemm = 2 * B * C * S * D
    if mode == "fwd":
        return Cost(2 * gemm, 2 * X + W, 7 * X + 4 * H + W, 3 * X + st + W)
    # bwd, 4 GEMMs unfused (dH, dW2, dX̂, dW1). Fused: the dx kernel recomputes Z and dA (+3 GEMMs with
    # g = W1ᵀ·dZ), the dW kernel recomputes Z and dA again (+4 with dW1, dW2): 7 GEMMs; nothing of H
    # reaches HBM. Unfused: fc2 (dO ×2, A, dA), GELU (dA, Z, dZ), fc1 (dZ ×2, x̂, dx̂), LN (dx̂, x, dx),
    # residual add (3X).
    g32 = B * S * C * 4
    fused = (2 * X + g32) + 2 * X + (g32 + 3 * X) + st
    return Cost(7 * gemm, 3 * X + W, 10 * X + 7 * H + 2 * W, fused + W)


def _channel(s: Shape, e: int, mode: str) -> Cost:
    B, S, C, D = s.batch, s.seq_len, s.dim, s.channels_dim
    X, H, st = B * S * C * e, B * S * D * e, B * S * 8
    W = (2 * C * D + C + D) * e
    gemm = 2 * B * S * C * D
    if mode == "fwd":
        # fused (inference): stats (X), fc1 (X in, H out), fc2 (H in, residual X, out X)
        return Cost(2 * gemm, 2 * X + W, 7 * X + 4 * H + W, 4 * X + 2 * H + st + W)
    # bwd: dZ = (dO·W2) ⊙ GELU'(Z) (dO, Z, dZ), g = dZ·W1 (dZ, g fp32), dW1 = dZᵀ·LN(x) (dZ, x),
    # dW2 = dOᵀ·GELU(Z) (dO, Z), LayerNorm backward (g, x, dout, dx); plus the pre-activation Z that a
    # training forward writes for this backward (H)
    g32 = B * S * C * 4
    fused = (X + 2 * H) + (H + g32) + (H + X) + (X + H) + (g32 + 3 * X) + st + H
    return Cost(4 * gemm, 3 * X + W, 10 * X + 7 * H + 2 * W, fused + W)


def cost(op: str, shape: Shape, dtype: str = "bf16", mode: str = "fwd") -> Cost:
    """FLOPs and bytes of ``op`` ("token_mixing", "channel_mixing" or "block") for ``shape``."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if mode == "fwd+bwd":
        return cost(op, shape, dtype, "fwd") + cost(op, shape, dtype, "bwd")
    e = DTYPE_BYTES[dtype]
    if op == "block":
        return _token(shape, e, mode) + _channel(shape, e, mode)
    return (_token if op == "token_mixing" else _channel)(shape, e, mode)
