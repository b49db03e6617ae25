"""Plain eager references: the spec every backend is tested against.

``functional`` holds the two ops as functions (the ``reference`` backend); ``modules`` the blocks and
whole models with timm's parameter names; ``configs`` the named architectures.
"""
from .configs import CONFIGS, ModelConfig, create_model, get_config
from .functional import channel_mixing, normalize, token_mixing
from .modules import Affine, DropPath, MixerBlock, Mlp, MlpMixer, PatchEmbed, ResMLP, ResMLPBlock

__all__ = [
    "CONFIGS", "ModelConfig", "create_model", "get_config",
    "token_mixing", "channel_mixing", "normalize",
    "Affine", "DropPath", "Mlp", "MixerBlock", "ResMLPBlock", "PatchEmbed", "MlpMixer", "ResMLP",
]
