"""``mixer_fast.ops``: the PyTorch ops ``token_mixing`` and ``channel_mixing`` (see mixer_fast.torch.ops)."""
from .torch.ops import channel_mixing, token_mixing

__all__ = ["token_mixing", "channel_mixing"]
