"""JAX functional ops (jit/grad/vmap-able), weights in Flax layout (in, out). Backends: ``xla`` (the
jax.numpy reference) now; ``pallas`` and ``triton`` (jax-triton) are not built yet."""
from .ops import channel_mixing, token_mixing

__all__ = ["token_mixing", "channel_mixing"]
