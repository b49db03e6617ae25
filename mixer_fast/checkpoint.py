"""Checkpoint conversion between Flax (google-research/vision_transformer), timm and deit layouts.

Pure numpy: importing this module needs neither torch nor jax. torch is imported only to read or write
``.pth`` / ``.pt`` / ``.bin`` files (and for ``.safetensors``, which also needs the safetensors package).
Every conversion is a renaming plus, per parameter, a transpose or reshape: arrays keep their dtype and
bits, so each direction undoes the other exactly.

Layouts (``L`` block index, ``D`` embed dim, ``P`` patch; ``ᵀ``: transposed, Flax Dense kernels are
(in, out), torch Linear weights (out, in)):

  Flax (.npz, '/'-joined keys)        timm state dict                       deit state dict (ResMLP only)
  stem/kernel (P, P, 3, D) HWIO       stem.proj.weight (D, 3, P, P) OIHW    patch_embed.proj.weight
  stem/bias                           stem.proj.bias                        patch_embed.proj.bias
  Mixer:  MixerBlock_L/...            blocks.L....
    LayerNorm_0/{scale,bias}          norm1.{weight,bias}
    token_mixing/Dense_{0,1}/kernel   mlp_tokens.fc{1,2}.weight ᵀ
    token_mixing/Dense_{0,1}/bias     mlp_tokens.fc{1,2}.bias
    LayerNorm_1/{scale,bias}          norm2.{weight,bias}
    channel_mixing/Dense_{0,1}/...    mlp_channels.fc{1,2}.... ᵀ
  pre_head_layer_norm/{scale,bias}    norm.{weight,bias}
  ResMLP: ResMLPBlock_L/...           blocks.L....                          blocks.L....
    Affine_0/{alpha,beta} (D,)        norm1.{alpha,beta} (1, 1, D)          norm1.{alpha,beta} (D,)
    linear_tokens/{kernel,bias}       linear_tokens.{weight,bias} ᵀ         attn.{weight,bias}
    ls1 (D,)                          ls1                                   gamma_1
    Affine_1/{alpha,beta}             norm2.{alpha,beta} (1, 1, D)          norm2.{alpha,beta} (D,)
    mlp_channels/Dense_{0,1}/...      mlp_channels.fc{1,2}.... ᵀ            mlp.fc{1,2}....
    ls2 (D,)                          ls2                                   gamma_2
  pre_head_affine/{alpha,beta} (D,)   norm.{alpha,beta} (1, 1, D)           norm.{alpha,beta} (D,)
  head/{kernel,bias}                  head.{weight,bias} ᵀ                  head.{weight,bias}

The Mixer Flax tree is exactly that of vision_transformer's ``models_mixer.MlpMixer`` (its ``.npz``
files convert unchanged; ``head`` is absent when it was built with ``num_classes=0``, as is timm's
with ``num_classes=0``). vision_transformer has no ResMLP: its Flax tree here is that of a model written
the same way with ``mixer_fast.flax.ResMLPBlock`` (auto-named ``ResMLPBlock_L``) and a final affine
named ``pre_head_affine``. deit's names are facebookresearch/deit's ``resmlp_models.py``; timm's
``checkpoint_filter_fn`` maps them the same way.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

LAYOUTS = ("flax", "timm", "deit")
MODELS = ("mixer", "resmlp")
TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
EXTENSIONS = (".npz", *TORCH_EXTENSIONS, ".safetensors")
# Prefixes that wrap a Flax tree in the files and variable dicts people have (flax variables,
# vision_transformer's older training checkpoints); stripped when every key carries one.
_FLAX_PREFIXES = ("params/", "opt/target/")

Arrays = Dict[str, np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------------------
# The parameter table

@dataclass(frozen=True)
class _Param:
    timm: str
    flax: str
    deit: Optional[str]
    kind: str  # "conv" | "linear" | "vector" | "affine"
    shape: Tuple[str, ...]  # timm-layout shape in dim names

    def name(self, layout: str) -> str:
        return getattr(self, layout)


def _linear(timm: str, flax: str, deit: Optional[str], out: str, inp: str) -> List[_Param]:
    return [_Param(f"{timm}.weight", f"{flax}/kernel", deit and f"{deit}.weight", "linear", (out, inp)),
            _Param(f"{timm}.bias", f"{flax}/bias", deit and f"{deit}.bias", "vector", (out,))]


def _norm(model: str, timm: str, flax: str, deit: Optional[str]) -> List[_Param]:
    if model == "mixer":
        return [_Param(f"{timm}.weight", f"{flax}/scale", None, "vector", ("D",)),
                _Param(f"{timm}.bias", f"{flax}/bias", None, "vector", ("D",))]
    return [_Param(f"{timm}.{p}", f"{flax}/{p}", f"{deit}.{p}", "affine", ("1", "1", "D")) for p in ("alpha", "beta")]


def _table(model: str, num_blocks: int, head: bool) -> List[_Param]:
    """Every parameter of a ``model`` with ``num_blocks`` blocks (and a head or not), in timm's order."""
    ps = [_Param("stem.proj.weight", "stem/kernel", "patch_embed.proj.weight", "conv", ("D", "C_in", "P_h", "P_w")),
          _Param("stem.proj.bias", "stem/bias", "patch_embed.proj.bias", "vector", ("D",))]
    for i in range(num_blocks):
        t = d = f"blocks.{i}"  # timm's and deit's block prefix
        if model == "mixer":
            f = f"MixerBlock_{i}"
            ps += _norm(model, f"{t}.norm1", f"{f}/LayerNorm_0", None)
            ps += _linear(f"{t}.mlp_tokens.fc1", f"{f}/token_mixing/Dense_0", None, "D_S", "S")
            ps += _linear(f"{t}.mlp_tokens.fc2", f"{f}/token_mixing/Dense_1", None, "S", "D_S")
            ps += _norm(model, f"{t}.norm2", f"{f}/LayerNorm_1", None)
            ps += _linear(f"{t}.mlp_channels.fc1", f"{f}/channel_mixing/Dense_0", None, "D_C", "D")
            ps += _linear(f"{t}.mlp_channels.fc2", f"{f}/channel_mixing/Dense_1", None, "D", "D_C")
        else:
            f = f"ResMLPBlock_{i}"
            ps += _norm(model, f"{t}.norm1", f"{f}/Affine_0", f"{d}.norm1")
            ps += _linear(f"{t}.linear_tokens", f"{f}/linear_tokens", f"{d}.attn", "S", "S")
            ps += _norm(model, f"{t}.norm2", f"{f}/Affine_1", f"{d}.norm2")
            ps += _linear(f"{t}.mlp_channels.fc1", f"{f}/mlp_channels/Dense_0", f"{d}.mlp.fc1", "D_C", "D")
            ps += _linear(f"{t}.mlp_channels.fc2", f"{f}/mlp_channels/Dense_1", f"{d}.mlp.fc2", "D", "D_C")
            ps += [_Param(f"{t}.ls1", f"{f}/ls1", f"{d}.gamma_1", "vector", ("D",)),
                   _Param(f"{t}.ls2", f"{f}/ls2", f"{d}.gamma_2", "vector", ("D",))]
    ps += _norm(model, "norm", "pre_head_layer_norm" if model == "mixer" else "pre_head_affine", "norm")
    if head:
        ps += _linear("head", "head", "head", "N", "D")
    return ps


