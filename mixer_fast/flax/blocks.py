"""Flax linen blocks with google-research/vision_transformer's parameter tree, on mixer_fast's JAX ops.

``MixerBlock``'s parameters are exactly those of vision_transformer's ``models_mixer.MixerBlock``:
``LayerNorm_0/{scale,bias}``, ``token_mixing/Dense_0/{kernel (S, D_S), bias}``, ``token_mixing/Dense_1``,
``LayerNorm_1``, ``channel_mixing/Dense_0``, ``channel_mixing/Dense_1``, with the same initialisers (Dense:
lecun_normal kernel, zero bias; LayerNorm: ones, zeros), so its checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import jax as mf_jax

Array = jax.Array


class _DenseParams(nn.Module):
    """The parameters of an ``nn.Dense(features)`` (same names and initialisers), without running it."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> Tuple[Array, Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


class _MlpParams(nn.Module):
    """The parameters of vision_transformer's ``MlpBlock(mlp_dim)``: Dense_0 (in → mlp_dim), Dense_1 (back)."""

    mlp_dim: int

    @nn.compact
    def __call__(self, in_features: int) -> Tuple[Array, Array, Array, Array]:
        k1, b1 = _DenseParams(self.mlp_dim, name="Dense_0")(in_features)
        k2, b2 = _DenseParams(in_features, name="Dense_1")(self.mlp_dim)
        return k1, b1, k2, b2


class _NormParams(nn.Module):
    """``nn.LayerNorm``'s parameters (scale ones, bias zeros), or ResMLP's affine (alpha ones, beta zeros)."""

    names: Tuple[str, str] = ("scale", "bias")

    @nn.compact
    def __call__(self, features: int) -> Tuple[Array, Array]:
        w = self.param(self.names[0], nn.initializers.ones_init(), (features,), jnp.float32)
        b = self.param(self.names[1], nn.initializers.zeros_init(), (features,), jnp.float32)
        return w, b


def _dims(x: Array, approximate_gelu: bool) -> Tuple[int, int, str]:
    """(S, C, the ops' GELU name) for a block input x (B, S, C); ValueError for another rank."""
    if x.ndim != 3:
        raise ValueError(f"x: expected a 3-D array (B, S, C), got shape {tuple(x.shape)}")
    return x.shape[1], x.shape[2], "tanh" if approximate_gelu else "none"


class MixerBlock(nn.Module):
    """MLP-Mixer block (B, S, C) → (B, S, C), vision_transformer's parameter tree and numerics (tanh GELU
    by default, LayerNorm epsilon 1e-6), run by mixer_fast.jax's token and channel mixing."""

    tokens_mlp_dim: int
    channels_mlp_dim: int
    approximate_gelu: bool = True
    eps: float = 1e-6
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        S, C, approximate = _dims(x, self.approximate_gelu)
        ln0 = _NormParams(name="LayerNorm_0")(C)
        tok = _MlpParams(self.tokens_mlp_dim, name="token_mixing")(S)
        x = mf_jax.token_mixing(x, *ln0, *tok, eps=self.eps, approximate=approximate, backend=self.backend)
        ln1 = _NormParams(name="LayerNorm_1")(C)
        ch = _MlpParams(self.channels_mlp_dim, name="channel_mixing")(C)
        return mf_jax.channel_mixing(x, *ln1, *ch, eps=self.eps, approximate=approximate, backend=self.backend)


class ResMLPBlock(nn.Module):
    """ResMLP block (B, S, C) → (B, S, C): affine → S×S token linear → layer scale, then affine → MLP →
    layer scale. Parameters: ``Affine_0/{alpha,beta}``, ``linear_tokens/{kernel (S, S), bias}``, ``Affine_1``,
    ``mlp_channels/Dense_0``, ``mlp_channels/Dense_1``, ``ls1``, ``ls2`` (deit / timm names, Flax layout)."""

    channels_mlp_dim: int
    init_values: float = 1e-4
    approximate_gelu: bool = False  # deit and timm use the exact GELU
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        S, C, approximate = _dims(x, self.approximate_gelu)
        ls = nn.initializers.constant(self.init_values)
        a0 = _NormParams(("alpha", "beta"), name="Affine_0")(C)
        k, b = _DenseParams(S, name="linear_tokens")(S)
        ls1 = self.param("ls1", ls, (C,), jnp.float32)
        x = mf_jax.token_mixing(x, *a0, k, b, None, None, norm="affine", scale=ls1, backend=self.backend)
        a1 = _NormParams(("alpha", "beta"), name="Affine_1")(C)
        ch = _MlpParams(self.channels_mlp_dim, name="mlp_channels")(C)
        ls2 = self.param("ls2", ls, (C,), jnp.float32)
        return mf_jax.channel_mixing(x, *a1, *ch, approximate=approximate, norm="affine", scale=ls2,
                                     backend=self.backend)
