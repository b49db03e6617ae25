"""Predicted (not measured) roofline times of the mixing ops on devices we cannot run on: TPUs.

time ≥ max(FLOPs / peak, min_bytes / bandwidth), with the FLOPs and the compulsory HBM traffic of
:mod:`mixer_fast.profiler.cost` and the vendor's per-chip peaks. It is a floor, the time of a perfect
kernel, not a model of the Pallas kernels (which re-read weights per tile and run the element-wise work on
the vector unit, neither of which the floor charges). bf16 only: the MXU's peak is a bf16 figure, and fp32
matmuls on a TPU run as several bf16 passes at a precision XLA chooses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

from .cost import OPS, Shape, cost


@dataclass(frozen=True)
class Chip:
    """A device's vendor peaks: bf16 matmul FLOP/s and HBM bytes/s, and where they are stated."""

    name: str
    peak_flops: float
    bandwidth: float
    source: str


CHIPS: Dict[str, Chip] = {
    "tpu_v5e": Chip("TPU v5e", 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "tpu_v5p": Chip("TPU v5p", 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "tpu_v6e": Chip("TPU v6e", 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}


def predicted_time(op: str, shape: Shape, chip: str, mode: str = "fwd") -> float:
    """The roofline floor in seconds of ``op`` in bf16 on ``chip`` (a key of CHIPS)."""
    if chip not in CHIPS:
        raise ValueError(f"chip: expected one of {sorted(CHIPS)}, got {chip!r}")
    c, d = cost(op, shape, "bf16", mode), CHIPS[chip]
    return max(c.flops / d.peak_flops, c.min_bytes / d.bandwidth)


def bound(op: str, shape: Shape, chip: str, mode: str = "fwd") -> str:
    """"memory" or "compute": which ceiling sets the floor."""
    c, d = cost(op, shape, "bf16", mode), CHIPS[chip]
    return "compute" if c.flops / d.peak_flops >= c.min_bytes / d.bandwidth else "memory"


def table(configs: Sequence[str] = ("mixer_s16", "mixer_b16", "mixer_l16", "resmlp_12"), batch: int = 256,
          modes: Sequence[str] = ("fwd", "fwd+bwd")) -> str:
    """A markdown table: per config, op and mode, the floor in ms on each chip (m/c: memory/compute bound)."""
    chips = list(CHIPS)
    head = "| config | op | mode | " + " | ".join(CHIPS[c].name for c in chips) + " |"
    rows = [head, "|" + "---|" * (3 + len(chips))]
    for name in configs:
        shape = Shape.from_config(name, batch)
        for op in OPS[:2]:
            for mode in modes:
                cells = [f"{predicted_time(op, shape, c, mode) * 1e3:.3f} ({bound(op, shape, c, mode)[0]})"
                         for c in chips]
                rows.append(f"| {name} | {op} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
