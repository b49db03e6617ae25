"""Plain references: the spec every backend is tested against.

PyTorch: ``functional`` holds the ops as functions (the ``reference`` backend; ``spatial_gating`` is
gMLP's), ``modules`` the blocks (gMLP's ``SpatialGatingBlock`` too) and whole models with timm's parameter
names, ``configs`` the named architectures. JAX: ``jax_ops`` holds the two mixing ops in jax.numpy (the
``xla`` backend). Names load on first use, so the JAX reference does not
import torch and the PyTorch one does not import jax.
"""
from __future__ import annotations

import importlib
from typing import Any, List

_NAMES = {
    "CONFIGS": "configs", "ModelConfig": "configs", "create_model": "configs", "get_config": "configs",
    "token_mixing": "functional", "channel_mixing": "functional", "spatial_gating": "functional",
    "normalize": "functional",
    "Affine": "modules", "DropPath": "modules", "Mlp": "modules", "MixerBlock": "modules", "ResMLPBlock": "modules",
    "GatedMlp": "modules", "SpatialGatingUnit": "modules", "SpatialGatingBlock": "modules",
    "PatchEmbed": "modules", "MlpMixer": "modules", "ResMLP": "modules",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_NAMES))
