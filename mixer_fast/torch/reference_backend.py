"""The ``reference`` torch backend: the eager functions of mixer_fast.reference, on any device."""
from __future__ import annotations

from types import SimpleNamespace

from ..reference import functional
from .checks import TRANSFORMS


def load() -> SimpleNamespace:
    return SimpleNamespace(
        name="reference",
        features=frozenset({"dropout", "autocast", "double_backward", "float64", "float32", "bfloat16",
                            "float16", TRANSFORMS, "spatial_gating"}),
        token_mixing=functional.token_mixing,
        channel_mixing=functional.channel_mixing,
        spatial_gating=functional.spatial_gating,
    )
