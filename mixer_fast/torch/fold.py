"""ResMLP inference folding: ``fold_for_inference(model)`` folds each ResMLP block's Affine "norms" and
layer scales into its linear layers, for inference. Same outputs (to rounding), fewer passes.

A ResMLP block (timm ``ResBlock``; x: (B, S, C), Affine ``α, β`` (C,), layer scales ``ls`` (C,),
``linear_tokens`` W_t (S, S) + b_t (S,), ``mlp_channels`` fc1 (D, C) + b1 (D,), fc2 (C, D) + b2 (C,))::

    x1 = x  + ls1 ⊙ (W_t · (α1 ⊙ x + β1) + b_t 1ᵀ)            # per image; ⊙ broadcasts along channels
    x2 = x1 + ls2 ⊙ (fc2 · GELU(fc1 · (α2 ⊙ x1 + β2) + b1) + b2)

Token branch. A per-channel factor commutes with token mixing (W_t acts on the S axis, α1 on the C
axis), so with r = W_t · 1 (the row sums of W_t, (S,)):

    ls1 ⊙ (W_t · (α1 ⊙ x + β1) + b_t 1ᵀ) = (W_t · x) ⊙ s + Bias,
    s = ls1 ⊙ α1  (C,),     Bias = r (ls1 ⊙ β1)ᵀ + b_t ls1ᵀ  (S, C), rank ≤ 2.

α1 cannot move into W_t (one matrix for all channels) and ls1 cannot either, so one per-channel scale
stays, and the bias becomes an S × C matrix. The fused ops take only an (S,) bias, so where the channel
op runs on ``reference`` (eager) the token branch runs in this form: one batched GEMM ``W_t @ x`` with no
transposes, then ``addcmul(Bias, ·, s)`` and the residual add, two elementwise passes instead of the
unfolded branch's six (affine ×2, transpose copy, bias, scale, residual). The fused backends (``cpu``,
``triton``) already apply the Affine and ls1 while loading and storing tiles, in one pass; an (S, C) bias
would cost them one more, so there the token branch stays unfolded (``ops.token_mixing``).

Channel branch. fc1 · (α2 ⊙ x + β2) + b1 = (fc1 · diag α2) · x + (fc1 · β2 + b1), and
ls2 ⊙ (fc2 · h + b2) = (diag ls2 · fc2) · h + ls2 ⊙ b2: both fold exactly, leaving ``ops.channel_mixing``
with no norm and no scale (``norm="affine"`` with weight and bias None) on every backend:

    fc1' = fc1 · diag α2,   b1' = b1 + fc1 · β2,   fc2' = diag ls2 · fc2,   b2' = ls2 ⊙ b2.

The folded values are computed in float64 and rounded once to the parameters' dtype. MLP-Mixer blocks are
left alone: LayerNorm normalises each token by its own statistics, so it cannot fold into a linear layer.

Folding is for inference: the folded block has no dropout or drop path (eval semantics), its parameters
do not require gradients, and its forward refuses training mode; ``fold_for_inference`` refuses a model in
training mode (call ``model.eval()`` first).
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..reference import modules as ref
from . import checks, ops
from .blocks import ResMLPBlock, _check_backend, _check_x, _positive_int
from .ops import _choice

Tensor = torch.Tensor

__all__ = ["fold_for_inference", "FoldedResMLPBlock"]


def _fold_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64: fold in float32 there.
    return torch.float32 if device.type == "mps" else torch.float64


class FoldedResMLPBlock(nn.Module):
    """An inference-only ResMLP block with its Affine norms and layer scales folded away. (B, S, C) → (B, S, C).

    ``forward(x) = y + fc2' · GELU(fc1' · y + b1') + b2'`` (``mixer_fast.ops.channel_mixing`` with no norm and
    no scale) after the token branch ``y``, both on ``backend`` (None: ``MIXER_FAST_BACKEND``, else the best
    one for the input, as the blocks' ``backend``). The token branch depends on the backend chosen:

    - ``reference`` (eager): the folded form ``y = x + (W_t @ x) ⊙ token_scale_folded + token_bias_folded``,
      one batched GEMM along tokens (no transposes) and two elementwise passes;
    - a fused backend (``cpu``, ``triton``): ``ops.token_mixing`` with the unfolded Affine and layer scale,
      which it applies while loading and storing tiles (one pass already; its bias is (S,), so the folded
      (S, C) bias would cost it a pass).

    Measured (bench/test_fold.py, ResMLP-12): the folded block runs 7 ATen kernels instead of 14 on
    ``reference``, a few per cent faster; on ``cpu`` it is at parity (nothing left to fold there).

    Parameters (no gradients): token_norm_weight α1 (C,), token_norm_bias β1 (C,), token_weight W_t (S, S),
    token_bias b_t (S,), token_scale ls1 (C,), fc1_weight (D, C), fc1_bias (D,), fc2_weight (C, D),
    fc2_bias (C,); buffers token_scale_folded (C,), token_bias_folded (S, C). Build one with
    :meth:`from_block` or :func:`fold_for_inference`; ``FoldedResMLPBlock(dim, seq_len, hidden)`` makes an
    empty one to load a folded state dict into.
    """

    def __init__(self, dim: int, seq_len: int, hidden: int, *, approximate: str = "none",
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        C, S, D = (_positive_int(n, v) for n, v in (("dim", dim), ("seq_len", seq_len), ("hidden", hidden)))
        dd = {"device": device, "dtype": dtype}
        for name, shape in (("token_norm_weight", (C,)), ("token_norm_bias", (C,)), ("token_weight", (S, S)),
                            ("token_bias", (S,)), ("token_scale", (C,)), ("fc1_weight", (D, C)),
                            ("fc1_bias", (D,)), ("fc2_weight", (C, D)), ("fc2_bias", (C,))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **dd), requires_grad=False))
        self.register_buffer("token_scale_folded", torch.empty(C, **dd))
        self.register_buffer("token_bias_folded", torch.empty(S, C, **dd))
        self.dim, self.seq_len, self.hidden = C, S, D
        self.approximate = checks.choice("approximate", approximate, checks.APPROXIMATIONS)
        self.backend = _check_backend(backend)
        self.eval()

    @classmethod
    @torch.no_grad()
    def from_block(cls, block: nn.Module, *, backend: Optional[str] = None) -> "FoldedResMLPBlock":
        """The folded form of a ResMLP block (timm ``ResBlock``, ``mixer_fast.ResMLPBlock`` or
        ``mixer_fast.reference.ResMLPBlock``). ValueError naming the part if the block is built from layers
        the fused ops cannot express (as ``mixer_fast.convert``); ``block`` itself is not changed.
        ``backend=None`` keeps a ``mixer_fast.ResMLPBlock``'s own backend (automatic for the others)."""
        if isinstance(block, FoldedResMLPBlock):
            raise ValueError("block: already folded")
        fused = block if isinstance(block, ResMLPBlock) else ResMLPBlock.from_module(block)
        if backend is None:
            backend = getattr(block, "backend", None) if isinstance(block, ResMLPBlock) else None
        ch = fused.mlp_channels
        w = fused.linear_tokens.weight
        dtype, device = w.dtype, w.device
        f = _fold_dtype(device)
        C, S, D = fused.dim, fused.seq_len, ch.fc1.out_features

        def d(t: Optional[Tensor], n: int) -> Tensor:
            return torch.zeros(n, dtype=f, device=device) if t is None else t.detach().reshape(-1).to(f)

        a1, b1n, a2, b2n = (d(p, C) for p in (fused.norm1.alpha, fused.norm1.beta, fused.norm2.alpha,
                                               fused.norm2.beta))
        ls1, ls2 = d(fused.ls1, C), d(fused.ls2, C)
        wt, bt = w.detach().to(f), d(fused.linear_tokens.bias, S)
        w1, w2 = ch.fc1.weight.detach().to(f), ch.fc2.weight.detach().to(f)
        c1, c2 = d(ch.fc1.bias, D), d(ch.fc2.bias, C)
        values = {
            "token_norm_weight": a1, "token_norm_bias": b1n, "token_weight": wt, "token_bias": bt,
            "token_scale": ls1,
            "token_scale_folded": ls1 * a1,                                         # ls1 ⊙ α1
            # r (ls1 ⊙ β1)ᵀ + b_t ls1ᵀ, r = W_t · 1
            "token_bias_folded": torch.outer(wt.sum(1), ls1 * b1n) + torch.outer(bt, ls1),
            "fc1_weight": w1 * a2,                                                  # fc1 · diag α2
            "fc1_bias": c1 + w1 @ b2n,                                              # b1 + fc1 · β2
            "fc2_weight": w2 * ls2[:, None],                                        # diag ls2 · fc2
            "fc2_bias": ls2 * c2,                                                   # ls2 ⊙ b2
        }
        new = cls(C, S, D, approximate=ch.act.approximate, backend=backend, device=device, dtype=dtype)
        tensors = dict(new.named_parameters(), **dict(new.named_buffers()))
        for name, value in values.items():
            tensors[name].copy_(value)  # rounded once to the block's dtype
        return new

    def forward(self, x: Tensor) -> Tensor:
        _check_x(self, x)
        if self.training:
            raise RuntimeError("FoldedResMLPBlock is inference-only (no dropout or drop path, folded parameters "
                               "do not train like the originals): call .eval(), or fold after training")
        w = self.token_weight
        if x.device != w.device:
            raise ValueError(f"x: expected a tensor on {w.device} (the folded block's device), got one on {x.device}")
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != w.dtype and not autocast:
            raise TypeError(f"x: expected dtype {w.dtype} (the folded block's dtype), got {x.dtype}")
        # The backend the ops will choose picks the token path; the ops are still given self.backend and
        # choose for themselves (they also account for torch.func transforms).
        chosen = _choice("token_mixing", x, self.backend,
                         (str(x.dtype).replace("torch.", ""),) + ("autocast",) * autocast, (x,))
        backend = self.backend
        if chosen == "reference":
            # One batched GEMM along tokens (W_t @ x, no transposes), then the folded scale and bias and the
            # residual.
            y = torch.addcmul(self.token_bias_folded, torch.matmul(w, x), self.token_scale_folded).add_(x)
        else:
            y = ops.token_mixing(x, self.token_norm_weight, self.token_norm_bias, w, self.token_bias, None, None,
                                 norm="affine", scale=self.token_scale, backend=backend)
        return ops.channel_mixing(y, None, None, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias,
                                  norm="affine", approximate=self.approximate, backend=backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, seq_len={self.seq_len}, hidden={self.hidden}, approximate={self.approximate!r}, "
                f"backend={self.backend!r}")


def _sources() -> Tuple[type, ...]:
    """The block classes that fold: the reference and fused ResMLP blocks, and timm's ResBlock if timm is
    already imported (a model holding timm blocks has imported it; this never imports timm itself)."""
    classes: List[type] = [ref.ResMLPBlock, ResMLPBlock]
    timm_mixer = sys.modules.get("timm.models.mlp_mixer")
    if timm_mixer is not None:
        classes.append(timm_mixer.ResBlock)
    return tuple(classes)


def fold_for_inference(model: nn.Module, *, backend: Optional[str] = None, inplace: bool = False,
                       strict: bool = False) -> nn.Module:
    """Fold every ResMLP block of ``model`` for inference: Affine norms and layer scales go into the
    neighbouring linear layers (maths in this module's docstring). Same outputs to rounding, fewer passes.

    Args:
        model: a module in eval mode: a ResMLP block (timm ``ResBlock``, ``mixer_fast.ResMLPBlock``,
            ``mixer_fast.reference.ResMLPBlock``) or a model holding them (timm ``resmlp_*``,
            ``mixer_fast.reference.ResMLP``, a converted model). Input and output shapes are unchanged:
            a block still maps (B, S, C) → (B, S, C).
        backend: the backend of the folded blocks' ops (as the blocks' ``backend``); None keeps a
            ``mixer_fast.ResMLPBlock``'s own, else ``MIXER_FAST_BACKEND`` / the best available. Given, it is
            also set on blocks already folded.
        inplace: replace the blocks in ``model`` itself (the replaced blocks' parameters are dropped) and
            return it; by default ``model`` is left untouched and a copy is returned (folded blocks are new
            tensors, the rest is deep-copied).
        strict: raise ValueError for a ResMLP block that cannot be folded (a subclass with its own forward,
            a non-GELU activation, a norm other than Affine, …) instead of leaving it unfolded with a warning.

    Returns the folded model (a ``FoldedResMLPBlock`` when ``model`` is itself a block). MLP-Mixer blocks
    (LayerNorm) and every other module are kept as they are; hooks on a replaced block are not carried over.

    Raises TypeError for a non-module, ValueError for a model (or one of its ResMLP blocks) in training
    mode: folding is for inference.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    _check_backend(backend)
    sources = _sources()
    plan: Dict[str, Tuple[nn.Module, Optional[FoldedResMLPBlock]]] = {}
    failures: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FoldedResMLPBlock):
            plan[name] = (module, None)
            continue
        base = next((c for c in sources if isinstance(module, c)), None)
        if base is None:
            continue
        if module.training or model.training:
            raise ValueError(f"model: expected eval mode, got {name or 'the model'} in training mode: folding is "
                             "for inference (call model.eval() first)")
        if type(module).forward is not base.forward:
            failures.append(f"{name or '<model>'} ({type(module).__name__}): its class overrides forward()")
            continue
        try:
            plan[name] = (module, FoldedResMLPBlock.from_block(module, backend=backend))
        except ValueError as e:
            failures.append(f"{name or '<model>'} ({type(module).__name__}): {e}")
    if failures:
        message = f"fold_for_inference: {len(failures)} ResMLP block(s) left unfolded: " + "; ".join(failures)
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    if not plan and not failures:
        warnings.warn(f"fold_for_inference: no ResMLP block in {type(model).__name__}; nothing folded "
                      "(MLP-Mixer blocks cannot fold)", stacklevel=2)
    if "" in plan:  # the model is itself a block
        old, new = plan[""]
        if new is None:
            if backend is not None:
                old = old if inplace else copy.deepcopy(old)
                old.backend = backend
            return old
        return new
    if not inplace:
        # Deep-copy everything but the replaced blocks (their folded replacements are new already).
        memo = {id(old): new for old, new in plan.values() if new is not None}
        copied = copy.deepcopy(model, memo)
        if backend is not None:
            for name, (old, new) in plan.items():
                if new is None:
                    copied.get_submodule(name).backend = backend
        return copied
    for name, (old, new) in plan.items():
        if new is None:
            if backend is not None:
                old.backend = backend
            continue
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent)._modules[child] = new
    return model
