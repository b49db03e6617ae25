"""The ``triton`` torch backend: the fused Triton kernels as torch.library custom ops with autograd.

Each op is a forward and a backward custom op (``mixer_fast::*``), so ``torch.compile(fullgraph=True)``
traces a model of mixer_fast blocks without a graph break and CUDA graphs can capture them. Tensors
the backward needs (LayerNorm statistics, the channel-mixing pre-activation, the branch when a layer
scale is learned) travel as extra outputs of the forward op; the token-mixing hidden activations are
never kept. No reduction uses atomics, so results are deterministic run to run.

On a machine without a CUDA device the kernels run in Triton's interpreter on CPU tensors, which
must be enabled before triton is first imported in the process; ``load()`` does that, or says why
it cannot. FP32 matmuls are exact (no TF32) unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import contextlib
import os
import sys
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch

from ..dispatch import BackendUnavailable

Tensor = torch.Tensor


def load() -> SimpleNamespace:
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailable(
                "no CUDA device, and triton was imported before mixer_fast could enable Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing triton or torch.compile to use it)")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e})") from None
    from ..kernels.triton import _launch, toolchain

    problem = _launch.interpreter_problem()
    if problem:
        raise BackendUnavailable(problem)
    if _launch.INTERPRET:
        detail = "Triton's interpreter on CPU tensors (no CUDA device; for testing, slow)"
    else:
        # Before any kernel compiles: a ptxas known to miscompile these kernels is never used (toolchain.py),
        # on any visible GPU (one assembler serves the process); the current device's choice is reported.
        current = torch.cuda.current_device()
        devices = sorted(range(torch.cuda.device_count()), key=lambda i: i == current)
        try:
            for index in devices:
                major, minor = torch.cuda.get_device_capability(index)
                ptxas = toolchain.apply(major * 10 + minor)
        except toolchain.ToolchainProblem as e:
            raise BackendUnavailable(f"on {torch.cuda.get_device_name(index)}: {e}") from None
        detail = (f"compiled Triton kernels on {torch.cuda.get_device_name()}; ptxas {ptxas.version_text} "
                  f"({ptxas.source}: {ptxas.why})")
    return SimpleNamespace(name="triton", features=frozenset({"deterministic", "autocast", "float32", "bfloat16",
                                                              "float16", "spatial_gating"}), detail=detail,
                           device_class=device_class, token_mixing=token_mixing, channel_mixing=channel_mixing,
                           spatial_gating=spatial_gating)


def device_class(device_index: Optional[int] = None) -> str:
    """The wins table's key for CUDA device ``device_index``: its compute capability (``sm_90``); in the
    interpreter, ``interpreter`` (never measured: it is for testing)."""
    from .. import wins
    from ..kernels.triton import _launch

    if _launch.INTERPRET:
        return "interpreter"
    return wins.cuda_class(torch.cuda.get_device_capability(device_index))


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Around every launch of an op: t's CUDA device made current. Triton launches on the current device and
    its stream, whatever device the pointers live on, so an op on cuda:1 called while cuda:0 is current
    would run on the wrong GPU (an illegal-address fault, or peer reads); torch's own ops, cuBLAS included,
    follow the tensor. Nothing on a CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 and t.dim() == 1 and t.shape[0] == 0 else t


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """t, or a fresh empty tensor standing for None (custom ops return no None, and no two outputs may alias)."""
    return t if t is not None else like.new_empty((0,), dtype=dtype or like.dtype)


def _fake_grads(x: Tensor, *params: Optional[Tensor]) -> List[Tensor]:
    """The backward ops' outputs under FakeTensor tracing: one per input of the op, empty for None."""
    return [torch.empty_like(t) if t is not None else _empty(x) for t in (x, *params)]


def _grads_in(grads: List[Tensor], inputs: Tuple[Optional[Tensor], ...]) -> List[Optional[Tensor]]:
    """The backward op's outputs as autograd wants them: None for absent inputs and empty placeholders."""
    return [_none(g) if t is not None else None for g, t in zip(grads, inputs)]


def _allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _no_double_backward(ctx, *grads):
    # Without this, autograd's own error names an internal op and says to register a formula.
    raise NotImplementedError("double backward: the triton backend's backward is not differentiable (a gradient "
                              "taken with create_graph=True cannot be differentiated again); use "
                              "backend='reference' for higher-order gradients")


# The custom ops are defined at import (dispatch imports this module only to load the backend). Each imports
# its kernels when first called: triton must not load before load() has chosen the interpreter or compiled
# kernels, and a ptxas, for this process.
_GRAD_NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "scale")


