"""The ``cpu`` torch backend: the fused C++ kernels of csrc/ (``mixer_fast._C``) on CPU tensors.

Inference (no input needs a gradient, or grad mode is off): one fused kernel per op (float32 and bfloat16;
AVX-512 / AVX2 / portable micro-kernels chosen at run time; bf16 by AVX512-BF16 dot products where the CPU
has them), on ``torch.get_num_threads()`` threads, the GIL
released. Results do not depend on the thread count: no sum is split across threads.

Training (a gradient is needed), torch.func transforms and forward-mode AD: the reference ops, so forward
and backward run exactly as eager PyTorch. The kernels have no backward of their own yet; a fused forward followed by a backward that
recomputes the reference forward would cost one forward more than eager.

Chosen automatically only where the table of measured wins (mixer_fast/wins.py) shows it faster than eager
for that op, mode, dtype and CPU class: bf16 inference on AVX2 CPUs without native bf16 matmuls (eager's
bf16 GEMMs are slow there; these kernels widen bf16 to fp32 and run fp32 FMAs) and, at parity, on AVX512-BF16
CPUs (bench/NOTES.md).
"""
from __future__ import annotations

import importlib.resources
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..dispatch import BackendUnavailable
from ..reference import functional
from .checks import TRANSFORMS, under_transform

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
    from .. import wins

    features = frozenset({"deterministic", "float32", "bfloat16", TRANSFORMS})
    cls = wins.cpu_class(_C.isa(), _C.native_bf16_matmul())
    chosen = wins.describe(wins.wins_for("torch", "cpu")).get(cls)
    auto = f"chosen automatically on this {cls} CPU for {', '.join(chosen)}" if chosen else (
        f"not chosen automatically on this {cls} CPU: no measured win over the reference")
    bf16 = "by AVX512-BF16 dot products" if _C.isa() == "avx512_bf16" else "via fp32 FMAs"
    return SimpleNamespace(name="cpu", features=features, device_class=lambda device_index=None: cls,
                           detail=f"fused C++ kernels ({_C.isa()} micro-kernels, bf16 {bf16}; training runs the "
                                  f"reference ops; {auto})",
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


# The inference path as a torch.library custom op: torch.compile treats it as one opaque node (the raw
# pointers and torch.get_num_threads() inside would otherwise break the graph).
@torch.library.custom_op("mixer_fast::cpu_mixing", mutates_args=())
def _cpu_mixing(op: str, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
                fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
                scale: Optional[Tensor], sample_scale: Optional[Tensor], eps: float, approximate: str,
                norm: str) -> Tensor:
    return forward(op, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps,
                   approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale)


@_cpu_mixing.register_fake
def _(op, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, sample_scale, eps,
      approximate, norm):
    return x.new_empty(x.shape)


def _call(op: str, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate, norm,
          scale, sample_scale, dropout) -> Tensor:
    if dropout:
        raise NotImplementedError("dropout: the cpu backend has no training dropout; use backend='reference'")
    args = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    tensors = (*args, scale, sample_scale)
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) \
            or under_transform(*tensors):
        return getattr(functional, op)(*args, eps=eps, approximate=approximate, norm=norm, scale=scale,
                                       sample_scale=sample_scale)
    if torch.compiler.is_compiling():
        return _cpu_mixing(op, *args, scale, sample_scale, eps, approximate, norm)
    # Eager calls skip the custom op's dispatch: it cost 0.1-0.2 ms a call here (a batch-1 ResMLP-12 block
    # is 5 ms).
    return forward(op, *args, eps=eps, approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale)


def token_mixing(*args, **kw) -> Tensor:
    return _call("token_mixing", *args, **kw)


def channel_mixing(*args, **kw) -> Tensor:
    return _call("channel_mixing", *args, **kw)
