"""PyTorch side of mixer_fast: ops, fused blocks, convert()."""
from .blocks import MixerBlock, ResMLPBlock, SpatialGatingBlock
from .convert import convert
from .ops import channel_mixing, spatial_gating, token_mixing

__all__ = ["MixerBlock", "ResMLPBlock", "SpatialGatingBlock", "convert", "token_mixing", "channel_mixing",
           "spatial_gating"]
