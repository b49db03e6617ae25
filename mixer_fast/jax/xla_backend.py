"""The ``xla`` JAX backend: the jax.numpy reference (mixer_fast.reference.jax_ops), compiled by XLA."""
from __future__ import annotations

from types import SimpleNamespace

from ..dispatch import BackendUnavailable


def load() -> SimpleNamespace:
    try:
        import jax  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"jax is not installed ({e})") from None
    from ..reference import jax_ops

    return SimpleNamespace(name="xla", features=frozenset({"deterministic"}),
                           detail="plain jax.numpy compiled by XLA, any JAX device",
                           token_mixing=jax_ops.token_mixing, channel_mixing=jax_ops.channel_mixing)
