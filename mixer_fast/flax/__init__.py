"""Flax linen blocks: ``MixerBlock`` (google-research/vision_transformer's parameter tree) and ``ResMLPBlock``."""
from .blocks import MixerBlock, ResMLPBlock

__all__ = ["MixerBlock", "ResMLPBlock"]
