"""``mixer_fast.ops``: the PyTorch ops ``token_mixing``, ``channel_mixing`` and gMLP's ``spatial_gating``
(see mixer_fast.torch.ops)."""
from .torch.ops import channel_mixing, spatial_gating, token_mixing

__all__ = ["token_mixing", "channel_mixing", "spatial_gating"]