def _layout_shape(kind: str, layout: str, shape: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """A timm-layout shape in ``layout``."""
    if layout == "flax" and kind == "conv":
        o, i, h, w = shape
        return (h, w, i, o)
    if layout == "flax" and kind == "linear":
        return tuple(reversed(shape))
    if layout != "timm" and kind == "affine":
        return shape[2:]
    return tuple(shape)


def _timm_shape(kind: str, layout: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A ``layout`` shape in timm's layout (the inverse of ``_layout_shape``)."""
    if layout == "flax" and kind == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    if layout == "flax" and kind == "linear":
        return tuple(reversed(shape))
    if layout != "timm" and kind == "affine":
        return (1, 1, *shape)
    return tuple(shape)


def _to_timm(a: np.ndarray, kind: str, layout: str) -> np.ndarray:
    if layout == "flax" and kind == "conv":
        return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if layout == "flax" and kind == "linear":
        return a.T  # (in, out) -> (out, in)
    if layout != "timm" and kind == "affine":
        return a.reshape(1, 1, -1)
    return a


def _from_timm(a: np.ndarray, kind: str, layout: str) -> np.ndarray:
    if layout == "flax" and kind == "conv":
        return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if layout == "flax" and kind == "linear":
        return a.T
    if layout != "timm" and kind == "affine":
        return a.reshape(-1)
    return a


# ---------------------------------------------------------------------------------------------------------
# Arrays in, flat dicts

def _to_numpy(v: Any, key: str, arg: str) -> np.ndarray:
    if type(v).__module__.split(".")[0] == "torch" and hasattr(v, "detach"):
        t = v.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: ml_dtypes' (jax's), bit for bit
            import ml_dtypes
            import torch

            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(v, (Mapping, str, bytes)) or v is None:
        raise TypeError(f"{arg}[{key!r}]: expected an array, got {type(v).__name__}")
    try:
        a = np.asarray(v)
    except Exception as e:  # noqa: BLE001 - what np.asarray raises varies by type
        raise TypeError(f"{arg}[{key!r}]: expected an array, got {type(v).__name__} ({e})") from e
    if a.dtype == object:
        raise TypeError(f"{arg}[{key!r}]: expected an array of numbers, got {type(v).__name__}")
    return a


def flatten_params(tree: Mapping, sep: str = "/", *, arg: str = "params") -> Arrays:
    """A nested Flax parameter tree as a flat dict of numpy arrays with ``sep``-joined keys (the ``.npz``
    form vision_transformer writes); a flat dict passes through. Torch tensors and JAX arrays become numpy
    arrays of the same dtype and bits (bfloat16 as ml_dtypes' bfloat16)."""
    out: Arrays = {}

    def walk(node: Mapping, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                walk(v, key)
            else:
                out[key] = _to_numpy(v, key, arg)

    walk(tree, "")
    return out


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
    """The nested tree of a flat dict with ``sep``-joined keys (vision_transformer's ``recover_tree``)."""
    tree: Dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"params: key {key!r} nests under a leaf")
        node[leaf] = v
    return tree


def _flat(params: Mapping, arg: str) -> Arrays:
    if not isinstance(params, Mapping):
        raise TypeError(f"{arg}: expected a dict of arrays (state dict) or a nested Flax tree, "
                        f"got {type(params).__name__}")
    flat = flatten_params(params, arg=arg)
    for prefix in _FLAX_PREFIXES:
        if flat and all(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix):]: v for k, v in flat.items()}
    if not flat:
        raise ValueError(f"{arg}: expected a checkpoint with parameters, got an empty one")
    return flat


