"""The ``cpu`` torch backend: the fused C++ kernels of csrc/ (``mixer_fast._C``) on CPU tensors.

Forward: one fused kernel per op (float32 and bfloat16; AVX-512 / AVX2 / portable micro-kernels chosen at
run time), on ``torch.get_num_threads()`` threads, the GIL released. Backward: the reference ops
recomputed under autograd from the saved inputs (correct gradients for every argument; not fused yet).
Results do not depend on the thread count: no sum is split across threads.
"""
from __future__ import annotations

import importlib.resources
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..dispatch import BackendUnavailable
from ..reference import functional

Tensor = torch.Tensor


def _extension():
    try:
        from .. import _C
    except ImportError as e:
        try:
            why = importlib.resources.files("mixer_fast").joinpath("_C_build_error.txt").read_text().strip()
        except (FileNotFoundError, OSError):
            why = str(e)
        raise BackendUnavailable(f"the C++ extension mixer_fast._C is not built ({why}); reinstall with a C++17 "
                                 "compiler and pybind11") from None
    return _C


def load() -> SimpleNamespace:
    _C = _extension()
    return SimpleNamespace(name="cpu", features=frozenset({"deterministic", "float32", "bfloat16"}),
                           detail=f"fused C++ kernels ({_C.isa()} micro-kernels; backward via the reference)",
                           token_mixing=token_mixing, channel_mixing=channel_mixing)


def _ref(t: Optional[Tensor]) -> Optional[Tuple[int, str, Tuple[int, ...], Tuple[int, ...]]]:
    if t is None:
        return None
    return t.data_ptr(), str(t.dtype).replace("torch.", ""), tuple(t.shape), tuple(t.stride())


def forward(op: str, x: Tensor, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps: float,
            approximate: str, norm: str, scale, sample_scale, reference: bool = False) -> Tensor:
    """The C++ forward (``reference=True``: its plain-loop oracle). x (B, S, C) with any strides; parameters
    are made contiguous (a no-op for module parameters); sample_scale is passed as fp32."""
    _C = _extension()
    if x.device.type != "cpu":
        raise ValueError(f"x: the cpu backend runs on CPU tensors, got one on {x.device}")
    out = torch.empty(x.shape, dtype=x.dtype)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    ss = None if sample_scale is None else sample_scale.detach().to(torch.float32).contiguous()
    params = [c(t) for t in (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale)]
    _C.forward(op, _ref(x), _ref(out), *map(_ref, params[:6]), _ref(params[6]), _ref(ss), float(eps),
               norm == "layernorm", approximate == "tanh", torch.get_num_threads(), reference)
    return out


class _Op(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, kw, *args):
        ctx.op, ctx.kw = op, kw
        ctx.present = [a is not None for a in args]
        ctx.save_for_backward(*(a for a in args if a is not None))
        return forward(op, *args[:7], scale=args[7], sample_scale=args[8], **kw)

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if p else None for p in ctx.present]
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(n) if a is not None else None for a, n in zip(args, needs)]
            fn = functional.token_mixing if ctx.op == "token_mixing" else functional.channel_mixing
            out = fn(*leaves[:7], scale=leaves[7], sample_scale=leaves[8], **ctx.kw)
            wanted = [a for a, n in zip(leaves, needs) if a is not None and n]
            got = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (None, None, *(next(got) if a is not None and n else None for a, n in zip(leaves, needs)))


def _call(op: str, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate, norm,
          scale, sample_scale, dropout) -> Tensor:
    if dropout:
        raise NotImplementedError("dropout: the cpu backend has no training dropout; use backend='reference'")
    kw = dict(eps=eps, approximate=approximate, norm=norm)
    return _Op.apply(op, kw, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale,
                     sample_scale)


def token_mixing(*args, **kw) -> Tensor:
    return _call("token_mixing", *args, **kw)


def channel_mixing(*args, **kw) -> Tensor:
    return _call("channel_mixing", *args, **kw)
