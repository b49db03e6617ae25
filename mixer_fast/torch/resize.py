"""Fine-tuning at a new resolution: grow the token mixing of MLP-Mixer / ResMLP blocks and models.

With the patch size fixed, an image K times larger in each dimension has S' = K²·S tokens, so every
weight that acts along tokens must grow. The MLP-Mixer paper (Tolstikhin et al., 2021, Supplementary C,
"Fine-tuning: hyperparameters and higher image resolution") does it like this:

    "We increase the hidden width D_S of the token-mixing MLP by a factor of K² as well. [...] we split
    the input sequence into K² equal parts, each one of the original length S, and initialize the new
    MLP so that it processes all these parts independently in parallel with the pre-trained MLP. [...]
    Assume the token sequence for the resized input image is a concatenation of K² token sequences of
    length S each, computed by splitting the input into K×K equal parts spatially. We then initialize
    W'_1 with a block-diagonal matrix that has copies of W_1 on its main diagonal. Other parameters of
    the MLP are handled analogously."

``resize_token_mixing`` builds exactly that. Which S tokens form one group:

- For a whole model (or a block given ``old_size``, the grid it was trained on), the groups are the
  paper's "K×K equal parts spatially": spatially contiguous windows of the original grid size (H, W)
  tiling the new grid (K_h·H, K_w·W), each window's tokens in its own row-major order (= the order of
  the pre-trained model's tokens). The model's sequence is the row-major patch grid of the whole image,
  in which a window's tokens are not consecutive, so the weights are the block-diagonal matrix with its
  rows / columns along tokens permuted into that order (a "permuted block diagonal"): the S' × S' and
  D_S' × S' maps are ``P·blockdiag(W, …, W)`` etc. with P the window permutation. Consequence (tested):
  an image made of K_h × K_w tiles gives, in each window, exactly the pre-trained model's token
  features of that tile, and the average-pooled logits are the mean of the tiles' logits.
- For a bare block given a sequence length, the groups are k = S'/S consecutive runs of S tokens (the
  plain block diagonal): fed k stacked token tables (B, k·S, C) it returns the k stacked outputs.

Every weight and bias along tokens is expanded: Mixer ``mlp_tokens.fc1`` (D_S, S) → (k·D_S, S') and its
bias tiled k times, ``mlp_tokens.fc2`` (S, D_S) → (S', k·D_S) and its bias tiled k times (in window
order); ResMLP ``linear_tokens`` (S, S) → (S', S') block diagonal, bias tiled. Channel mixing, norms and
layer scales do not depend on S and are kept. The hidden width grows in proportion (D_S' = D_S·S'/S), so
to rebuild the resized architecture from its state dict with timm pass ``mlp_ratio=(k·r_tokens,
r_channels)`` (``(0.5·k, 4.0)`` for the Mixers) and the new ``img_size``; ResMLP needs only ``img_size``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

Tensor = torch.Tensor
Size = Union[int, Sequence[int]]

__all__ = ["resize_token_mixing"]


# ---------------------------------------------------------------------------------------------------------
# The plan: how many groups, and where each new token goes in the block-diagonal order.

@dataclass(frozen=True)
class _Plan:
    seq_len: int                          # S
    new_seq_len: int                      # S' = k·S
    k: int                                # number of groups (diagonal blocks)
    old_grid: Optional[Tuple[int, int]]   # (H, W), None for a plain sequence
    new_grid: Optional[Tuple[int, int]]   # (K_h·H, K_w·W)


def _pair_of_ints(name: str, v: object) -> Tuple[int, int]:
    if (not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in v)):
        raise ValueError(f"{name}: expected a grid (rows, cols) of two positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def _square_grid(seq_len: int) -> Optional[Tuple[int, int]]:
    side = math.isqrt(seq_len)
    return (side, side) if side * side == seq_len else None


def _make_plan(seq_len: int, new_size: Size, old_size: Optional[Sequence[int]],
               stem_grid: Optional[Tuple[int, int]]) -> _Plan:
    """Check ``new_size`` / ``old_size`` against the current sequence length S and return the plan."""
    old_grid = None
    if old_size is not None:
        old_grid = _pair_of_ints("old_size", old_size)
        if old_grid[0] * old_grid[1] != seq_len:
            raise ValueError(f"old_size: expected a grid of S={seq_len} tokens (the blocks' sequence length), "
                             f"got {old_grid} ({old_grid[0] * old_grid[1]} tokens)")
        if stem_grid is not None and old_grid != stem_grid:
            raise ValueError(f"old_size: expected the model's patch grid {stem_grid} (or None), got {old_grid}")
    old_grid = old_grid or stem_grid
    if isinstance(new_size, bool) or not isinstance(new_size, (int, Sequence)) or isinstance(new_size, str):
        raise TypeError(f"new_size: expected a sequence length (int) or a patch grid (rows, cols), "
                        f"got {type(new_size).__name__}")

    if isinstance(new_size, int):
        if new_size <= 0 or new_size % seq_len:
            raise ValueError(f"new_size: expected a positive multiple of the current sequence length "
                             f"S={seq_len}, got {new_size}")
        k = new_size // seq_len
        if old_grid is None:   # a bare block: k consecutive runs of S tokens
            return _Plan(seq_len, new_size, k, None, None)
        K = math.isqrt(k)
        if K * K != k:
            raise ValueError(f"new_size: expected K²·S = K²·{seq_len} tokens for an integer K (the grid "
                             f"{old_grid[0]}×{old_grid[1]} scaled by K in each dimension), got {new_size} = "
                             f"{k}·{seq_len}; pass the new grid (rows, cols) for other shapes")
        return _Plan(seq_len, new_size, k, old_grid, (K * old_grid[0], K * old_grid[1]))

    new_grid = _pair_of_ints("new_size", new_size)
    if old_grid is None:
        old_grid = _square_grid(seq_len)
        if old_grid is None:
            raise ValueError(f"old_size: expected the block's grid (rows, cols) with rows·cols = S={seq_len}: "
                             f"new_size is a grid and S is not a square, got None")
    if new_grid[0] % old_grid[0] or new_grid[1] % old_grid[1]:
        raise ValueError(f"new_size: expected a grid whose rows are a multiple of {old_grid[0]} and cols a "
                         f"multiple of {old_grid[1]} (the current grid {old_grid}), got {new_grid}")
    k = (new_grid[0] // old_grid[0]) * (new_grid[1] // old_grid[1])
    return _Plan(seq_len, new_grid[0] * new_grid[1], k, old_grid, new_grid)


def _window_index(plan: _Plan, device: torch.device) -> Optional[Tensor]:
    """(S',) long: for each token of the new row-major grid, its position in the block-diagonal order
    (window w = (r // H)·K_w + c // W, then the window's own row-major index). None when that is the
    identity (a plain sequence, or windows that are whole row bands)."""
    if plan.old_grid is None or plan.new_grid[1] == plan.old_grid[1]:
        return None
    (H, W), (Hn, Wn) = plan.old_grid, plan.new_grid
    r = torch.arange(Hn, device=device).view(-1, 1)
    c = torch.arange(Wn, device=device).view(1, -1)
    window = (r // H) * (Wn // W) + c // W
    return (window * (H * W) + (r % H) * W + c % W).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# Finding blocks and the stem.

def _token_mlp(block: nn.Module) -> Optional[Tuple[nn.Linear, nn.Linear]]:
    mlp = getattr(block, "mlp_tokens", None)
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
        return fc1, fc2
    return None


def _kind(module: nn.Module) -> Optional[str]:
    """"mixer" (``mlp_tokens.fc1/fc2``), "resmlp" (``linear_tokens``) or None."""
    if _token_mlp(module) is not None:
        return "mixer"
    if isinstance(getattr(module, "linear_tokens", None), nn.Linear):
        return "resmlp"
    return None


def _seq_len(name: str, block: nn.Module, kind: str) -> int:
    """The block's S, after checking that its token weights can be expanded exactly."""
    where = name or "<module>"
    if kind == "resmlp":
        lin = block.linear_tokens
        if lin.in_features != lin.out_features:
            raise ValueError(f"{where}.linear_tokens: expected a square Linear(S, S), "
                             f"got Linear({lin.in_features}, {lin.out_features})")
        return lin.in_features
    fc1, fc2 = _token_mlp(block)
    if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
        raise ValueError(f"{where}.mlp_tokens: expected fc1 Linear(S, D_S) and fc2 Linear(D_S, S) (GLU token "
                         f"MLPs are not supported), got Linear({fc1.in_features}, {fc1.out_features}) and "
                         f"Linear({fc2.in_features}, {fc2.out_features})")
    norm = getattr(block.mlp_tokens, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"{where}.mlp_tokens.norm: expected nn.Identity (a norm over the hidden units would mix "
                         f"the groups), got {type(norm).__name__}")
    return fc1.in_features


def _stem(module: nn.Module) -> Optional[nn.Module]:
    """The patch stem (timm / mixer_fast.reference ``PatchEmbed``: ``img_size``, ``patch_size``, ``grid_size``,
    ``num_patches``) with a fixed grid, if the module has exactly one; ValueError for several."""
    stems = [(n, m) for n, m in module.named_modules()
             if all(hasattr(m, a) for a in ("img_size", "patch_size", "grid_size", "num_patches"))
             and m.grid_size is not None]
    if len(stems) > 1:
        raise ValueError(f"module: expected at most one patch stem, got {len(stems)} "
                         f"({', '.join(n for n, _ in stems)})")
    return stems[0][1] if stems else None


# ---------------------------------------------------------------------------------------------------------
# Expanding the weights.

def _expand(w: Tensor, k: int, index: Optional[Tensor], token_dims: Tuple[int, ...]) -> Tensor:
    """blockdiag(w, …, w) (k copies; a 1-D w is tiled), its ``token_dims`` permuted by ``index``."""
    out = torch.block_diag(*([w] * k)) if w.ndim == 2 else w.repeat(k)
    if index is not None:
        for d in token_dims:
            out = out.index_select(d, index)
    return out


def _set(linear: nn.Linear, name: str, value: Optional[Tensor]) -> None:
    old = getattr(linear, name)
    if old is not None:
        setattr(linear, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _resize_block(block: nn.Module, kind: str, plan: _Plan) -> None:
    k = plan.k
    with torch.no_grad():
        if kind == "mixer":
            fc1, fc2 = _token_mlp(block)
            index = _window_index(plan, fc1.weight.device)
            _set(fc1, "weight", _expand(fc1.weight, k, index, (1,)))     # (D_S, S) -> (k·D_S, S')
            _set(fc1, "bias", None if fc1.bias is None else _expand(fc1.bias, k, None, ()))
            _set(fc2, "weight", _expand(fc2.weight, k, index, (0,)))     # (S, D_S) -> (S', k·D_S)
            _set(fc2, "bias", None if fc2.bias is None else _expand(fc2.bias, k, index, (0,)))
            fc1.in_features, fc1.out_features = plan.new_seq_len, k * fc1.out_features
            fc2.in_features, fc2.out_features = fc1.out_features, plan.new_seq_len
        else:
            lin = block.linear_tokens
            index = _window_index(plan, lin.weight.device)
            _set(lin, "weight", _expand(lin.weight, k, index, (0, 1)))  # (S, S) -> (S', S')
            _set(lin, "bias", None if lin.bias is None else _expand(lin.bias, k, index, (0,)))
            lin.in_features = lin.out_features = plan.new_seq_len
    if hasattr(block, "seq_len"):   # mixer_fast's fused blocks check inputs against it
        block.seq_len = plan.new_seq_len


def _resize_stem(stem: nn.Module, grid: Tuple[int, int]) -> None:
    ph, pw = stem.patch_size if isinstance(stem.patch_size, (tuple, list)) else (stem.patch_size,) * 2
    img_size = (grid[0] * ph, grid[1] * pw)
    if callable(getattr(stem, "set_input_size", None)):   # timm's PatchEmbed
        stem.set_input_size(img_size=img_size)
    else:                                                  # mixer_fast.reference.PatchEmbed
        stem.img_size, stem.grid_size, stem.num_patches = img_size, tuple(grid), grid[0] * grid[1]


# ---------------------------------------------------------------------------------------------------------

def resize_token_mixing(module: nn.Module, new_size: Size, *, old_size: Optional[Sequence[int]] = None,
                        inplace: bool = False) -> nn.Module:
    """A copy of ``module`` whose token mixing runs on a longer sequence, initialised block-diagonally with
    copies of the trained weights (the MLP-Mixer paper's fine-tuning at a higher resolution; see the module
    docstring for the paper's words and the token grouping).

    ``module``: a block (timm ``MixerBlock`` / ``ResBlock``, ``mixer_fast.MixerBlock`` / ``ResMLPBlock``,
    ``mixer_fast.reference`` blocks) or a model holding them (timm ``MlpMixer`` incl. ``resmlp_*``,
    ``mixer_fast.reference.MlpMixer`` / ``ResMLP``). Every block is resized; a model's patch stem gets the
    new image size (grid × patch size), so the returned model takes (B, C, rows·P, cols·P) images.

    ``new_size``:

    - a patch grid ``(rows, cols)``: rows / cols multiples K_h / K_w of the current grid (H, W); the
      S' = rows·cols tokens form k = K_h·K_w spatial windows of H×W patches. The current grid is the
      stem's for a model; for a bare block ``old_size``, else the square (√S, √S).
    - a sequence length S' (int): for a model or a block with ``old_size``, S' must be K²·S and the grid
      becomes (K·H, K·W); for a bare block without ``old_size``, S' = k·S and the groups are k consecutive
      runs of S tokens, so the block maps k stacked token tables (B, k·S, C) to the k stacked outputs.

    Shapes, with k = S'/S: Mixer ``mlp_tokens.fc1.weight`` (D_S, S) → (k·D_S, S'), ``fc1.bias`` (D_S,) →
    (k·D_S,) tiled; ``fc2.weight`` (S, D_S) → (S', k·D_S), ``fc2.bias`` (S,) → (S',) tiled; ResMLP
    ``linear_tokens.weight`` (S, S) → (S', S'), ``bias`` (S,) → (S',) tiled. Inputs / outputs of a block
    become (B, S', C). Everything else (parameter names, channel mixing, norms, dtype, device,
    ``requires_grad``, training mode) is kept.

    Returns a new module and leaves ``module`` untouched (like timm's ``resample_abs_pos_embed``);
    ``inplace=True`` resizes ``module`` itself and returns it (its token-mixing Parameters are replaced:
    build the optimizer after resizing). Arguments are all checked before anything is changed.

    Raises ValueError (naming the argument, expected vs given) when ``new_size`` is not a multiple of the
    current sequence length / grid, ``old_size`` does not match, or ``module`` holds no block to resize
    (or blocks of different sequence lengths); TypeError for a non-Module or a ``new_size`` of another type.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    blocks: List[Tuple[str, nn.Module, str]] = [(n, m, _kind(m)) for n, m in module.named_modules()
                                                if _kind(m) is not None]
    if not blocks:
        raise ValueError(f"module: expected an MLP-Mixer / ResMLP block (mlp_tokens.fc1/fc2 or linear_tokens) or "
                         f"a model containing them, got {type(module).__name__} without any")
    seq_lens = {_seq_len(n, m, kind) for n, m, kind in blocks}
    if len(seq_lens) != 1:
        raise ValueError(f"module: expected blocks of one sequence length, got {sorted(seq_lens)}")
    seq_len = seq_lens.pop()
    stem = _stem(module)
    stem_grid = None
    if stem is not None:
        stem_grid = tuple(int(g) for g in stem.grid_size)
        if stem_grid[0] * stem_grid[1] != seq_len:
            raise ValueError(f"module: expected the stem's grid {stem_grid} to hold the blocks' S={seq_len} tokens, "
                             f"got {stem_grid[0] * stem_grid[1]}")
    plan = _make_plan(seq_len, new_size, old_size, stem_grid)

    target = module if inplace else copy.deepcopy(module)
    for name, _, kind in blocks:
        _resize_block(target.get_submodule(name), kind, plan)
    if stem is not None:
        stem_name = next(n for n, m in module.named_modules() if m is stem)
        _resize_stem(target.get_submodule(stem_name), plan.new_grid)
    return target
