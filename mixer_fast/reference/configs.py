"""Named MLP-Mixer and ResMLP configurations (dims as in DESIGN.md; S = (img_size / patch)²)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """One named architecture. ``tokens_dim``/``channels_dim`` are the hidden widths D_S and D_C."""

    name: str
    kind: str  # "mixer" | "resmlp"
    patch_size: int
    embed_dim: int
    num_blocks: int
    tokens_dim: int
    channels_dim: int
    init_values: float = 1e-4  # ResMLP layer scale
    img_size: int = 224

    @property
    def seq_len(self) -> int:
        """S, the number of tokens."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def timm_name(self) -> str:
        """The timm model name of the same architecture."""
        return f"{self.name}_{self.img_size}"


def _mixer(name: str, patch: int, dim: int, depth: int) -> ModelConfig:
    return ModelConfig(name, "mixer", patch, dim, depth, dim // 2, dim * 4)


def _resmlp(name: str, patch: int, dim: int, depth: int, init_values: float) -> ModelConfig:
    # ResMLP's token branch is one S×S linear: tokens_dim records S.
    return ModelConfig(name, "resmlp", patch, dim, depth, (224 // patch) ** 2, dim * 4, init_values)


CONFIGS: Dict[str, ModelConfig] = {c.name: c for c in (
    _mixer("mixer_s32", 32, 512, 8),
    _mixer("mixer_s16", 16, 512, 8),
    _mixer("mixer_b32", 32, 768, 12),
    _mixer("mixer_b16", 16, 768, 12),
    _mixer("mixer_l32", 32, 1024, 24),
    _mixer("mixer_l16", 16, 1024, 24),
    _resmlp("resmlp_12", 16, 384, 12, 1e-4),
    _resmlp("resmlp_24", 16, 384, 24, 1e-5),
    _resmlp("resmlp_36", 16, 384, 36, 1e-6),
    _resmlp("resmlp_big_24", 8, 768, 24, 1e-6),
)}


def get_config(name: str) -> ModelConfig:
    """The named config; accepts timm's names too (``mixer_b16_224``)."""
    key = name[:-4] if name.endswith("_224") else name
    if key not in CONFIGS:
        raise ValueError(f"name: expected one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[key]


def create_model(name: str, **kwargs) -> "nn.Module":
    """A reference model of the named config (``mixer_b16``, ``resmlp_12``, …); kwargs go to the model
    (``num_classes``, ``block_layer``, ``act_layer``, ``drop_path_rate``, ``device``, ``dtype``, …)."""
    from .modules import MlpMixer, ResMLP

    cfg = get_config(name)
    common = dict(patch_size=cfg.patch_size, num_blocks=cfg.num_blocks, embed_dim=cfg.embed_dim,
                  img_size=cfg.img_size)
    if cfg.kind == "mixer":
        return MlpMixer(**common, **kwargs)
    kwargs.setdefault("init_values", cfg.init_values)
    return ResMLP(**common, **kwargs)
