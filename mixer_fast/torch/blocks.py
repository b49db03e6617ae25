"""Drop-in fused blocks: ``MixerBlock``, ``ResMLPBlock`` and gMLP's ``SpatialGatingBlock`` with timm's
constructor and parameter names.

The submodules are the same as timm's (``norm1``, ``mlp_tokens.fc1``, …), so timm state dicts load
strictly and ``timm.create_model(..., block_layer=mixer_fast.MixerBlock)`` works; the forward reads
their parameters and calls the two fused ops instead of running the submodules one by one.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import torch
from torch import nn

from .. import dispatch
from ..reference.modules import Affine, DropPath, GatedMlp, Mlp, SpatialGatingUnit, pair
from . import checks, ops

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Validation of the parts a block is made of (shared by __init__ and convert()).

def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def _no_extra_kwargs(cls: str, kwargs: Dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"{cls}: unexpected keyword argument(s) {sorted(kwargs)}")


def _gelu(name: str, act: nn.Module) -> str:
    """The GELU approximation of an activation module; ValueError for anything but nn.GELU."""
    if not isinstance(act, nn.GELU):
        raise ValueError(f"{name}: expected nn.GELU (exact or tanh), got {type(act).__name__}")
    return act.approximate


def _act_layer(act_layer: Optional[Callable[[], nn.Module]], approximate: Optional[str]) -> Callable[[], nn.Module]:
    if approximate is not None:
        checks.choice("approximate", approximate, checks.APPROXIMATIONS)
    if act_layer is None:
        return partial(nn.GELU, approximate=approximate or "none")
    given = _gelu("act_layer", act_layer())
    if approximate is not None and approximate != given:
        raise ValueError(f"approximate: expected {given!r} to agree with act_layer, got {approximate!r}")
    return act_layer


def _linear(name: str, m: object, in_features: int, out_features: int) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise ValueError(f"{name}: expected nn.Linear, got {type(m).__name__}")
    if (m.in_features, m.out_features) != (in_features, out_features):
        raise ValueError(f"{name}: expected Linear({in_features}, {out_features}), "
                         f"got Linear({m.in_features}, {m.out_features})")
    return m


def _mlp(name: str, mlp: nn.Module, features: int) -> float:
    """Checks an fc1 → GELU → dropout → fc2 → dropout module (timm ``Mlp`` layout); returns its dropout p."""
    if type(mlp).__name__ != "Mlp":
        raise ValueError(f"{name}: expected an Mlp (mixer_fast.reference.Mlp or timm.layers.Mlp), "
                         f"got {type(mlp).__name__}")
    fc1 = getattr(mlp, "fc1", None)
    if not isinstance(fc1, nn.Linear):
        raise ValueError(f"{name}.fc1: expected nn.Linear, got {type(fc1).__name__}")
    _linear(f"{name}.fc1", fc1, features, fc1.out_features)
    _linear(f"{name}.fc2", getattr(mlp, "fc2", None), fc1.out_features, features)
    _gelu(f"{name}.act", getattr(mlp, "act", None))
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"{name}.norm: expected nn.Identity (no norm inside the MLP), got {type(mlp.norm).__name__}")
    p = [getattr(mlp, d).p if isinstance(getattr(mlp, d, None), nn.Dropout) else 0.0 for d in ("drop1", "drop2")]
    if p[0] != p[1]:
        raise ValueError(f"{name}: expected the same dropout after fc1 and fc2, got {p[0]} and {p[1]}")
    return p[0]


def _gated_mlp(name: str, mlp: nn.Module, features: int) -> int:
    """Checks a gMLP channel MLP (timm ``GatedMlp`` layout): fc1 (features → H, H even) → GELU → dropout →
    gate (a ``SpatialGatingUnit``: LayerNorm over H/2, Linear(S, S)) → no norm → fc2 (H/2 → features) →
    dropout, the same p twice; returns S."""
    if type(mlp).__name__ != "GatedMlp":
        raise ValueError(f"{name}: expected a GatedMlp (mixer_fast.reference.GatedMlp or timm.layers.GatedMlp), "
                         f"got {type(mlp).__name__}")
    fc1 = getattr(mlp, "fc1", None)
    if not isinstance(fc1, nn.Linear):
        raise ValueError(f"{name}.fc1: expected nn.Linear, got {type(fc1).__name__}")
    _linear(f"{name}.fc1", fc1, features, fc1.out_features)
    hidden = fc1.out_features
    if hidden % 2:
        raise ValueError(f"{name}.fc1: expected an even number of outputs (split into u and v), got {hidden}")
    _gelu(f"{name}.act", getattr(mlp, "act", None))
    gate = getattr(mlp, "gate", None)
    if type(gate).__name__ != "SpatialGatingUnit":
        raise ValueError(f"{name}.gate: expected a SpatialGatingUnit (mixer_fast.reference or timm), "
                         f"got {type(gate).__name__}")
    _layer_norm(f"{name}.gate.norm", getattr(gate, "norm", None), hidden // 2)
    proj = getattr(gate, "proj", None)
    if not isinstance(proj, nn.Linear):
        raise ValueError(f"{name}.gate.proj: expected nn.Linear, got {type(proj).__name__}")
    _linear(f"{name}.gate.proj", proj, proj.in_features, proj.in_features)
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"{name}.norm: expected nn.Identity (no norm after the gate), got {type(mlp.norm).__name__}")
    _linear(f"{name}.fc2", getattr(mlp, "fc2", None), hidden // 2, features)
    p = []
    for d in ("drop1", "drop2"):
        m = getattr(mlp, d, None)
        if not isinstance(m, (nn.Dropout, nn.Identity)):
            raise ValueError(f"{name}.{d}: expected nn.Dropout, got {type(m).__name__}")
        p.append(getattr(m, "p", 0.0))
    if p[0] != p[1]:
        raise ValueError(f"{name}: expected the same dropout after fc1 and fc2, got {p[0]} and {p[1]}")
    return proj.in_features


def _layer_norm(name: str, norm: nn.Module, dim: int) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"{name}: expected nn.LayerNorm, got {type(norm).__name__}")
    if tuple(norm.normalized_shape) != (dim,):
        raise ValueError(f"{name}: expected LayerNorm over ({dim},), got {tuple(norm.normalized_shape)}")


def _affine(name: str, norm: nn.Module, dim: int) -> None:
    alpha, beta = getattr(norm, "alpha", None), getattr(norm, "beta", None)
    if type(norm).__name__ != "Affine" or not isinstance(alpha, torch.Tensor) or not isinstance(beta, torch.Tensor):
        raise ValueError(f"{name}: expected an Affine (alpha * x + beta), got {type(norm).__name__}")
    for pname, p in (("alpha", alpha), ("beta", beta)):
        if p.numel() != dim or p.shape[-1] != dim:
            raise ValueError(f"{name}.{pname}: expected {dim} values along the last dim, got shape {tuple(p.shape)}")


def _drop_path(name: str, m: nn.Module) -> float:
    if isinstance(m, nn.Identity):
        return 0.0
    p = getattr(m, "drop_prob", None)
    if type(m).__name__ != "DropPath" or not isinstance(p, float) or not getattr(m, "scale_by_keep", True):
        raise ValueError(f"{name}: expected DropPath (scaled by keep probability) or nn.Identity, "
                         f"got {type(m).__name__}")
    return p


def _sample_scale(block: nn.Module, x: Tensor) -> Optional[Tensor]:
    """Drop path's per-sample factor (B,), drawn afresh for each branch as timm does; None when inactive."""
    p = getattr(block.drop_path, "drop_prob", 0.0)
    if not block.training or p == 0.0:
        return None
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],)).bernoulli_(keep)
    return mask.div_(keep) if keep > 0.0 else mask