def _grads_out(g, params: Tuple[Optional[Tensor], ...], x: Tensor, names=_GRAD_NAMES) -> List[Tensor]:
    # Parameter gradients come back in fp32 and are cast to each parameter's dtype.
    out = []
    for name, p in zip(names, (x, *params)):
        v = g.get(name)
        out.append(_empty(x) if v is None or p is None else v.to(p.dtype))
    return out


# ------------------------------------------------------------------ token mixing
@torch.library.custom_op("mixer_fast::token_mixing_fwd", mutates_args=())
def token_mixing_fwd(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
                     fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
                     scale: Optional[Tensor], sample_scale: Optional[Tensor], eps: float, approximate: str, norm: str,
                     store_branch: bool, allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.triton.token_mixing import token_mixing_forward

    with _on_device(x):
        out, mean, rstd, branch = token_mixing_forward(
            x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps, approximate=approximate,
            norm=norm, scale=scale, sample_scale=sample_scale, store_branch=store_branch, allow_tf32=allow_tf32)
        return out, _or_empty(mean, x, torch.float32), _or_empty(rstd, x, torch.float32), _or_empty(branch, x)


@token_mixing_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, sample_scale, eps,
      approximate, norm, store_branch, allow_tf32):
    B, S, C = x.shape
    stats = (B * S,) if norm == "layernorm" else (0,)
    return (x.new_empty((B, S, C)), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32), x.new_empty((B, S, C) if store_branch else (0,)))


@torch.library.custom_op("mixer_fast::token_mixing_bwd", mutates_args=())
def token_mixing_bwd(dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                     fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor],
                     fc2_bias: Optional[Tensor], scale: Optional[Tensor], sample_scale: Optional[Tensor], mean: Tensor,
                     rstd: Tensor, branch: Tensor, eps: float, approximate: str, norm: str,
                     allow_tf32: bool) -> List[Tensor]:
    from ..kernels.triton.token_mixing import token_mixing_backward

    with _on_device(x):
        g = token_mixing_backward(
            dout.contiguous(), x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _none(mean),
            _none(rstd), _none(branch), eps=eps, approximate=approximate, norm=norm, scale=scale,
            sample_scale=sample_scale, allow_tf32=allow_tf32)
        return _grads_out(g, (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale), x)


@token_mixing_bwd.register_fake
def _(dout, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, sample_scale, mean,
      rstd, branch, eps, approximate, norm, allow_tf32):
    return _fake_grads(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale)


def _token_setup(ctx, inputs, output):
    (x, nw, nb, w1, b1, w2, b2, scale, ss, eps, approximate, norm, store_branch, allow_tf32) = inputs
    _, mean, rstd, branch = output
    ctx.save_for_backward(x, nw, nb, w1, b1, w2, b2, scale, ss, mean, rstd, branch)
    ctx.args = (eps, approximate, norm, allow_tf32)


def _token_backward(ctx, dout, *_unused):
    x, nw, nb, w1, b1, w2, b2, scale, ss, mean, rstd, branch = ctx.saved_tensors
    eps, approximate, norm, allow_tf32 = ctx.args
    g = token_mixing_bwd(dout, x, nw, nb, w1, b1, w2, b2, scale, ss, mean, rstd, branch, eps, approximate, norm,
                         allow_tf32)
    return (*_grads_in(g, (x, nw, nb, w1, b1, w2, b2, scale)), None, None, None, None, None, None)


token_mixing_fwd.register_autograd(_token_backward, setup_context=_token_setup)
token_mixing_bwd.register_autograd(_no_double_backward)


# ------------------------------------------------------------------ channel mixing
@torch.library.custom_op("mixer_fast::channel_mixing_fwd", mutates_args=())
def channel_mixing_fwd(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
                       fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
                       scale: Optional[Tensor], sample_scale: Optional[Tensor], eps: float, approximate: str, norm: str,
                       save_hidden: bool, store_branch: bool,
                       allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.triton.channel_mixing import channel_mixing_forward

    with _on_device(x):
        out, mean, rstd, z, branch = channel_mixing_forward(
            x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps, approximate=approximate,
            norm=norm, scale=scale, sample_scale=sample_scale, save_hidden=save_hidden, store_branch=store_branch,
            allow_tf32=allow_tf32)
        return (out, _or_empty(mean, x, torch.float32), _or_empty(rstd, x, torch.float32), _or_empty(z, x),
                _or_empty(branch, x))


@channel_mixing_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, sample_scale, eps,
      approximate, norm, save_hidden, store_branch, allow_tf32):
    B, S, C = x.shape
    stats = (B * S,) if norm == "layernorm" else (0,)
    return (x.new_empty((B, S, C)), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32),
            fc1_weight.new_empty((B * S, fc1_weight.shape[0]) if save_hidden else (0,)),
            x.new_empty((B, S, C) if store_branch else (0,)))


