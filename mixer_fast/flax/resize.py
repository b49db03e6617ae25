"""Fine-tuning at a new resolution over Flax parameter trees: the Flax twin of
``mixer_fast.torch.resize.resize_token_mixing`` (whose docstring quotes the MLP-Mixer paper, Supplementary C).

With the patch size fixed, an image K times larger per dimension has S' = K²·S tokens. Every token-mixing
weight is replaced by a block-diagonal matrix holding k = S'/S copies of the trained one and every bias
along tokens is tiled, so the new MLP processes k groups of S tokens independently with the trained
weights, as the paper does. For a whole model (or a block given ``old_size``) the groups are the paper's
"K×K equal parts spatially": windows of the original grid size tiling the new row-major grid, which makes
the matrices block-diagonal up to a permutation of their token axes. For a bare block given a sequence
length they are k consecutive runs of S tokens.

Parameter layout (Flax: kernels are (in, out)):

- ``MixerBlock`` (vision_transformer): ``token_mixing/Dense_0/kernel`` (S, D_S) → (S', k·D_S), ``bias``
  (D_S,) → (k·D_S,) tiled; ``token_mixing/Dense_1/kernel`` (D_S, S) → (k·D_S, S'), ``bias`` (S,) → (S',)
  tiled (in window order).
- ``ResMLPBlock``: ``linear_tokens/kernel`` (S, S) → (S', S'), ``bias`` (S,) → (S',) tiled.

The modules' hidden width is a constructor field, so apply the new tree with ``tokens_mlp_dim`` multiplied
by k (``MixerBlock(tokens_mlp_dim=k * D_S, ...)``; vision_transformer's ``MlpMixer`` likewise).
``stem/kernel`` (P, P, 3, C) does not change: the patch size is fixed.

This module needs numpy and jax only (no torch).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import block_diag

Size = Union[int, Sequence[int]]

__all__ = ["resize_token_mixing"]


def _pair_of_ints(name: str, v: object) -> Tuple[int, int]:
    if (isinstance(v, (str, Mapping)) or not isinstance(v, Sequence) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0 for x in v)):
        raise ValueError(f"{name}: expected a grid (rows, cols) of two positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def _plan(seq_len: int, new_size: Size, old_size: Optional[Sequence[int]], grid_known: bool
          ) -> Tuple[int, Optional[np.ndarray]]:
    """(k, index): k groups; index (S',) maps each token of the new row-major sequence to its position in
    the block-diagonal order (None for the identity). Same rules and messages as the torch version."""
    old_grid = None
    if old_size is not None:
        old_grid = _pair_of_ints("old_size", old_size)
        if old_grid[0] * old_grid[1] != seq_len:
            raise ValueError(f"old_size: expected a grid of S={seq_len} tokens (the blocks' sequence length), "
                             f"got {old_grid} ({old_grid[0] * old_grid[1]} tokens)")
    if isinstance(new_size, (bool, str, Mapping)) or not isinstance(new_size, (int, np.integer, Sequence)):
        raise TypeError(f"new_size: expected a sequence length (int) or a patch grid (rows, cols), "
                        f"got {type(new_size).__name__}")
    square = math.isqrt(seq_len)
    if old_grid is None and (grid_known or not isinstance(new_size, (int, np.integer))):
        if square * square != seq_len:
            raise ValueError(f"old_size: expected the grid (rows, cols) with rows·cols = S={seq_len} (S is not a "
                             f"square, so it cannot be inferred), got None")
        old_grid = (square, square)

    if isinstance(new_size, (int, np.integer)):
        new_size = int(new_size)
        if new_size <= 0 or new_size % seq_len:
            raise ValueError(f"new_size: expected a positive multiple of the current sequence length "
                             f"S={seq_len}, got {new_size}")
        k = new_size // seq_len
        if old_grid is None:
            return k, None
        K = math.isqrt(k)
        if K * K != k:
            raise ValueError(f"new_size: expected K²·S = K²·{seq_len} tokens for an integer K (the grid "
                             f"{old_grid[0]}×{old_grid[1]} scaled by K in each dimension), got {new_size} = "
                             f"{k}·{seq_len}; pass the new grid (rows, cols) for other shapes")
        new_grid = (K * old_grid[0], K * old_grid[1])
    else:
        new_grid = _pair_of_ints("new_size", new_size)
        if new_grid[0] % old_grid[0] or new_grid[1] % old_grid[1]:
            raise ValueError(f"new_size: expected a grid whose rows are a multiple of {old_grid[0]} and cols a "
                             f"multiple of {old_grid[1]} (the current grid {old_grid}), got {new_grid}")
        k = (new_grid[0] // old_grid[0]) * (new_grid[1] // old_grid[1])
    (H, W), (Hn, Wn) = old_grid, new_grid
    if Wn == W:   # windows are whole row bands: already consecutive
        return k, None
    r, c = np.arange(Hn)[:, None], np.arange(Wn)[None, :]
    window = (r // H) * (Wn // W) + c // W
    return k, (window * (H * W) + (r % H) * W + c % W).reshape(-1)


@partial(jax.jit, static_argnums=(1, 3))
def _expand_jit(w: jax.Array, k: int, index: Optional[jax.Array], token_axes: Tuple[int, ...]) -> jax.Array:
    out = block_diag(*([w] * k)) if w.ndim == 2 else jnp.tile(w, k)
    if index is not None:
        for axis in token_axes:
            out = jnp.take(out, index, axis=axis)
    return out.astype(w.dtype)


def _expand(w: Any, k: int, index: Optional[np.ndarray], token_axes: Tuple[int, ...]) -> jax.Array:
    """blockdiag(w, …, w) (k copies; a 1-D w tiled k times), its ``token_axes`` permuted by ``index``.
    One jitted computation per leaf shape (eager jnp would compile every op for every shape)."""
    return _expand_jit(jnp.asarray(w), k, index if index is None else jnp.asarray(index), token_axes)


def _find(tree: Mapping, path: Tuple[str, ...], found: List[Tuple[Tuple[str, ...], str]]) -> None:
    """Collects (path, kind) of every block subtree: "mixer" (token_mixing/Dense_0, Dense_1) or "resmlp"."""
    tm = tree.get("token_mixing")
    if isinstance(tm, Mapping) and isinstance(tm.get("Dense_0"), Mapping) and isinstance(tm.get("Dense_1"), Mapping):
        found.append((path, "mixer"))
        return
    lt = tree.get("linear_tokens")
    if isinstance(lt, Mapping) and "kernel" in lt:
        found.append((path, "resmlp"))
        return
    for key, sub in tree.items():
        if isinstance(sub, Mapping):
            _find(sub, path + (key,), found)


def _seq_len(path: Tuple[str, ...], block: Mapping, kind: str) -> int:
    where = "/".join(path) or "<params>"
    if kind == "resmlp":
        shape = tuple(np.shape(block["linear_tokens"]["kernel"]))
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"{where}/linear_tokens/kernel: expected shape (S, S), got {shape}")
        return shape[0]
    k1 = tuple(np.shape(block["token_mixing"]["Dense_0"]["kernel"]))
    k2 = tuple(np.shape(block["token_mixing"]["Dense_1"]["kernel"]))
    if len(k1) != 2 or k2 != k1[::-1]:
        raise ValueError(f"{where}/token_mixing: expected Dense_0/kernel (S, D_S) and Dense_1/kernel (D_S, S), "
                         f"got {k1} and {k2}")
    return k1[0]


def _resize_block(block: Mapping, kind: str, k: int, index: Optional[np.ndarray]) -> Dict[str, Any]:
    out = dict(block)
    if kind == "mixer":
        tm = dict(block["token_mixing"])
        d0, d1 = dict(tm["Dense_0"]), dict(tm["Dense_1"])
        d0["kernel"] = _expand(d0["kernel"], k, index, (0,))    # (S, D_S) -> (S', k·D_S)
        d0["bias"] = _expand(d0["bias"], k, None, ())           # (D_S,) -> (k·D_S,)
        d1["kernel"] = _expand(d1["kernel"], k, index, (1,))    # (D_S, S) -> (k·D_S, S')
        d1["bias"] = _expand(d1["bias"], k, index, (0,))        # (S,) -> (S',)
        tm["Dense_0"], tm["Dense_1"] = d0, d1
        out["token_mixing"] = tm
    else:
        lt = dict(block["linear_tokens"])
        lt["kernel"] = _expand(lt["kernel"], k, index, (0, 1))  # (S, S) -> (S', S')
        if "bias" in lt:
            lt["bias"] = _expand(lt["bias"], k, index, (0,))
        out["linear_tokens"] = lt
    return out


def _rebuild(tree: Mapping, path: Tuple[str, ...], blocks: Dict[Tuple[str, ...], str], k: int,
             index: Optional[np.ndarray]) -> Dict[str, Any]:
    if path in blocks:
        return _resize_block(tree, blocks[path], k, index)
    return {key: _rebuild(sub, path + (key,), blocks, k, index) if isinstance(sub, Mapping) else sub
            for key, sub in tree.items()}


def resize_token_mixing(params: Mapping, new_size: Size, *, old_size: Optional[Sequence[int]] = None
                        ) -> Dict[str, Any]:
    """A new parameter tree whose token mixing runs on a longer sequence, initialised block-diagonally with
    copies of the trained weights (the MLP-Mixer paper's fine-tuning at a higher resolution).

    ``params``: the tree of one block (``mixer_fast.flax.MixerBlock`` / vision_transformer ``MixerBlock``:
    ``token_mixing/Dense_{0,1}``; ``mixer_fast.flax.ResMLPBlock``: ``linear_tokens``) or of a model holding
    them at any depth (vision_transformer ``MlpMixer``: ``stem``, ``MixerBlock_{i}``, ``pre_head_layer_norm``,
    ``head``), with or without the ``{"params": ...}`` wrapper; a dict or a FrozenDict (returned as the same
    kind). Every block is resized; leaves outside them are passed through unchanged (the same arrays).

    ``new_size``: a patch grid ``(rows, cols)`` (multiples of the current grid, whose k windows of the
    current grid size are the groups), or a sequence length S'. The current grid is ``old_size``, else the
    square (√S, √S). A tree with a ``stem`` (a whole model), or any tree given ``old_size``, is on a grid:
    an int S' must then be K²·S (grid scaled by K). A block tree without ``old_size`` given an int S' = k·S
    groups k consecutive runs of S tokens: applied to k stacked token tables (B, k·S, C) it returns the k
    stacked outputs.

    Returns the new tree; apply it with ``tokens_mlp_dim`` multiplied by k = S'/S. ValueError (naming the
    argument, expected vs given) when ``new_size`` is not a multiple of the current length / grid, when
    ``old_size`` does not hold S tokens, or when the tree has no block (or blocks of different S).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a Flax parameter tree (a mapping), got {type(params).__name__}")
    found: List[Tuple[Tuple[str, ...], str]] = []
    _find(params, (), found)
    if not found:
        raise ValueError("params: expected the tree of a Mixer / ResMLP block (token_mixing/Dense_0, Dense_1 or "
                         "linear_tokens) or of a model containing them, got a tree without any")
    seq_lens = {_seq_len(path, _get(params, path), kind) for path, kind in found}
    if len(seq_lens) != 1:
        raise ValueError(f"params: expected blocks of one sequence length, got {sorted(seq_lens)}")
    seq_len = seq_lens.pop()
    grid_known = _has_stem(params) or old_size is not None
    k, index = _plan(seq_len, new_size, old_size, grid_known)
    out = _rebuild(params, (), dict(found), k, index)
    if type(params).__name__ == "FrozenDict":
        from flax.core import freeze

        return freeze(out)
    return out


def _get(tree: Mapping, path: Tuple[str, ...]) -> Mapping:
    for key in path:
        tree = tree[key]
    return tree


def _has_stem(tree: Mapping) -> bool:
    if "stem" in tree:
        return True
    return any(_has_stem(sub) for sub in tree.values() if isinstance(sub, Mapping))
