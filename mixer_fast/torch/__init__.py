"""PyTorch side of mixer_fast: ops, fused blocks, convert()."""
from .blocks import MixerBlock, ResMLPBlock
from .convert import convert
from .ops import channel_mixing, token_mixing

__all__ = ["MixerBlock", "ResMLPBlock", "convert", "token_mixing", "channel_mixing"]