@torch.library.custom_op("mixer_fast::channel_mixing_bwd", mutates_args=())
def channel_mixing_bwd(dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                       fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
                       scale: Optional[Tensor], sample_scale: Optional[Tensor], mean: Tensor, rstd: Tensor, z: Tensor,
                       branch: Tensor, approximate: str, norm: str, allow_tf32: bool) -> List[Tensor]:
    from ..kernels.triton.channel_mixing import channel_mixing_backward

    with _on_device(x):
        g = channel_mixing_backward(
            dout.contiguous(), x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _none(mean),
            _none(rstd), z, _none(branch), approximate=approximate, norm=norm, scale=scale,
            sample_scale=sample_scale, allow_tf32=allow_tf32)
        return _grads_out(g, (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale), x)


@channel_mixing_bwd.register_fake
def _(dout, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, sample_scale, mean,
      rstd, z, branch, approximate, norm, allow_tf32):
    return _fake_grads(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale)


def _channel_setup(ctx, inputs, output):
    (x, nw, nb, w1, b1, w2, b2, scale, ss, eps, approximate, norm, save_hidden, store_branch, allow_tf32) = inputs
    _, mean, rstd, z, branch = output
    ctx.save_for_backward(x, nw, nb, w1, b1, w2, b2, scale, ss, mean, rstd, z, branch)
    ctx.args = (approximate, norm, allow_tf32)


def _channel_backward(ctx, dout, *_unused):
    x, nw, nb, w1, b1, w2, b2, scale, ss, mean, rstd, z, branch = ctx.saved_tensors
    approximate, norm, allow_tf32 = ctx.args
    g = channel_mixing_bwd(dout, x, nw, nb, w1, b1, w2, b2, scale, ss, mean, rstd, z, branch, approximate, norm,
                           allow_tf32)
    return (*_grads_in(g, (x, nw, nb, w1, b1, w2, b2, scale)), None, None, None, None, None, None, None)


channel_mixing_fwd.register_autograd(_channel_backward, setup_context=_channel_setup)
channel_mixing_bwd.register_autograd(_no_double_backward)


# ------------------------------------------------------------------ gMLP spatial gating
_GATING_NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "gate_norm_weight", "gate_norm_bias",
                 "proj_weight", "proj_bias", "fc2_weight", "fc2_bias")


@torch.library.custom_op("mixer_fast::spatial_gating_fwd", mutates_args=())
def spatial_gating_fwd(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], fc1_weight: Tensor,
                       fc1_bias: Optional[Tensor], gate_norm_weight: Optional[Tensor], gate_norm_bias: Optional[Tensor],
                       proj_weight: Tensor, proj_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
                       sample_scale: Optional[Tensor], eps: float, gate_eps: float, approximate: str, save: bool,
                       allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.triton.spatial_gating import spatial_gating_forward

    with _on_device(x):
        out, *rest = spatial_gating_forward(
            x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight, proj_bias,
            fc2_weight, fc2_bias, eps=eps, gate_eps=gate_eps, approximate=approximate, sample_scale=sample_scale,
            save=save, allow_tf32=allow_tf32)
        stats, saved = rest[:4], rest[4:]
        return (out, *stats, *(_or_empty(t, x, fc1_weight.dtype) for t in saved))


