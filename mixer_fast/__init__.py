"""mixer_fast: fused kernels for the MLP-Mixer / ResMLP mixing core.

``import mixer_fast`` is light: torch (and later triton, jax, the C++ extension) load on first use of
the names below.

PyTorch: ``MixerBlock``, ``ResMLPBlock``, ``SpatialGatingBlock`` (gMLP), ``convert``, ``resize_token_mixing``,
``fold_for_inference`` (ResMLP), ``ops.token_mixing``, ``ops.channel_mixing``, ``ops.spatial_gating``. Checkpoints: ``checkpoint`` (Flax ↔ timm ↔ deit layouts, numpy only).
Backends: ``available_backends()``; ``mixer-fast info`` prints each one, loaded or why not.
"""
from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

_LAZY = {
    "MixerBlock": "mixer_fast.torch.blocks",
    "ResMLPBlock": "mixer_fast.torch.blocks",
    "SpatialGatingBlock": "mixer_fast.torch.blocks",
    "convert": "mixer_fast.torch.convert",
    "resize_token_mixing": "mixer_fast.torch.resize",
    "fold_for_inference": "mixer_fast.torch.fold",
}
_SUBMODULES = ("ops", "reference", "dispatch", "cli", "checkpoint")

__all__ = ["MixerBlock", "ResMLPBlock", "SpatialGatingBlock", "convert", "resize_token_mixing", "fold_for_inference", "available_backends", "ops", "reference",
           "checkpoint", "__version__"]


def available_backends(framework: str = "torch") -> List[str]:
    """Names of the backends of ``framework`` ("torch" or "jax") that can run here, best first."""
    from .dispatch import available_backends as _available

    return _available(framework)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mixer_fast.{name}")
    raise AttributeError(f"module 'mixer_fast' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
