"""``convert(model)``: swap every timm / reference Mixer, ResMLP and gMLP block for the fused one, in place."""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional, Tuple, Type

from torch import nn

from ..reference import modules as ref
from .blocks import MixerBlock, ResMLPBlock, SpatialGatingBlock, _check_backend

_FUSED = (MixerBlock, ResMLPBlock, SpatialGatingBlock)


def _block_classes() -> List[Tuple[type, Type[nn.Module]]]:
    """(source class, fused class) pairs: the references always, timm's only if timm is already imported
    (a model holding timm blocks has imported it; convert() never imports timm itself)."""
    pairs: List[Tuple[type, Type[nn.Module]]] = [(ref.MixerBlock, MixerBlock), (ref.ResMLPBlock, ResMLPBlock),
                                                 (ref.SpatialGatingBlock, SpatialGatingBlock)]
    timm_mixer = sys.modules.get("timm.models.mlp_mixer")
    if timm_mixer is not None:
        pairs += [(timm_mixer.MixerBlock, MixerBlock), (timm_mixer.ResBlock, ResMLPBlock),
                  (timm_mixer.SpatialGatingBlock, SpatialGatingBlock)]
    return pairs


def _fused_class(module: nn.Module, pairs) -> Optional[Type[nn.Module]]:
    for source, fused in pairs:
        if isinstance(module, source):
            return fused
    return None


def convert(model: nn.Module, *, backend: Optional[str] = None, strict: bool = False) -> nn.Module:
    """Replace, in place, every timm ``MixerBlock`` / ``ResBlock`` / ``SpatialGatingBlock`` (gMLP) (and
    mixer_fast.reference block) in ``model``'s module tree by ``mixer_fast.MixerBlock`` / ``ResMLPBlock`` /
    ``SpatialGatingBlock``.

    The fused blocks reuse the very submodules and Parameter objects of the blocks they replace, so
    state-dict keys are unchanged and an optimizer built before the call keeps updating the model.
    Training/eval mode is kept; hooks registered on a replaced block itself are not carried over.
    Fused blocks already in the tree get ``backend`` if one is given.

    A block that cannot be converted (a subclass with its own forward, a non-GELU activation, a norm
    other than LayerNorm/Affine, …) is left as it is and all such blocks are named in one warning;
    with ``strict=True`` a ValueError is raised instead and nothing is changed.

    Returns ``model`` (or the fused block, when ``model`` itself is a block).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    pairs = _block_classes()
    plan, failures = [], []
    for name, module in model.named_modules():
        if isinstance(module, _FUSED):
            if backend is not None:
                plan.append((name, module, None))
            continue
        fused_cls = _fused_class(module, pairs)
        if fused_cls is None:
            continue
        base = next(source for source, _ in pairs if isinstance(module, source))
        if type(module).forward is not base.forward:
            failures.append(f"{name or '<model>'} ({type(module).__name__}): its class overrides forward()")
            continue
        try:
            plan.append((name, module, fused_cls.from_module(module, backend=backend)))
        except ValueError as e:
            failures.append(f"{name or '<model>'} ({type(module).__name__}): {e}")
    if failures:
        message = f"convert: {len(failures)} block(s) left unconverted: " + "; ".join(failures)
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    for name, old, new in plan:
        if new is None:
            old.backend = backend
        elif name == "":
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child] = new
    return model