# ---------------------------------------------------------------------------------------------------------
# Detection and validation

def _detect_layout(keys: Sequence[str], arg: str) -> str:
    if any("/" in k for k in keys):
        return "flax"
    if any(k.startswith("patch_embed.") for k in keys):
        return "deit"
    if any(k.startswith(("stem.", "blocks.", "norm.", "head.")) for k in keys):
        return "timm"
    raise ValueError(f"{arg}: cannot tell the layout: expected Flax keys ('stem/kernel', ...), timm keys "
                     f"('stem.proj.weight', ...) or deit keys ('patch_embed.proj.weight', ...), got "
                     f"{_preview(keys)}")


_MODEL_MARKS = {
    "flax": {"mixer": re.compile(r"^(MixerBlock_\d+|pre_head_layer_norm)/"),
             "resmlp": re.compile(r"^(ResMLPBlock_\d+|pre_head_affine)/")},
    "timm": {"mixer": re.compile(r"^(blocks\.\d+\.(mlp_tokens\.|norm[12]\.weight$)|norm\.weight$)"),
             "resmlp": re.compile(r"^(blocks\.\d+\.(linear_tokens\.|ls[12]$|norm[12]\.alpha$)|norm\.alpha$)")},
}


def _detect_model(keys: Sequence[str], layout: str, model: Optional[str], arg: str) -> str:
    if model is not None:
        if model not in MODELS:
            raise ValueError(f"model: expected one of {list(MODELS)} or None (detect), got {model!r}")
        if layout == "deit" and model != "resmlp":
            raise ValueError(f"model: deit's layout exists only for 'resmlp', got {model!r}")
        return model
    if layout == "deit":
        return "resmlp"
    found = [m for m in MODELS if any(_MODEL_MARKS[layout][m].search(k) for k in keys)]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise ValueError(f"{arg}: cannot tell a Mixer from a ResMLP ({what} kinds of keys in {_preview(keys)}); "
                         f"pass model='mixer' or model='resmlp'")
    return found[0]


