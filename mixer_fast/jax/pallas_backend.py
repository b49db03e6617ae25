"""The ``pallas`` JAX backend: the Pallas kernels (kernels/pallas/) for TPU, in interpret mode on CPU.

Forward and backward: the fused Pallas kernels; the backward recomputes the hidden tiles rather than
storing them, and leaves the norm backward (reductions over all of C) and the bias/scale sums to XLA.
Interpret or Mosaic is chosen per lowering platform (``jax.lax.platform_dependent``): on a CPU the
kernels run in Pallas' interpret mode, and the same function exported for TPU from that CPU
(``jax.export(..., platforms=["tpu"])``) holds the Mosaic kernels. Tests switch the interpreter to TPU
interpret mode (race detection, NaN-filled uninitialised memory) through ``INTERPRET``. GPU is not
served: these kernels are written for Mosaic TPU.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from ..dispatch import BackendUnavailable

# What to pass as pallas_call(interpret=...) when lowering for a platform other than TPU; tests may set a
# pltpu.InterpretParams here. Lowering for TPU always takes Mosaic.
INTERPRET: Any = True


def load() -> SimpleNamespace:
    try:
        import jax  # noqa: F401
        from jax.experimental import pallas  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"jax with Pallas is not installed ({e})") from None
    return SimpleNamespace(name="pallas", features=frozenset({"deterministic"}), device_class=device_class,
                           detail="Pallas kernels, forward and backward (Mosaic TPU; interpret mode on CPU)",
                           token_mixing=functools.partial(_call, "token_mixing"),
                           channel_mixing=functools.partial(_call, "channel_mixing"))


def device_class(device_index=None) -> str:
    """The wins table's key: the TPU's kind (``tpu:TPU v5 lite``), or ``interpreter`` off TPU."""
    import jax

    if jax.default_backend() != "tpu":
        return "interpreter"
    return f"tpu:{jax.devices()[device_index or 0].device_kind}"


def _call(op: str, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *, eps, approximate,
          norm, scale, sample_scale):
    import jax

    args = (x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale, sample_scale)
    if any(a is not None and jax.typeof(a).mat.varying for a in args):
        # Inside jax.shard_map with check_vma (its default) every value in a Pallas kernel body would have to
        # vary over the same mesh axes, which JAX 0.10's pallas_call cannot yet arrange for replicated
        # operands; JAX's own error would point at a primitive deep inside the kernel.
        raise NotImplementedError("jax.shard_map: the pallas backend runs inside shard_map with "
                                  "check_vma=False only (Pallas calls cannot track varying mesh axes in this "
                                  "JAX); pass check_vma=False to jax.shard_map, or use backend='xla'")
    mosaic = _op(op, float(eps), approximate, norm, False)
    if jax.default_backend() == "tpu":
        return mosaic(*args)
    # Off TPU the choice is made per lowering platform, not per process: run here, the kernels are
    # interpreted; exported for TPU from this host (jax.export(..., platforms=["tpu"])), the same function
    # lowers to Mosaic kernels (a module-wide switch would have exported the interpreter's emulation).
    interpreted = _op(op, float(eps), approximate, norm, INTERPRET)
    return jax.lax.platform_dependent(*args, tpu=mosaic, default=interpreted)


@functools.lru_cache(maxsize=None)
def _op(op: str, eps: float, approximate: str, norm: str, interpret: Any):
    import jax

    from ..kernels.pallas.channel_mixing import channel_mixing_backward, channel_mixing_forward
    from ..kernels.pallas.token_mixing import token_mixing_backward, token_mixing_forward

    kw = dict(eps=eps, approximate=approximate, norm=norm)
    forward, backward = ((channel_mixing_forward, channel_mixing_backward) if op == "channel_mixing"
                         else (token_mixing_forward, token_mixing_backward))

    @jax.custom_vjp
    def fused(x, nw, nb, k1, b1, k2, b2, scale, ss):
        return forward(x, nw, nb, k1, b1, k2, b2, scale=scale, sample_scale=ss, interpret=interpret, **kw)

    def fwd(*args):
        scale, ss = args[7], args[8]
        if scale is None and ss is None:
            return fused(*args), (args, None)
        out, branch = forward(*args[:7], scale=scale, sample_scale=ss, interpret=interpret, with_branch=True, **kw)
        return out, (args, branch)

    # The backward kernels have no derivative of their own: differentiating them again (jax.grad of a
    # gradient, jax.hessian) raises a NotImplementedError at trace time instead of an internal assertion
    # from pallas_call's transpose.
    @jax.custom_vjp
    def backward_op(g, args, branch):
        return backward(g, *args[:7], branch, scale=args[7], sample_scale=args[8], interpret=interpret, **kw)

    def backward_op_fwd(g, args, branch):
        return backward_op(g, args, branch), None

    def backward_op_bwd(_, __):
        raise NotImplementedError("double backward: the pallas backend's backward is not differentiable (a "
                                  "gradient of a gradient); use backend='xla' for higher-order derivatives")

    backward_op.defvjp(backward_op_fwd, backward_op_bwd)

    def bwd(saved, g):
        args, branch = saved
        return backward_op(g, args, branch)

    fused.defvjp(fwd, bwd)
    return fused
