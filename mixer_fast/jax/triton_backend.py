"""The ``triton`` JAX backend: mixer_fast's Triton kernels (the torch backend's own) through jax-triton.

On a GPU every launch is a ``jax_triton.triton_call`` (jax-triton is imported when the backend loads;
without a GPU jaxlib it cannot be). On a machine with no GPU the same launches run in Triton's interpreter
through ``jax.pure_callback`` on CPU torch tensors (slow; for testing), which must be enabled before
triton is first imported in the process: ``load()`` does that, or says why it cannot.

Forward and backward are the torch backend's kernel launches (kernels/triton/jax_launch.py) under a
``jax.custom_vjp``. Arrays of mixed dtypes run in their promoted dtype, which is what the jax.numpy
reference computes in; fp16, bf16 and fp32 are supported. FP32 matmuls are exact (no TF32).
Deterministic: no reduction uses atomics. A token MLP past token_mixing.FLASH_MAX_TOKENS, or whose flash
kernels need more shared memory than the GPU has, runs as XLA's (``_runs_flash``).
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from types import SimpleNamespace

from ..dispatch import BackendUnavailable

_ARGS = ("x", "norm_weight", "norm_bias", "fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias", "scale", "sample_scale")


def load() -> SimpleNamespace:
    try:
        import jax
    except ImportError as e:
        raise BackendUnavailable(f"jax is not installed ({e})") from None
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailable(
                "no GPU, and triton was imported before mixer_fast could enable Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing triton to use it)")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendUnavailable("no GPU, and Triton's interpreter (the CPU fallback) needs torch") from None
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e})") from None
    from ..kernels.triton import _launch, toolchain

    problem = _launch.interpreter_problem()
    if problem:
        raise BackendUnavailable(problem)
    if on_gpu and not _launch.INTERPRET:
        try:
            _import_jax_triton()
        except ImportError as e:
            raise BackendUnavailable(f"jax-triton is not importable ({e}); `pip install jax-triton`") from None
        device = jax.local_devices()[0]
        # Before any kernel compiles. jax-triton hands jaxlib PTX, which XLA assembles with the first ptxas
        # it finds (it ignores TRITON_PTXAS_PATH): that one must not be known to miscompile these kernels,
        # and Triton must write PTX no newer than it reads (toolchain.choose_for_jax).
        try:
            ptxas, xla_ptxas = toolchain.apply_for_jax(_capability(device))
        except toolchain.ToolchainProblem as e:
            raise BackendUnavailable(f"on {device.device_kind}: {e}") from None
        detail = (f"compiled Triton kernels through jax-triton on {device.device_kind}: PTX written for ptxas "
                  f"{ptxas.version_text} ({ptxas.source}), assembled by XLA's ptxas {xla_ptxas.version_text} at "
                  f"{xla_ptxas.path} ({xla_ptxas.source})")
    else:
        detail = "Triton's interpreter through jax.pure_callback (no GPU; for testing, slow)"
    return SimpleNamespace(name="triton", features=frozenset({"deterministic"}), detail=detail,
                           device_class=device_class,
                           token_mixing=functools.partial(_call, "token_mixing"),
                           channel_mixing=functools.partial(_call, "channel_mixing"))


def _summed_like(grad, primal):
    """``grad`` summed over the mesh axes it varies over and ``primal`` does not: inside jax.shard_map with
    check_vma a replicated argument's gradient is the psum of the per-device ones (what JAX's transpose of
    the implicit broadcast gives jax.numpy code), and a custom_vjp rule must return it typed so."""
    import jax

    extra = jax.typeof(grad).mat.varying - jax.typeof(primal).mat.varying
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def _import_jax_triton():
    """``import jax_triton``, keeping TRITON_CACHE_DIR as it was: jax-triton 0.3.1 sets it to "" when first
    imported (its own compiles bypass Triton's cache), after which Triton 3.4 and later find no cache
    directory and every other compile in the process raises, torch's Triton launches included (0.4.0
    deletes it instead, jax-ml/jax-triton#351, which loses a user's setting). An empty value is dropped
    (Triton's default directory then)."""
    saved = os.environ.get(_CACHE_ENV)
    import jax_triton

    if saved:
        os.environ[_CACHE_ENV] = saved
    else:
        os.environ.pop(_CACHE_ENV, None)
    return jax_triton


_CACHE_ENV = "TRITON_CACHE_DIR"


def _capability(device) -> int:
    """A GPU device's compute capability as an integer (90 for "9.0"); BackendUnavailable for a device that
    reports none (the kernels, their plans and the ptxas guard are for NVIDIA GPUs)."""
    from ..kernels.triton.jax_launch import device_capability

    capability = device_capability(device)
    if capability is None:
        raise BackendUnavailable(f"device {device.device_kind!r} reports no CUDA compute capability: the triton "
                                 "backend's kernels and plans are for NVIDIA GPUs")
    return capability


def device_class(device_index=None) -> str:
    """The wins table's key: ``sm_90`` for a GPU of compute capability 9.0; ``interpreter`` without a GPU."""
    import jax

    from ..kernels.triton import _launch

    if _launch.INTERPRET or jax.default_backend() != "gpu":
        return "interpreter"
    return f"sm_{_capability(jax.devices()[device_index or 0])}"


def _call(op: str, x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *, eps, approximate,
          norm, scale, sample_scale):
    import jax
    import jax.numpy as jnp

    from ..kernels.triton.jax_launch import DTYPES

    args = (x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, scale, sample_scale)
    # The reference's promotion: x and the parameters (sample_scale, a per-sample factor, does not promote).
    dtype = jnp.result_type(*(a for a in args[:8] if a is not None))
    if dtype not in DTYPES:
        raise TypeError(f"x: the triton backend computes in float16, bfloat16 or float32; x and the parameters "
                        f"promote to {dtype}")
    key = (op, float(eps), approximate, norm, jnp.dtype(dtype).name)
    if op == "token_mixing" and fc2_kernel is not None and not _runs_flash(key, args):
        from ..reference import jax_ops

        # XLA's GEMMs, exact in fp32 as the kernels are (no TF32)
        with jax.default_matmul_precision("float32"):
            return jax_ops.token_mixing(x, norm_weight, norm_bias, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias,
                                        eps=eps, approximate=approximate, norm=norm, scale=scale,
                                        sample_scale=sample_scale)
    return _op(*key)(*args)


def _runs_flash(key: tuple, args: tuple) -> bool:
    """Whether a token MLP (``key``: _op's arguments; ``args``: the op's arrays, None for an absent one)
    runs on the flash kernels: within token_mixing.FLASH_MAX_TOKENS (as on the torch backend), and where
    they fit the GPU's shared memory (:func:`_flash_fits`). Otherwise it runs as XLA's."""
    import jax

    from ..kernels.triton import token_mixing

    from ..kernels.triton import _launch

    if not token_mixing.flash_planned(args[0].shape[1]):
        return False
    if _launch.INTERPRET:  # Triton's interpreter has no shared memory to run out of
        return True
    return _flash_fits(*key, tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))


@functools.lru_cache(maxsize=None)
def _flash_fits(op: str, eps: float, approximate: str, norm: str, dtype: str, avals: tuple) -> bool:
    """Whether the token MLP's flash kernels, forward and backward, fit the GPU's shared memory for these
    arguments (``avals``: their shapes and dtypes, None for an absent one). Their tiles span all S tokens:
    with 16-bit weights the dW kernel needs 172 KB at S = 1024 and 344 KB at S = 1025 (sm_90a), against the
    227 KB a block may use on an H100 / H200 and less on other GPUs. jax-triton would compile such a kernel
    and fail only when the program runs, so the sizes are compiled first, once per shape, and a token MLP
    that does not fit runs as XLA's (as the torch backend sends such shapes to its cuBLAS engine)."""
    import jax

    from ..kernels.triton import jax_launch, token_mixing

    fused = _op(op, eps, approximate, norm, dtype)

    def step(*args):
        out, pullback = jax.vjp(fused, *args)
        return pullback(out)

    capability = _capability(jax.local_devices()[0])
    kernels = (token_mixing.token_mlp_fwd_kernel, token_mixing.token_mlp_dx_kernel,
               token_mixing.token_mlp_dw_kernel)
    try:
        needs = jax_launch.launch_shared_memory(lambda: jax.eval_shape(step, *avals), kernels, capability)
    except Exception as e:  # noqa: BLE001 - a guard for speed: never the reason an op fails
        warnings.warn(f"mixer_fast: the token MLP's flash kernels could not be sized for this GPU "
                      f"({type(e).__name__}: {e}); this shape runs as XLA's", RuntimeWarning, stacklevel=3)
        return False
    return max(needs.values(), default=0) <= jax_launch.max_shared_memory(capability)


@functools.lru_cache(maxsize=None)
def _op(op: str, eps: float, approximate: str, norm: str, dtype: str):
    import jax

    from ..kernels.triton import jax_launch

    kw = dict(eps=eps, approximate=approximate, norm=norm, precision="ieee")
    token = op == "token_mixing"

    def cast(args):
        return [a.astype(dtype) if a is not None and i < 8 else a for i, a in enumerate(args)]

    def forward(args, store_branch):
        x, nw, nb, k1, b1, k2, b2, scale, ss = cast(args)
        f = jax_launch.token_mixing_forward if token else jax_launch.channel_mixing_forward
        return f(x, nw, nb, k1, b1, k2, b2, scale=scale, ss=ss, store_branch=store_branch, **kw)

    @jax.custom_vjp
    def fused(*args):
        return forward(args, store_branch=False)[0]

    def fwd(*args):
        res = forward(args, store_branch=args[7] is not None or args[8] is not None)
        return res[0], (args, res[1:])

    def bwd(saved, g):
        args, res = saved
        x, nw, nb, k1, b1, k2, b2, scale, ss = cast(args)
        g = g.astype(dtype)
        if token:
            mean, rstd, branch = res
            grads = jax_launch.token_mixing_backward(g, x, nw, nb, k1, b1, k2, b2, mean, rstd, branch, scale=scale,
                                                     ss=ss, **kw)
        else:
            mean, rstd, z, branch = res
            kw_b = {k: v for k, v in kw.items() if k != "eps"}
            grads = jax_launch.channel_mixing_backward(g, x, nw, nb, k1, b1, k2, b2, mean, rstd, z, branch,
                                                       scale=scale, ss=ss, **kw_b)
        return tuple(None if a is None else _summed_like(grads[name].astype(a.dtype), a)
                     for name, a in zip(_ARGS, args))

    fused.defvjp(fwd, bwd)
    return fused