def _structure(keys: Sequence[str], layout: str) -> Tuple[int, bool]:
    """(number of blocks, whether there is a head) from the keys."""
    pat = re.compile(r"^(?:MixerBlock|ResMLPBlock)_(\d+)/" if layout == "flax" else r"^blocks\.(\d+)\.")
    idx = [int(m.group(1)) for m in map(pat.match, keys) if m]
    head = any(k.startswith("head/" if layout == "flax" else "head.") for k in keys)
    return (max(idx) + 1 if idx else 0), head


def _preview(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


_NDIM = {"conv": 4, "linear": 2, "vector": 1}


@dataclass
class CheckpointInfo:
    """What a checkpoint holds: its layout, model kind, number of blocks, dims and parameter table."""

    layout: str
    model: str
    num_blocks: int
    dims: Dict[str, int]
    table: List[_Param]


def inspect_checkpoint(params: Mapping, model: Optional[str] = None, *, layout: Optional[str] = None,
                       arg: str = "params") -> Tuple[CheckpointInfo, Arrays]:
    """Detect and validate: (CheckpointInfo, the flat arrays). Raises ValueError naming ``arg`` on an unknown
    or missing key or an inconsistent shape (expected vs given, in the checkpoint's own layout)."""
    flat = _flat(params, arg)
    keys = list(flat)
    found_layout = _detect_layout(keys, arg)
    if layout is not None and layout != found_layout:
        raise ValueError(f"{arg}: expected a {layout} checkpoint, got one in the {found_layout} layout "
                         f"(keys {_preview(keys, 3)})")
    layout = found_layout
    model = _detect_model(keys, layout, model, arg)
    num_blocks, head = _structure(keys, layout)
    table = _table(model, num_blocks, head)
    names = {p.name(layout): p for p in table}
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise ValueError(f"{arg}: unexpected keys for a {layout} {model} checkpoint: {_preview(unknown)}; "
                         f"expected keys like {_preview(list(names), 4)}")
    missing = [k for k in names if k not in flat]
    if missing:
        raise ValueError(f"{arg}: missing keys for a {layout} {model} checkpoint with {num_blocks} blocks: "
                         f"{_preview(missing)}")
    for name, p in names.items():
        a = flat[name]
        ndim = 3 if (p.kind == "affine" and layout == "timm") else _NDIM.get(p.kind, 1)
        if a.ndim != ndim:
            sym = ", ".join(_layout_shape(p.kind, layout, p.shape))
            raise ValueError(f"{arg}[{name!r}]: expected a {ndim}-D array ({sym}), got shape {tuple(a.shape)}")
    # Dims from the first parameter that has each, in timm's layout; then every shape against them.
    dims: Dict[str, int] = {"1": 1}
    for p in table:
        timm_shape = _timm_shape(p.kind, layout, flat[p.name(layout)].shape)
        for sym, n in zip(p.shape, timm_shape):
            dims.setdefault(sym, int(n))
        want = _layout_shape(p.kind, layout, tuple(dims[s] for s in p.shape))
        got = tuple(flat[p.name(layout)].shape)
        if got != want:
            sym = ", ".join(_layout_shape(p.kind, layout, p.shape))
            known = ", ".join(f"{s}={dims[s]}" for s in dict.fromkeys(p.shape) if s != "1")
            raise ValueError(f"{arg}[{p.name(layout)!r}]: expected shape {want} = ({sym}) with {known} from the "
                             f"other parameters, got {got}")
    dims.pop("1")
    return CheckpointInfo(layout, model, num_blocks, dims, table), flat


# ---------------------------------------------------------------------------------------------------------
# Conversions

def _convert(params: Mapping, to: str, model: Optional[str], layout: Optional[str], arg: str,
             nested: bool = False) -> Tuple[Dict[str, Any], CheckpointInfo]:
    if to not in LAYOUTS:
        raise ValueError(f"to: expected one of {list(LAYOUTS)}, got {to!r}")
    info, flat = inspect_checkpoint(params, model, layout=layout, arg=arg)
    if to == "deit" and info.model != "resmlp":
        raise ValueError(f"to: deit's layout exists only for ResMLP, got a {info.model} checkpoint")
    # Fresh C-contiguous arrays: nothing aliases the input (or a read-only JAX buffer).
    out = {p.name(to): np.array(_from_timm(_to_timm(flat[p.name(info.layout)], p.kind, info.layout), p.kind, to),
                                order="C")
           for p in info.table}
    return (unflatten_params(out) if (to == "flax" and nested) else out), info


def convert_params(params: Mapping, to: str, *, model: Optional[str] = None, nested: bool = False) -> Dict[str, Any]:
    """Any layout (detected) -> ``to`` ("flax" | "timm" | "deit"). Flax output is flat '/'-joined keys, or the
    nested tree with ``nested=True``. Arrays keep their dtype; conversions are exact (bitwise)."""
    return _convert(params, to, model, None, "params", nested)[0]


def flax_to_timm(params: Mapping, model: Optional[str] = None) -> Arrays:
    """A Flax tree (nested, flat '/'-keys, or wrapped in {'params': ...}) -> a timm state dict of numpy arrays."""
    return _convert(params, "timm", model, "flax", "params")[0]


def timm_to_flax(state_dict: Mapping, model: Optional[str] = None, *, nested: bool = True) -> Dict[str, Any]:
    """A timm state dict (tensors or arrays) -> the Flax tree (nested; flat '/'-keys with nested=False)."""
    return _convert(state_dict, "flax", model, "timm", "state_dict", nested)[0]


def deit_to_timm(state_dict: Mapping) -> Arrays:
    """A deit ResMLP state dict (``patch_embed``, ``attn``, ``mlp``, ``gamma_1``, ...) -> timm's names."""
    return _convert(state_dict, "timm", "resmlp", "deit", "state_dict")[0]


def timm_to_deit(state_dict: Mapping) -> Arrays:
    """A timm ResMLP state dict -> deit's names and shapes (affine (D,), as deit's ``resmlp_models`` loads)."""
    return _convert(state_dict, "deit", "resmlp", "timm", "state_dict")[0]


# ---------------------------------------------------------------------------------------------------------
# Files

def _extension(path: PathLike, arg: str) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"{arg}: expected a file ending in one of {list(EXTENSIONS)}, got {str(path)!r}")
    return ext