def _check_x(block: nn.Module, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor (B, {block.seq_len}, {block.dim}), got {type(x).__name__}")
    if x.ndim != 3 or tuple(x.shape[1:]) != (block.seq_len, block.dim):
        raise ValueError(f"x: expected shape (B, seq_len={block.seq_len}, dim={block.dim}), got {tuple(x.shape)}")


def _check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a backend name (str) or None, got {type(backend).__name__}")
        dispatch.get_spec(backend, "torch")
    return backend


class _FusedBlock(nn.Module):
    """Shared construction-from-parts (``from_module``) and repr for the fused blocks."""

    _parts: Tuple[str, ...] = ()
    backend: Optional[str]

    @classmethod
    def from_module(cls, block: nn.Module, *, backend: Optional[str] = None):
        """A fused block that reuses ``block``'s submodules and Parameter objects (no copy).

        ``block`` is a timm ``MixerBlock`` / ``ResBlock`` / ``SpatialGatingBlock`` (the one matching this
        class) or a mixer_fast.reference block; ValueError
        (naming the part) if it is built from layers the fused ops cannot express.
        """
        parts = {}
        for name in cls._parts:
            if not hasattr(block, name):
                raise ValueError(f"block: expected a {cls.__name__}-like module with {name!r}, "
                                 f"got {type(block).__name__} without it")
            parts[name] = getattr(block, name)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._adopt(backend=backend, **parts)
        return new.train(block.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, seq_len={self.seq_len}, backend={self.backend!r}"


class MixerBlock(_FusedBlock):
    """Fused MLP-Mixer block, a drop-in for timm's ``MixerBlock``. Input and output (B, seq_len, dim).

    Token mixing x + MLP_tokens(LN1(x)ᵀ)ᵀ and channel mixing x + MLP_channels(LN2(x)) each run as one
    fused op (mixer_fast.ops) on the backend chosen per call: ``backend`` here, else the
    ``MIXER_FAST_BACKEND`` environment variable, else the best one for the input's device.

    ``mlp_layer``/``norm_layer``/``act_layer`` follow timm (Mlp, LayerNorm, GELU and partials of them);
    ``eps``/``approximate`` set LayerNorm's epsilon (default 1e-6) and the GELU ("none" = erf, default,
    or "tanh") when those layers are not given, and must agree with them when they are.
    """

    _parts = ("norm1", "mlp_tokens", "drop_path", "norm2", "mlp_channels")

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: Union[float, Tuple[float, float]] = (0.5, 4.0),
        mlp_layer: Optional[Type[nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        act_layer: Optional[Callable[[], nn.Module]] = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        *,
        eps: Optional[float] = None,
        approximate: Optional[str] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _no_extra_kwargs("MixerBlock", kwargs)
        dim, seq_len = _positive_int("dim", dim), _positive_int("seq_len", seq_len)
        checks.finite_float("drop", drop, low=0.0, high=1.0, low_open=False)
        checks.finite_float("drop_path", drop_path, low=0.0, high=1.0, low_open=False)
        if eps is not None:
            eps = checks.finite_float("eps", eps, low=0.0)
        dd = {"device": device, "dtype": dtype}
        tokens_dim, channels_dim = (int(r * dim) for r in pair(mlp_ratio))
        _positive_int("mlp_ratio[0] * dim", tokens_dim)
        _positive_int("mlp_ratio[1] * dim", channels_dim)
        act_layer = _act_layer(act_layer, approximate)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6 if eps is None else eps)
        mlp_layer = mlp_layer or Mlp
        norm1 = norm_layer(dim, **dd)
        if eps is not None and getattr(norm1, "eps", eps) != eps:
            raise ValueError(f"eps: expected {norm1.eps} to agree with norm_layer, got {eps}")
        self._adopt(
            norm1=norm1,
            mlp_tokens=mlp_layer(seq_len, tokens_dim, act_layer=act_layer, drop=drop, **dd),
            drop_path=DropPath(drop_path) if drop_path > 0.0 else nn.Identity(),
            norm2=norm_layer(dim, **dd),
            mlp_channels=mlp_layer(dim, channels_dim, act_layer=act_layer, drop=drop, **dd),
            backend=backend,
        )

    def _adopt(self, *, norm1, mlp_tokens, drop_path, norm2, mlp_channels, backend) -> None:
        if not isinstance(norm1, nn.LayerNorm):
            raise ValueError(f"norm_layer: expected nn.LayerNorm (or a partial of it), got {type(norm1).__name__}")
        dim = norm1.normalized_shape[-1]
        _layer_norm("norm1", norm1, dim)
        _layer_norm("norm2", norm2, dim)
        fc1 = getattr(mlp_tokens, "fc1", None)
        if not isinstance(fc1, nn.Linear):
            raise ValueError(f"mlp_tokens.fc1: expected nn.Linear, got {type(fc1).__name__}")
        seq_len = fc1.in_features
        _mlp("mlp_tokens", mlp_tokens, seq_len)
        _mlp("mlp_channels", mlp_channels, dim)
        _drop_path("drop_path", drop_path)
        self.dim, self.seq_len = dim, seq_len
        self.backend = _check_backend(backend)
        self.norm1, self.mlp_tokens, self.drop_path = norm1, mlp_tokens, drop_path
        self.norm2, self.mlp_channels = norm2, mlp_channels

    def forward(self, x: Tensor) -> Tensor:
        _check_x(self, x)
        tok, ch = self.mlp_tokens, self.mlp_channels
        x = ops.token_mixing(
            x, self.norm1.weight, self.norm1.bias, tok.fc1.weight, tok.fc1.bias, tok.fc2.weight, tok.fc2.bias,
            eps=self.norm1.eps, approximate=tok.act.approximate, sample_scale=_sample_scale(self, x),
            dropout=tok.drop1.p if self.training else 0.0, backend=self.backend)
        return ops.channel_mixing(
            x, self.norm2.weight, self.norm2.bias, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias,
            eps=self.norm2.eps, approximate=ch.act.approximate, sample_scale=_sample_scale(self, x),
            dropout=ch.drop1.p if self.training else 0.0, backend=self.backend)


class ResMLPBlock(_FusedBlock):
    """Fused ResMLP block, a drop-in for timm's ``ResBlock``. Input and output (B, seq_len, dim).

    x + ls1 · Linear_tokens(Aff1(x)ᵀ)ᵀ, then + ls2 · MLP_channels(Aff2(x)), each as one fused op.
    """

    _parts = ("norm1", "linear_tokens", "drop_path", "norm2", "mlp_channels", "ls1", "ls2")

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float = 4,
        mlp_layer: Optional[Type[nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        act_layer: Optional[Callable[[], nn.Module]] = None,
        init_values: float = 1e-4,
        drop: float = 0.0,
        drop_path: float = 0.0,
        *,
        approximate: Optional[str] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _no_extra_kwargs("ResMLPBlock", kwargs)
        dim, seq_len = _positive_int("dim", dim), _positive_int("seq_len", seq_len)
        checks.finite_float("drop", drop, low=0.0, high=1.0, low_open=False)
        checks.finite_float("drop_path", drop_path, low=0.0, high=1.0, low_open=False)
        init_values = checks.finite_float("init_values", init_values, low=-float("inf"))
        channels_dim = _positive_int("mlp_ratio * dim", int(dim * pair(mlp_ratio)[1]))
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or Affine
        self._adopt(
            norm1=norm_layer(dim, **dd),
            linear_tokens=nn.Linear(seq_len, seq_len, **dd),
            drop_path=DropPath(drop_path) if drop_path > 0.0 else nn.Identity(),
            norm2=norm_layer(dim, **dd),
            mlp_channels=(mlp_layer or Mlp)(dim, channels_dim, act_layer=_act_layer(act_layer, approximate),
                                            drop=drop, **dd),
            ls1=nn.Parameter(init_values * torch.ones(dim, **dd)),
            ls2=nn.Parameter(init_values * torch.ones(dim, **dd)),
            backend=backend,
        )

    def _adopt(self, *, norm1, linear_tokens, drop_path, norm2, mlp_channels, ls1, ls2, backend) -> None:
        alpha = getattr(norm1, "alpha", None)
        if not isinstance(alpha, torch.Tensor):
            raise ValueError(f"norm_layer: expected an Affine (alpha * x + beta), got {type(norm1).__name__}")
        dim = alpha.shape[-1]
        _affine("norm1", norm1, dim)
        _affine("norm2", norm2, dim)
        if not isinstance(linear_tokens, nn.Linear):
            raise ValueError(f"linear_tokens: expected nn.Linear, got {type(linear_tokens).__name__}")
        seq_len = linear_tokens.in_features
        _linear("linear_tokens", linear_tokens, seq_len, seq_len)
        _mlp("mlp_channels", mlp_channels, dim)
        _drop_path("drop_path", drop_path)
        for name, p in (("ls1", ls1), ("ls2", ls2)):
            if not isinstance(p, nn.Parameter) or tuple(p.shape) != (dim,):
                raise ValueError(f"{name}: expected a Parameter of shape ({dim},), got "
                                 f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        self.dim, self.seq_len = dim, seq_len
        self.backend = _check_backend(backend)
        self.norm1, self.linear_tokens, self.drop_path = norm1, linear_tokens, drop_path
        self.norm2, self.mlp_channels = norm2, mlp_channels
        self.ls1, self.ls2 = ls1, ls2

    def forward(self, x: Tensor) -> Tensor:
        _check_x(self, x)
        ch = self.mlp_channels
        x = ops.token_mixing(
            x, self.norm1.alpha.reshape(-1), self.norm1.beta.reshape(-1), self.linear_tokens.weight,
            self.linear_tokens.bias, None, None, norm="affine", scale=self.ls1, sample_scale=_sample_scale(self, x),
            backend=self.backend)
        return ops.channel_mixing(
            x, self.norm2.alpha.reshape(-1), self.norm2.beta.reshape(-1), ch.fc1.weight, ch.fc1.bias, ch.fc2.weight,
            ch.fc2.bias, norm="affine", approximate=ch.act.approximate, scale=self.ls2,
            sample_scale=_sample_scale(self, x), dropout=ch.drop1.p if self.training else 0.0, backend=self.backend)


class SpatialGatingBlock(_FusedBlock):
    """Fused gMLP block, a drop-in for timm's ``SpatialGatingBlock``. Input and output (B, seq_len, dim).

    x + fc2(u ⊙ proj(LN_gate(v)ᵀ)ᵀ) with (u, v) = chunk(GELU(fc1(LN(x))), 2) runs as one op
    (``mixer_fast.ops.spatial_gating``). Parameter names are timm's (``norm``, ``mlp_channels.fc1``,
    ``mlp_channels.gate.norm``, ``mlp_channels.gate.proj``, ``mlp_channels.fc2``), so timm state dicts load
    strictly and ``MlpMixer(block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)`` works with timm's or
    mixer_fast.reference's GatedMlp. ``eps`` / ``approximate`` as in :class:`MixerBlock` (the block norm's
    epsilon, default 1e-6, and the GELU); the gate's LayerNorm keeps nn.LayerNorm's default eps (1e-5) as
    in timm. As timm's, the gate is not given gMLP's init here (timm's MlpMixer init does that).
    """

    _parts = ("norm", "mlp_channels", "drop_path")

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float = 4,
        mlp_layer: Optional[Type[nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        act_layer: Optional[Callable[[], nn.Module]] = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        *,
        eps: Optional[float] = None,
        approximate: Optional[str] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _no_extra_kwargs("SpatialGatingBlock", kwargs)
        dim, seq_len = _positive_int("dim", dim), _positive_int("seq_len", seq_len)
        checks.finite_float("drop", drop, low=0.0, high=1.0, low_open=False)
        checks.finite_float("drop_path", drop_path, low=0.0, high=1.0, low_open=False)
        if eps is not None:
            eps = checks.finite_float("eps", eps, low=0.0)
        hidden = _positive_int("mlp_ratio * dim", int(dim * pair(mlp_ratio)[1]))
        if hidden % 2:
            raise ValueError(f"mlp_ratio * dim: expected an even hidden width (split into u and v), got {hidden}")
        dd = {"device": device, "dtype": dtype}
        act_layer = _act_layer(act_layer, approximate)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6 if eps is None else eps)
        norm = norm_layer(dim, **dd)
        if eps is not None and getattr(norm, "eps", eps) != eps:
            raise ValueError(f"eps: expected {norm.eps} to agree with norm_layer, got {eps}")
        gate_layer = partial(SpatialGatingUnit, seq_len=seq_len, **dd)
        self._adopt(
            norm=norm,
            mlp_channels=(mlp_layer or GatedMlp)(dim, hidden, act_layer=act_layer, gate_layer=gate_layer, drop=drop,
                                                 **dd),
            drop_path=DropPath(drop_path) if drop_path > 0.0 else nn.Identity(),
            backend=backend,
        )

    def _adopt(self, *, norm, mlp_channels, drop_path, backend) -> None:
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"norm_layer: expected nn.LayerNorm (or a partial of it), got {type(norm).__name__}")
        dim = norm.normalized_shape[-1]
        _layer_norm("norm", norm, dim)
        seq_len = _gated_mlp("mlp_channels", mlp_channels, dim)
        _drop_path("drop_path", drop_path)
        self.dim, self.seq_len = dim, seq_len
        self.backend = _check_backend(backend)
        self.norm, self.mlp_channels, self.drop_path = norm, mlp_channels, drop_path

    def forward(self, x: Tensor) -> Tensor:
        _check_x(self, x)
        mlp = self.mlp_channels
        gate = mlp.gate
        return ops.spatial_gating(
            x, self.norm.weight, self.norm.bias, mlp.fc1.weight, mlp.fc1.bias, gate.norm.weight, gate.norm.bias,
            gate.proj.weight, gate.proj.bias, mlp.fc2.weight, mlp.fc2.bias, eps=self.norm.eps,
            gate_eps=gate.norm.eps, approximate=mlp.act.approximate, sample_scale=_sample_scale(self, x),
            dropout=getattr(mlp.drop1, "p", 0.0) if self.training else 0.0, backend=self.backend)
