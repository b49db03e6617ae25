"""Plain eager PyTorch Mixer, ResMLP and gMLP blocks and models: the spec every kernel is tested against.

Module and parameter names are timm's (``timm.models.mlp_mixer``), so state dicts move between timm,
these references and the fused blocks with ``load_state_dict(strict=True)``. Nothing here is fused or
clever; each forward is the formula of DESIGN.md.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Tuple, Type, Union

import torch
from torch import nn

Tensor = torch.Tensor


def pair(v: Union[float, Tuple[float, float]]) -> Tuple[float, float]:
    """(v, v) for a scalar, the pair itself for a 2-sequence."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"mlp_ratio: expected a number or a pair (tokens, channels), got {v!r}")
        return float(v[0]), float(v[1])
    return float(v), float(v)


class Mlp(nn.Module):
    """fc1 → GELU → dropout → fc2 → dropout, with timm ``Mlp`` attribute names. Acts on the last dim."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Affine(nn.Module):
    """ResMLP's 'norm': ``alpha * x + beta`` per channel, no statistics. Parameters shaped (1, 1, dim) as in timm."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones((1, 1, dim), device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros((1, 1, dim), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * x + self.beta


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's branch is dropped with probability ``drop_prob`` and the
    kept ones are scaled by 1 / keep_prob (timm's rule); identity in eval."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def sample_scale(self, x: Tensor) -> Tensor:
        """The per-sample factor mask / keep_prob, shape (B,), dtype and device of x."""
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],)).bernoulli_(keep_prob)
        return mask.div_(keep_prob) if keep_prob > 0.0 else mask

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self.sample_scale(x).view((-1,) + (1,) * (x.ndim - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class MixerBlock(nn.Module):
    """MLP-Mixer block: x + MLP_tokens(LN(x)ᵀ)ᵀ, then + MLP_channels(LN(·)). Input and output (B, seq_len, dim)."""

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: Union[float, Tuple[float, float]] = (0.5, 4.0),
        mlp_layer: Type[nn.Module] = Mlp,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        tokens_dim, channels_dim = (int(r * dim) for r in pair(mlp_ratio))
        self.norm1 = norm_layer(dim, **dd)
        self.mlp_tokens = mlp_layer(seq_len, tokens_dim, act_layer=act_layer, drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp_channels = mlp_layer(dim, channels_dim, act_layer=act_layer, drop=drop, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class ResMLPBlock(nn.Module):
    """ResMLP block: x + ls1 · Linear_tokens(Aff(x)ᵀ)ᵀ, then + ls2 · MLP_channels(Aff(·)). (B, seq_len, dim)."""

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float = 4,
        mlp_layer: Type[nn.Module] = Mlp,
        norm_layer: Callable[..., nn.Module] = Affine,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        init_values: float = 1e-4,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.linear_tokens = nn.Linear(seq_len, seq_len, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp_channels = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.ls1 = nn.Parameter(init_values * torch.ones(dim, **dd))
        self.ls2 = nn.Parameter(init_values * torch.ones(dim, **dd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.ls2 * self.mlp_channels(self.norm2(x)))
        return x


class SpatialGatingUnit(nn.Module):
    """gMLP's gate, timm names: (u, v) = chunk(x, 2, dim=-1); u ⊙ proj(norm(v)ᵀ)ᵀ. (B, S, dim) → (B, S, dim/2).

    ``norm`` is nn.LayerNorm with its default eps (1e-5) as in timm; ``proj`` is the S×S linear along tokens.
    """

    def __init__(self, dim: int, seq_len: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim // 2, **dd)
        self.proj = nn.Linear(seq_len, seq_len, **dd)

    def init_weights(self) -> None:
        """timm's init for the gate (called by timm's MlpMixer init): proj ≈ 0, bias 1, so the gate starts at u."""
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        u, v = x.chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2))
        return u * v.transpose(-1, -2)


class GatedMlp(nn.Module):
    """fc1 → GELU → dropout → gate → fc2 → dropout, with timm ``GatedMlp`` attribute names (``norm`` is
    Identity). With ``gate_layer`` (built as ``gate_layer(hidden_features)``) fc2 takes hidden_features / 2 inputs."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        gate_layer: Optional[Callable[..., nn.Module]] = None,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        if gate_layer is not None:
            if hidden_features % 2:
                raise ValueError(f"hidden_features: expected an even number with a gate, got {hidden_features}")
            self.gate = gate_layer(hidden_features, **dd)
            hidden_features //= 2
        else:
            self.gate = nn.Identity()
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.gate(self.drop1(self.act(self.fc1(x)))))))


class SpatialGatingBlock(nn.Module):
    """gMLP block (timm ``SpatialGatingBlock``): x + GatedMlp_with_SGU(LN(x)). Input and output (B, seq_len, dim)."""

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float = 4,
        mlp_layer: Type[nn.Module] = GatedMlp,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **dd)
        sgu = partial(SpatialGatingUnit, seq_len=seq_len, **dd)
        self.mlp_channels = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, gate_layer=sgu, drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp_channels(self.norm(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches → linear projection: (B, in_chans, H, W) → (B, H·W / patch², embed_dim)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 device=None, dtype=None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size: expected a multiple of patch_size={patch_size}, got {img_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"x: expected images (B, C, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got shape {tuple(x.shape)}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class MlpMixer(nn.Module):
    """Whole MLP-Mixer: patch stem → blocks → norm → mean over tokens → linear head. (B, 3, H, W) → (B, classes).

    The constructor follows timm's ``MlpMixer`` (same argument names, same state-dict keys), so any
    block class with timm's ``block_layer`` signature (``mixer_fast.MixerBlock`` included) can be used.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        patch_size: int = 16,
        num_blocks: int = 8,
        embed_dim: int = 512,
        mlp_ratio: Union[float, Tuple[float, float]] = (0.5, 4.0),
        block_layer: Callable[..., nn.Module] = MixerBlock,
        mlp_layer: Type[nn.Module] = Mlp,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool: expected 'avg' or '', got {global_pool!r}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        self.blocks = nn.Sequential(*[
            block_layer(embed_dim, self.stem.num_patches, mlp_ratio, mlp_layer=mlp_layer, norm_layer=norm_layer,
                        act_layer=act_layer, drop=proj_drop_rate, drop_path=drop_path_rate, **dd)
            for _ in range(num_blocks)
        ])
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → (B, S, embed_dim), after the final norm."""
        return self.norm(self.blocks(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        return self.head(self.head_drop(x))


class ResMLP(MlpMixer):
    """Whole ResMLP: MlpMixer with ResMLP blocks, Affine norms and a layer-scale ``init_values``."""

    def __init__(self, *, init_values: float = 1e-4, mlp_ratio: float = 4,
                 block_layer: Callable[..., nn.Module] = ResMLPBlock,
                 norm_layer: Callable[..., nn.Module] = Affine, **kwargs) -> None:
        super().__init__(mlp_ratio=mlp_ratio, block_layer=partial(block_layer, init_values=init_values),
                         norm_layer=norm_layer, **kwargs)