def _unwrap_torch(obj: Any, path: str) -> Mapping:
    if isinstance(obj, Mapping) and obj and not all(hasattr(v, "detach") for v in obj.values()):
        for key in ("model", "state_dict"):  # deit's and timm's training checkpoints
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            raise ValueError(f"in_path: expected a state dict of tensors (or {{'model': state_dict}} as deit "
                             f"saves, or {{'state_dict': ...}}) in {path!r}, got keys {_preview(list(obj))}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"in_path: expected a state dict in {path!r}, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint(path: PathLike, *, trust_pickle: bool = False) -> Arrays:
    """A checkpoint file as a flat dict of numpy arrays: ``.npz`` ('/'-joined Flax keys as vision_transformer
    writes), ``.pth`` / ``.pt`` / ``.bin`` (torch state dicts, also ``{'model': sd}``), ``.safetensors``.
    torch files load with ``weights_only=True`` unless ``trust_pickle`` (only for files you trust)."""
    ext = _extension(path, "in_path")
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext == ".safetensors":
        st = _safetensors(path)
        return {k: _to_numpy(v, k, "in_path") for k, v in st.load_file(str(path)).items()}
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0]
        raise ValueError(f"in_path: {str(path)!r} holds more than tensors and plain containers (torch.load with "
                         f"weights_only=True refused it: {why}); if you trust the file, pass trust_pickle=True "
                         f"(--trust-pickle)") from e
    return {k: _to_numpy(v, k, "in_path") for k, v in _unwrap_torch(obj, str(path)).items()}


def _safetensors(path: PathLike):
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ValueError(f"{str(path)!r}: .safetensors files need the safetensors package and torch ({e})") from e
    return st


def _to_torch(a: np.ndarray):
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def save_checkpoint(params: Mapping, path: PathLike) -> None:
    """Write a flat (or nested Flax) dict of arrays: ``.npz`` with '/'-joined keys, torch files as a plain
    state dict of tensors, ``.safetensors``."""
    ext = _extension(path, "out_path")
    flat = _flat(params, "params")
    if ext == ".npz":
        bad = [k for k, a in flat.items() if a.dtype.name == "bfloat16"]
        if bad:
            raise ValueError(f"out_path: .npz cannot hold bfloat16 ({_preview(bad, 2)}): numpy would read it back "
                             f"as raw 2-byte records; cast first or write a torch file")
        np.savez(str(path), **flat)
        return
    tensors = {k: _to_torch(a) for k, a in flat.items()}
    if ext == ".safetensors":
        _safetensors(path).save_file(tensors, str(path))
        return
    import torch

    torch.save(tensors, str(path))