@spatial_gating_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight, proj_bias,
      fc2_weight, fc2_bias, sample_scale, eps, gate_eps, approximate, save, allow_tf32):
    B, S, C = x.shape
    H = fc1_weight.shape[0]
    stat = lambda: x.new_empty((B * S,), dtype=torch.float32)  # noqa: E731
    hidden = lambda *shape: fc1_weight.new_empty(shape if save else (0,))  # noqa: E731
    return (x.new_empty((B, S, C)), stat(), stat(), stat(), stat(), hidden(B, S, H), hidden(B, S, H // 2),
            hidden(B, S, H // 2))


@torch.library.custom_op("mixer_fast::spatial_gating_bwd", mutates_args=())
def spatial_gating_bwd(dout: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                       fc1_weight: Tensor, fc1_bias: Optional[Tensor], gate_norm_weight: Optional[Tensor],
                       gate_norm_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
                       fc2_weight: Tensor, fc2_bias: Optional[Tensor], sample_scale: Optional[Tensor], mean: Tensor,
                       rstd: Tensor, gate_mean: Tensor, gate_rstd: Tensor, z: Tensor, p: Tensor, q: Tensor,
                       approximate: str, allow_tf32: bool) -> List[Tensor]:
    from ..kernels.triton.spatial_gating import spatial_gating_backward

    with _on_device(x):
        params = (norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight,
                  proj_bias, fc2_weight, fc2_bias)
        g = spatial_gating_backward(dout.contiguous(), x, *params, mean, rstd, gate_mean, gate_rstd, z, p, q,
                                    approximate=approximate, sample_scale=sample_scale, allow_tf32=allow_tf32)
        return _grads_out(g, params, x, _GATING_NAMES)


@spatial_gating_bwd.register_fake
def _(dout, x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight,
      proj_bias, fc2_weight, fc2_bias, sample_scale, mean, rstd, gate_mean, gate_rstd, z, p, q, approximate,
      allow_tf32):
    return _fake_grads(x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias,
                       proj_weight, proj_bias, fc2_weight, fc2_bias)


def _gating_setup(ctx, inputs, output):
    *tensors, ss, _eps, _gate_eps, approximate, _save, allow_tf32 = inputs
    ctx.save_for_backward(*tensors, ss, *output[1:])
    ctx.args = (approximate, allow_tf32)


def _gating_backward(ctx, dout, *_unused):
    saved = ctx.saved_tensors
    g = spatial_gating_bwd(dout, *saved, *ctx.args)
    return (*_grads_in(g, saved[:11]), None, None, None, None, None, None)


spatial_gating_fwd.register_autograd(_gating_backward, setup_context=_gating_setup)
spatial_gating_bwd.register_autograd(_no_double_backward)



def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_sample_scale(sample_scale: Optional[Tensor]) -> None:
    if sample_scale is not None and sample_scale.requires_grad:
        raise NotImplementedError("sample_scale: the triton backend treats the drop-path factor as a constant "
                                  "and does not differentiate it; pass a tensor that does not require grad")


def _vectors(*vectors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The 1-D arguments (norm weights, biases, scales, sample_scale) contiguous: every kernel reads them at
    unit stride (a strided view, bias[::2], gave wrong values silently). A no-op for parameters; a copy, with
    its gradient flowing back through it, for a view."""
    return tuple(None if v is None else v.contiguous() for v in vectors)


def _autocast(x: Tensor, *weights: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Under torch.autocast, the linear layers' weights and biases in the autocast dtype (a differentiable
    cast, as autocast's own F.linear does); x, the norm parameters and the scales stay as they are, so the
    statistics, the epilogues and the residual run in x's precision, as eager's do."""
    if not torch.is_autocast_enabled(x.device.type):
        return weights
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(None if w is None else w.to(dtype) for w in weights)


def token_mixing(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate, norm,
                 scale, sample_scale, dropout) -> Tensor:
    """The ``triton`` backend's token mixing (arguments as mixer_fast.ops.token_mixing, already checked)."""
    _check_sample_scale(sample_scale)
    norm_weight, norm_bias, fc1_bias, fc2_bias, scale, sample_scale = _vectors(
        norm_weight, norm_bias, fc1_bias, fc2_bias, scale, sample_scale)
    store_branch = scale is not None and _needs_grad(scale)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = _autocast(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return token_mixing_fwd(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale,
                            sample_scale, eps, approximate, norm, store_branch, _allow_tf32())[0]


def channel_mixing(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate, norm,
                   scale, sample_scale, dropout) -> Tensor:
    """The ``triton`` backend's channel mixing (arguments as mixer_fast.ops.channel_mixing, already checked)."""
    _check_sample_scale(sample_scale)
    norm_weight, norm_bias, fc1_bias, fc2_bias, scale, sample_scale = _vectors(
        norm_weight, norm_bias, fc1_bias, fc2_bias, scale, sample_scale)
    params = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale)
    store_branch = scale is not None and _needs_grad(scale)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = _autocast(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return channel_mixing_fwd(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale,
                              sample_scale, eps, approximate, norm, _needs_grad(*params), store_branch,
                              _allow_tf32())[0]


def spatial_gating(x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight,
                   proj_bias, fc2_weight, fc2_bias, *, eps, gate_eps, approximate, sample_scale, dropout) -> Tensor:
    """The ``triton`` backend's gMLP block (arguments as mixer_fast.ops.spatial_gating, already checked)."""
    _check_sample_scale(sample_scale)
    norm_weight, norm_bias, fc1_bias, gate_norm_weight, gate_norm_bias, proj_bias, fc2_bias, sample_scale = _vectors(
        norm_weight, norm_bias, fc1_bias, gate_norm_weight, gate_norm_bias, proj_bias, fc2_bias, sample_scale)
    params = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias, proj_weight,
              proj_bias, fc2_weight, fc2_bias)
    fc1_weight, fc1_bias, proj_weight, proj_bias, fc2_weight, fc2_bias = _autocast(
        x, fc1_weight, fc1_bias, proj_weight, proj_bias, fc2_weight, fc2_bias)
    return spatial_gating_fwd(x, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_norm_weight, gate_norm_bias,
                              proj_weight, proj_bias, fc2_weight, fc2_bias, sample_scale, eps, gate_eps, approximate,
                              _needs_grad(*params), _allow_tf32())[0]