def convert_checkpoint(in_path: PathLike, out_path: PathLike, *, to: Optional[str] = None, model: Optional[str] = None,
                       trust_pickle: bool = False) -> str:
    """Convert the checkpoint file ``in_path`` into ``out_path`` and return the layout written.

    The source layout is read from the keys; the target is ``to``, or by default ``flax`` for an ``.npz``
    ``out_path`` and ``timm`` for a torch / safetensors one. Flax is written only as ``.npz``, timm and deit
    only as torch or safetensors files."""
    return _convert_checkpoint(in_path, out_path, _target(out_path, to), model, trust_pickle)[0]


def _target(out_path: PathLike, to: Optional[str]) -> str:
    """The layout to write: ``to``, checked against ``out_path``'s extension, or the extension's default."""
    out_ext = _extension(out_path, "out_path")
    if to is None:
        return "flax" if out_ext == ".npz" else "timm"
    if to not in LAYOUTS:
        raise ValueError(f"to: expected one of {list(LAYOUTS)}, got {to!r}")
    if (to == "flax") != (out_ext == ".npz"):
        want = "'.npz'" if to == "flax" else f"one of {list(EXTENSIONS[1:])}"
        raise ValueError(f"out_path: the {to} layout is written as {want}, got {str(out_path)!r}")
    return to


def _convert_checkpoint(in_path: PathLike, out_path: PathLike, to: str, model: Optional[str],
                        trust_pickle: bool) -> Tuple[str, CheckpointInfo]:
    params = load_checkpoint(in_path, trust_pickle=trust_pickle)
    info, _ = inspect_checkpoint(params, model, arg="in_path")
    if info.layout == to:
        raise ValueError(f"to: {str(in_path)!r} is already in the {to} layout; pick another layout with to= "
                         f"(--to flax|timm|deit) or another out_path extension (.npz for flax)")
    out, info = _convert(params, to, info.model, info.layout, "in_path")
    save_checkpoint(out, out_path)
    return to, info


# ---------------------------------------------------------------------------------------------------------
# Command line

def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``convert-checkpoint IN OUT`` arguments (for ``mixer-fast``'s subparser)."""
    parser.add_argument("in_path", metavar="IN", help=f"checkpoint to read ({', '.join(EXTENSIONS)})")
    parser.add_argument("out_path", metavar="OUT", help="file to write: .npz for flax, .pth/.pt/.bin/.safetensors "
                                                        "for timm or deit")
    parser.add_argument("--to", choices=LAYOUTS, default=None,
                        help="target layout (default: flax for an .npz OUT, timm otherwise)")
    parser.add_argument("--model", choices=MODELS, default=None, help="mixer or resmlp (default: from the keys)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="let torch.load unpickle arbitrary objects (deit training checkpoints with 'args'); "
                             "only for files you trust")
    return parser


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    """Run ``convert-checkpoint`` from parsed arguments: 0 on success, 1 with the error on stderr."""
    try:
        to, info = _convert_checkpoint(args.in_path, args.out_path, _target(args.out_path, args.to),
                                       args.model, args.trust_pickle)
    except (ValueError, TypeError, OSError) as e:
        print(f"mixer-fast convert-checkpoint: error: {e}", file=sys.stderr)
        return 1
    dims = ", ".join(f"{k}={v}" for k, v in info.dims.items())
    print(f"wrote {args.out_path}: {info.model}, {info.layout} -> {to} layout, {info.num_blocks} blocks, "
          f"{len(info.table)} arrays ({dims})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``mixer-fast convert-checkpoint IN OUT [--to flax|timm|deit] [--model mixer|resmlp] [--trust-pickle]``."""
    parser = add_cli_arguments(argparse.ArgumentParser(
        prog="mixer-fast convert-checkpoint",
        description="Convert Mixer / ResMLP checkpoints between Flax (vision_transformer .npz), timm and deit."))
    return cmd_convert_checkpoint(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
