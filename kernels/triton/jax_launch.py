"""JAX launchers for the Triton kernels: the torch launchers' launches, on jax arrays.

Each function mirrors its namesake in layer_norm.py / matmul.py / token_mixing.py / channel_mixing.py
(same kernels, block sizes, autotune configs and epilogues), taking one compute dtype for every array
(the caller casts). JAX arrays are row-major, so strides follow from shapes. Flax kernels (in, out) of
channel mixing are read through strides as the (out, in) weights the GEMM expects, with no transpose;
the small token-mixing kernels are transposed once by XLA (S × D_S elements) and, where a row is not a
multiple of 16 elements, zero-padded to one (token_mixing.token_weights, as the torch launchers do), so the
token kernels read them exactly as they read torch weights.

The kernels are the torch launchers' own, launched directly: their parameters run inputs (arrays, then
scalars), outputs, constexprs, which is jax-triton's calling convention. The token kernels take shapes
and strides as constexprs (token_mixing.shape_constexprs), since jax-triton gives integer arguments no
divisibility hints; the fused GEMM's stay runtime scalars, its multiples of 16 passed divided by 16 and
multiplied back in the kernel (matmul.scaled16), so that it compiles as a torch launch does and runs the
same configs.

How a launch runs (``call``): on a GPU through ``jax_triton.triton_call``; with Triton's interpreter (no
GPU: tests) through ``jax.pure_callback`` on CPU torch tensors, in jax-triton's argument order, so the
kernels are called as they are on a GPU. jax-triton has no batching rule: under ``jax.vmap`` a
launch runs once per vmapped element (``jax.custom_batching.sequential_vmap``).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import triton

from . import _launch
from .channel_mixing import fold_launch, fold_weight_kernel
from .layer_norm import ln_backward_flags, ln_backward_kernel, ln_stats_kernel, rows_launch
from .matmul import (A_AFFINE, A_LAYERNORM, A_LAYERNORM_FOLDED, A_NONE, B_AFFINE_K, B_AFFINE_N, B_GELU, B_LAYERNORM,
                     B_NONE, B_TOKEN_LAYERNORM, LN_FOLDED, TUNER, Axis, autotuned, col_sum_rows, epi_subtile, flat,
                     fused_matmul_kernel, ln_placement, no_tuning, plan, site_configs, split, tune_key,
                     untuned_choice)
from .token_mixing import (DW1, DW2, DW_BOTH, Features, bwd_inputs, fwd_inputs, launch_constexprs, launch_plan,
                           token_mlp_dw_kernel, token_mlp_dx_kernel, token_mlp_fwd_kernel, token_weights)

Array = jax.Array
F32 = jnp.float32
DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


# ---------------------------------------------------------------------------------------------------------
# One launch


def call(kernel, grid, args: Sequence[Any], outs: Sequence[jax.ShapeDtypeStruct], *, num_warps: int = 4,
         num_stages: int = 3, **meta) -> Tuple[Array, ...]:
    """Launch ``kernel``, whose parameters run inputs (arrays and scalars), outputs, constexprs: ``args``
    the inputs in order, one output per ``outs``, ``meta`` the constexprs by name; ``grid`` a tuple or a
    function of the config."""
    sizing = getattr(_SIZING, "run", None)
    if sizing is not None:  # a sizing run (launch_shared_memory): compiled for its shared memory, not launched
        if kernel in sizing.kernels:
            need = sizing.measure(kernel, _operand_types(args, outs), meta, capability=sizing.capability,
                                  num_warps=num_warps, num_stages=num_stages)
            name = kernel.__name__
            sizing.needs[name] = max(sizing.needs.get(name, 0), need)
        return tuple(jnp.zeros(o.shape, o.dtype) for o in outs)
    is_array = [not isinstance(a, (bool, int, float)) for a in args]
    arrays = [a for a, arr in zip(args, is_array) if arr]

    def with_scalars(arrays):
        it = iter(arrays)
        return [next(it) if arr else a for a, arr in zip(args, is_array)]

    def launch(*arrays):
        if _launch.INTERPRET:
            return _interpreted(kernel, grid, with_scalars(arrays), outs, num_warps, meta)
        import jax_triton

        full = [np.float32(a) if isinstance(a, float) else a for a in with_scalars(arrays)]
        return tuple(jax_triton.triton_call(*full, kernel=kernel, out_shape=list(outs), grid=grid,
                                            num_warps=num_warps, num_stages=num_stages, **meta))

    return varying_like(jax.custom_batching.sequential_vmap(launch)(*arrays), arrays)


def _operand_types(args: Sequence[Any], outs: Sequence[jax.ShapeDtypeStruct]) -> list:
    """A launch's non-constexpr operands as aot.launch_shared_bytes takes them: scalars as they are, arrays
    and outputs by their Triton element type."""
    return ([a if isinstance(a, (bool, int, float)) else _TRITON_TYPES[jnp.dtype(a.dtype).name] for a in args]
            + [_TRITON_TYPES[jnp.dtype(o.dtype).name] for o in outs])


def varying_like(outs: Sequence[Array], arrays: Sequence[Array]) -> Tuple[Array, ...]:
    """``outs`` made to vary over every mesh axis one of ``arrays`` varies over: inside jax.shard_map with
    check_vma (its default) a kernel call's results carry no varying axes of their own, where every
    jax.numpy result carries its operands'; JAX then refuses them (e.g. as a gradient)."""
    axes = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays))
    out = []
    for o in outs:
        missing = axes - jax.typeof(o).mat.varying
        out.append(jax.lax.pcast(o, tuple(sorted(missing)), to="varying") if missing else o)
    return tuple(out)


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32"}


class _Sizing(NamedTuple):
    kernels: frozenset
    capability: int
    measure: Callable[..., int]
    needs: Dict[str, int]


_SIZING = threading.local()


def launch_shared_memory(traced: Callable[[], Any], kernels: Iterable, capability: int) -> Dict[str, int]:
    """Trace ``traced`` (which calls the launchers, e.g. under ``jax.eval_shape``) without launching
    anything: each launch of one of ``kernels`` is compiled for a GPU of compute capability ``capability``
    as jax-triton would compile it, and the most shared memory (bytes) each kernel's launches need is
    returned by kernel name. Every launch in the trace returns zeros. jax-triton checks no shared memory
    when it compiles, so a kernel that needs more than the GPU has fails only when the program runs."""
    from .aot import launch_shared_bytes

    if getattr(_SIZING, "run", None) is not None:
        raise RuntimeError("launch_shared_memory: already sizing in this thread")
    _SIZING.run = _Sizing(frozenset(kernels), int(capability), launch_shared_bytes, {})
    try:
        with triton_cache():
            traced()
        return dict(_SIZING.run.needs)
    finally:
        _SIZING.run = None


@contextlib.contextmanager
def triton_cache() -> Iterator[None]:
    """A cache directory for Triton's own compiles (triton.compile, its driver utilities) in this block:
    jax-triton 0.3.1 sets TRITON_CACHE_DIR to "" when imported (it compiles without Triton's cache), after
    which Triton (3.4 and later: ``triton.knobs``) finds no directory and raises. Triton's default one,
    unless a directory is in force."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # older Triton reads an empty TRITON_CACHE_DIR as its default directory
        yield
        return
    with knobs.cache.scope():
        if not knobs.cache.dir:
            knobs.cache.dir = os.path.join(knobs.cache.home_dir, ".triton", "cache")
        yield


def _interpreted(kernel, grid, args, outs, num_warps, meta):
    """The launch in Triton's interpreter, on host copies of the arrays (outputs NaN-filled under POISON)."""
    def host(*host_arrays):
        import torch

        it = iter(host_arrays)
        targs = [_to_torch(next(it)) if not isinstance(a, (bool, int, float)) else a for a in args]
        touts = [torch.empty(o.shape, dtype=getattr(torch, _TORCH_DTYPES[jnp.dtype(o.dtype).name])) for o in outs]
        if _launch.POISON:
            for t in touts:
                t.fill_(float("nan"))
        with _launch.serialized():
            kernel[grid(meta) if callable(grid) else grid](*targs, *touts, num_warps=num_warps, **meta)
        return tuple(_to_numpy(t, o.dtype) for t, o in zip(touts, outs))

    arrays = [a for a in args if not isinstance(a, (bool, int, float))]
    return jax.pure_callback(host, tuple(outs), *arrays)


def _to_torch(a):
    import torch

    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _to_numpy(t, dtype) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy().astype(dtype, copy=False)


def _strides(a: Array) -> Tuple[int, ...]:
    """A row-major array's strides in elements (JAX arrays have no others)."""
    return tuple(int(np.prod(a.shape[i + 1:], dtype=np.int64)) for i in range(a.ndim))


def _shape(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _idx64(*arrays: Optional[Array]) -> bool:
    """The torch launchers' needs_int64 for contiguous arrays: an element 2³¹ or more from the base."""
    return any(a is not None and a.size >= 2**31 for a in arrays)


def _vec_or(v: Optional[Array], n: int, fill: float, dtype) -> Array:
    return v if v is not None else jnp.full((n,), fill, dtype)


def _dummy() -> Array:
    return jnp.zeros((1,), F32)


# ---------------------------------------------------------------------------------------------------------
# LayerNorm


def layer_norm_stats(x: Array, eps: float) -> Tuple[Array, Array]:
    """Per-token mean and 1/std over C of x (B, S, C), each fp32 (B·S,)."""
    B, S, C = x.shape
    R = B * S
    if R == 0:
        return jnp.zeros((0,), F32), jnp.zeros((0,), F32)
    grid, tiles = rows_launch(R, C)
    return call(ln_stats_kernel, grid, [x, R, S, C, float(eps), S * C, C, 1], [_shape((R,), F32)] * 2, **tiles)


def layer_norm_backward(g: Array, x: Array, dy: Array, mean: Array, rstd: Array,
                        weight: Optional[Array]) -> Tuple[Array, Array, Array]:
    """dx = dy + LayerNorm-backward(g) for x (B, S, C), g = dL/dLN(x) (B·S, C; any float dtype); returns
    (dx (B, S, C) in x's dtype, dweight (C,) fp32, dbias (C,) fp32)."""
    B, S, C = x.shape
    R = B * S
    if R == 0:
        return dy.astype(x.dtype), jnp.zeros((C,), F32), jnp.zeros((C,), F32)
    grid, tiles = rows_launch(R, C)
    programs = grid[0]
    dx, dw_part, db_part = call(
        ln_backward_kernel, grid,
        [g, x, dy, mean, rstd, weight if weight is not None else mean, R, S, C, S * C, C, 1,
         S * C, C, 1, S * C, C, 1, S * C, C, 1],
        [_shape(x.shape, x.dtype), _shape((programs, C), F32), _shape((programs, C), F32)],
        **ln_backward_flags(has_w=weight is not None, has_dy=True, gelu_in=None, g_split=False,
                            interpreter=_launch.INTERPRET), **tiles)
    return dx, dw_part.sum(0), db_part.sum(0)


# ---------------------------------------------------------------------------------------------------------
# The fused GEMM

_tuned: Dict[str, object] = {}


def _tuned_launch(variant: str, M: int, N: int, K: int, p, fp32: bool = False,
                  operands: Callable[[], Sequence[Any]] = tuple):
    """(kernel, grid, num_warps / num_stages) for a fused GEMM launch: the shipped table's config for this
    GPU where it has one (matmul.TUNER, as the torch launcher), else triton.autotune over the site's configs
    (jax-triton runs Triton's autotuner itself), or the plan's in the interpreter. ``operands()``
    (:func:`_operand_types`): what MIXER_FAST_AUTOTUNE=none compiles a config with, where the GPU has less
    shared memory than Hopper, to take the first that fits (as the torch launcher does)."""
    split = p.split_k > 1
    if _launch.INTERPRET:
        return fused_matmul_kernel, p.grid, dict(num_warps=p.num_warps, num_stages=p.num_stages)
    capability = device_capability(jax.local_devices()[0])  # None: no GPU (a test's stand-in)
    configs = site_configs(variant, split, fp32=fp32)
    cfg = None
    if capability is not None:
        cfg = TUNER.shipped(f"sm_{capability}", "jax:" + tune_key(variant + (",fp32" if fp32 else ""), M, N, K,
                                                                 p.meta), configs)
    if cfg is None and no_tuning():  # MIXER_FAST_AUTOTUNE=none: untimed, as the torch launcher (no TMA here)
        cfg = untuned_choice(configs, _fits(p, operands, capability))
    if cfg is None:
        return autotuned(fused_matmul_kernel, variant, _tuned, split, fp32), p.grid, {}
    bm, bn, bk, warps, stages = cfg
    return (fused_matmul_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn), p.split_k),
            dict(num_warps=warps, num_stages=stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                 EPI_SUBTILE=epi_subtile(bn)))


def _fits(p, operands: Callable[[], Sequence[Any]], capability: Optional[int]) -> Optional[Callable[[Tuple], bool]]:
    """Whether a fused-GEMM config fits the GPU's shared memory (compiled as jax-triton compiles it), or None
    where every config does: the site configs are sized for Hopper's 227 KB (the static report), and a GPU
    with as much needs no compile to choose (nor one of unknown capability: a test's stand-in)."""
    if capability is None:
        return None
    limit = max_shared_memory(capability)
    if limit >= _launch.shared_memory_per_block(_launch.DEFAULT_CAPABILITY):
        return None
    from .aot import launch_shared_bytes

    def fits(cfg: Tuple) -> bool:
        bm, bn, bk, warps, stages = cfg
        constexprs = dict(p.meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPI_SUBTILE=epi_subtile(bn))
        with triton_cache():
            need = launch_shared_bytes(fused_matmul_kernel, list(operands()), constexprs, capability=capability,
                                       num_warps=warps, num_stages=stages)
        return need <= limit

    return fits


def device_capability(device) -> Optional[int]:
    """A JAX device's compute capability as an integer (90 for "9.0"), or None where it reports none (a
    CPU device)."""
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return None
    major, minor = str(capability).split(".")[:2]
    return int(major) * 10 + int(minor)


def _capability() -> int:
    """The first local JAX GPU's compute capability (:func:`device_capability`); _launch.DEFAULT_CAPABILITY
    where it reports none (no GPU: a test's stand-in)."""
    capability = device_capability(jax.local_devices()[0])
    return _launch.DEFAULT_CAPABILITY if capability is None else capability


def _sm_count() -> int:
    """The GPU's streaming multiprocessors as JAX reports them (a GPU device's ``core_count``), for the
    split-K plan (matmul.split_k); _launch.DEFAULT_SMS where it reports none."""
    count = getattr(jax.local_devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else _launch.DEFAULT_SMS


def max_shared_memory(capability: int) -> int:
    """The most shared memory (bytes) a block may use on the first JAX GPU, of compute capability
    ``capability``: the driver's answer (Triton's, torch-free), else _launch.SHARED_MEMORY_PER_BLOCK's."""
    try:
        from triton.backends.nvidia.driver import CudaUtils

        ordinal = getattr(jax.local_devices()[0], "local_hardware_id", None) or 0
        with triton_cache():  # CudaUtils builds its C module there
            return int(CudaUtils().get_device_properties(ordinal)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - no driver module, no C compiler for it, no CUDA context: the table
        return _launch.shared_memory_per_block(capability)


class GemmOutputs(NamedTuple):
    """What a fused GEMM launch returns: the output, the stored pre-activation / branch (store_branch),
    the output's column sums (col_sum)."""

    out: Array
    aux: Optional[Array]
    col_sum: Optional[Array]


def fused_matmul(
    a: Array, a_axes: Tuple[Axis, Axis], b: Array, b_axes: Tuple[Axis, Axis],
    out_shape: Tuple[int, ...], out_dtype, out_axes: Tuple[Axis, Axis], M: int, N: int, K: int, *, variant: str,
    precision: str, a_pro: int = A_NONE, a_stats: Optional[Tuple[Array, Array]] = None,
    a_vec: Optional[Tuple[Array, Array]] = None, b_pro: int = B_NONE, b_stats: Optional[Tuple[Array, Array]] = None,
    b_vec: Optional[Tuple[Array, Array]] = None, bias: Optional[Array] = None, bias_on_m: bool = False,
    aux: Optional[Array] = None, aux_axes: Optional[Tuple[Axis, Axis]] = None, epi_gelu: bool = False,
    epi_gelu_grad: bool = False, store_branch: bool = False, scale: Optional[Array] = None,
    ss: Optional[Array] = None, ss_on_n: bool = False, res: Optional[Array] = None,
    res_axes: Optional[Tuple[Axis, Axis]] = None, col_sum: bool = False, approximate: str = "none",
) -> GemmOutputs:
    """matmul.fused_matmul returning its outputs (GemmOutputs): with ``store_branch`` the epilogue stores
    the pre-activation / branch into a second output shaped like ``out`` (``aux``; with ``epi_gelu_grad``
    it reads ``aux``, an input); with ``col_sum`` the output's column sums (N,) fp32 from the epilogue's
    partials (matmul.col_sum_rows)."""
    assert not (store_branch and epi_gelu_grad)
    if M == 0 or N == 0:
        empty = jnp.zeros(out_shape, out_dtype)
        return GemmOutputs(empty, empty if store_branch else None, jnp.zeros((N,), F32) if col_sum else None)
    fp32 = a.dtype == b.dtype == F32
    sum_rows = col_sum_rows(variant, fp32) if col_sum else 0
    dummy = _dummy()
    a_mean, a_rstd = a_stats or (dummy, dummy)
    a_w, a_b = a_vec or (dummy, dummy)
    b_mean, b_rstd = b_stats or (dummy, dummy)
    b_w, b_b = b_vec or (dummy, dummy)
    p = plan(M, N, K, a_axes, b_axes, out_axes, aux_axes, res_axes, a_pro=a_pro, b_pro=b_pro,
             has_bias=bias is not None, bias_on_m=bias_on_m, epi_gelu=epi_gelu, epi_gelu_grad=epi_gelu_grad,
             store_branch=store_branch, has_scale=scale is not None, has_ss=ss is not None, ss_on_n=ss_on_n,
             has_res=res is not None, approximate=approximate, precision=precision,
             idx64=_idx64(a, b, aux, res),
             allow_split=np.dtype(out_dtype) == np.float32, out_numel=int(np.prod(out_shape)), scale_scalars=True,
             col_sum_rows=sum_rows, sms=_sm_count())
    split = p.split_k > 1  # fp32 partial products over K ranges, summed in a fixed order (matmul.split_k)
    inputs = [a, b, aux if aux is not None else dummy, res if res is not None else dummy,
              a_mean, a_rstd, a_w, a_b, b_mean, b_rstd, b_w, b_b,
              bias if bias is not None else dummy, scale if scale is not None else dummy,
              ss if ss is not None else dummy, *p.scalars]
    main = (p.split_k, *out_shape) if split else out_shape
    outs = [_shape(main, out_dtype), _shape(out_shape if store_branch else (1,), out_dtype),
            _shape((triton.cdiv(M, sum_rows), N) if col_sum else (1,), F32)]
    kernel, grid, launch = _tuned_launch(variant, M, N, K, p, fp32=fp32,
                                         operands=lambda: _operand_types(inputs, outs))
    meta = {**p.meta, **launch}
    if isinstance(kernel, triton.runtime.Autotuner):
        del meta["EPI_SUBTILE"]  # each config carries its own (matmul.autotuned)
    out, aux_out, partials = call(kernel, grid, inputs, outs, **meta)
    return GemmOutputs(out.sum(0) if split else out, aux_out if store_branch else None,
                       partials.sum(0) if col_sum else None)


# ---------------------------------------------------------------------------------------------------------
# Token mixing


def _branch_grad(dout: Array, scale: Optional[Array], ss: Optional[Array]) -> Array:
    """dL/d(branch before scale) = dout · scale · sample_scale, in dout's dtype."""
    if scale is None and ss is None:
        return dout
    g = dout.astype(F32)
    if scale is not None:
        g = g * scale.astype(F32)
    if ss is not None:
        g = g * ss.astype(F32)[:, None, None]
    return g.astype(dout.dtype)


def _scale_grads(grads: Dict[str, Optional[Array]], dout: Array, branch: Optional[Array], scale: Optional[Array],
                 ss: Optional[Array]) -> None:
    """d scale (C,) and d sample_scale (B,), fp32, from the forward's branch (kept when either is given)."""
    if scale is None and ss is None:
        return
    u = dout.astype(F32) * branch.astype(F32)
    if scale is not None:
        grads["scale"] = (u * ss.astype(F32)[:, None, None] if ss is not None else u).sum((0, 1))
    if ss is not None:
        grads["sample_scale"] = (u * scale.astype(F32) if scale is not None else u).sum((1, 2))


def _norm_backward(g: Array, x: Array, dout: Array, nw: Optional[Array], mean, rstd,
                   norm: str) -> Tuple[Array, Array, Array]:
    """(dx, dnorm_weight, dnorm_bias) from g = dL/dN(x) (B·S, C; fp32 or the weights' dtype) and the
    residual's dout."""
    if norm == "layernorm":
        return layer_norm_backward(g, x, dout, mean, rstd, nw)
    B, S, C = x.shape
    g3 = g.reshape(B, S, C).astype(F32)
    w = nw.astype(F32) if nw is not None else 1.0
    dx = (dout.astype(F32) + g3 * w).astype(x.dtype)
    return dx, (g3 * x.astype(F32)).sum((0, 1)), g3.sum((0, 1))


def _pad_columns(w: Array, width: int) -> Array:
    """token_weights' ``pad_columns`` for jax arrays (row-major: the row stride is the width)."""
    return w if w.shape[1] == width else jnp.pad(w, ((0, 0), (0, width - w.shape[1])))


def token_mixing_forward(x: Array, nw: Optional[Array], nb: Optional[Array], k1: Array, b1: Optional[Array],
                         k2: Optional[Array], b2: Optional[Array], *, eps: float, approximate: str, norm: str,
                         scale: Optional[Array], ss: Optional[Array], store_branch: bool, precision: str):
    """x (B, S, C), Flax kernels k1 (S, D) and k2 (D, S) or None (one (S, S) linear) →
    (out (B, S, C), mean, rstd (B·S,) fp32 or None, branch (B, S, C) before scale or None)."""
    B, S, C = x.shape
    mean = rstd = None
    if norm == "layernorm":
        mean, rstd = layer_norm_stats(x, eps)
    nwv, nbv = _vec_or(nw, C, 1.0, x.dtype), _vec_or(nb, C, 0.0, x.dtype)
    if B == 0:
        return x, mean, rstd, (x if store_branch else None)
    if k2 is None:
        # ResMLP's per-image (S, S) linear: M = output tokens, N = (image, channel), K = input tokens;
        # the Flax kernel k1[k_in, m_out] read as A[m, k].
        tok = (flat(S, C), split(C, S * C, 1))
        out, branch, _ = fused_matmul(
            k1, (flat(S, 1), flat(S, S)), x, tok, x.shape, x.dtype, tok, S, B * C, S, variant="token_linear",
            precision=precision, b_pro=B_TOKEN_LAYERNORM if norm == "layernorm" else B_AFFINE_N, b_vec=(nwv, nbv),
            b_stats=(mean, rstd) if mean is not None else None, bias=b1, bias_on_m=True,
            store_branch=store_branch, scale=scale, ss=ss, ss_on_n=True, res=x, res_axes=tok,
            approximate=approximate)
        return out, mean, rstd, branch
    D = k1.shape[1]
    w1, w2 = token_weights(k1.T, k2.T, _pad_columns)  # (D, S), (S, D): the torch layout, aligned rows
    plan = launch_plan("token_mlp_fwd", S, D, w1.dtype.itemsize, _capability())
    features = Features(norm=norm, has_b1=b1 is not None, approximate=approximate, precision=precision,
                        idx64=_idx64(x), has_b2=b2 is not None, has_scale=scale is not None, has_ss=ss is not None,
                        store_branch=store_branch)
    out, branch = call(
        token_mlp_fwd_kernel, plan.grid(B, C), fwd_inputs(x, mean, rstd, nwv, nbv, w1, b1, w2, b2, scale, ss),
        [_shape(x.shape, x.dtype), _shape(x.shape if store_branch else (1,), x.dtype)],
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        **launch_constexprs("token_mlp_fwd", plan, features, S, C, D, _strides(x), _strides(x), _strides(w1),
                            _strides(w2), _launch.INTERPRET))
    return out, mean, rstd, (branch if store_branch else None)


def token_mixing_backward(dout: Array, x: Array, nw, nb, k1: Array, b1, k2: Optional[Array], b2, mean, rstd,
                          branch, *, eps: float, approximate: str, norm: str, scale, ss,
                          precision: str) -> Dict[str, Optional[Array]]:
    """Gradients for dout (B, S, C) in Flax layout: keys x, norm_weight, norm_bias, fc1_kernel, fc1_bias,
    fc2_kernel, fc2_bias, and scale / sample_scale when given (``branch``, the forward's, is needed for
    those two only); parameters fp32, the caller casts."""
    B, S, C = x.shape
    grads: Dict[str, Optional[Array]] = {}
    do = _branch_grad(dout, scale, ss)
    nwv, nbv = _vec_or(nw, C, 1.0, x.dtype), _vec_or(nb, C, 0.0, x.dtype)
    _scale_grads(grads, dout, branch, scale, ss)
    tok = (flat(S, C), split(C, S * C, 1))
    if k2 is None:
        # g = Wᵀ · do, the Flax kernel k1[m_in, k_out] read as A[m, k].
        # in the weights' dtype, as the torch launcher (and eager) rounds it
        g = fused_matmul(k1, (flat(S, S), flat(S, 1)), do, tok, (B * S, C), k1.dtype, tok, S, B * C, S,
                         variant="plain", precision=precision).out
        xn_src, b_pro, b_vec = x, B_AFFINE_K, (nwv, nbv)
        if norm == "layernorm":
            # As the torch launcher: normalise once here rather than add a kernel mode (no named model).
            xn_src = (((x.astype(F32) - mean.reshape(B, S, 1)) * rstd.reshape(B, S, 1)) * nwv.astype(F32)
                      + nbv.astype(F32)).astype(x.dtype)
            b_pro, b_vec = B_NONE, None
        # dK[in, out] = Σ_(b,c) N(x)[b, in, c] · do[b, out, c], written straight into Flax layout.
        dk = fused_matmul(do, (flat(S, C), split(C, S * C, 1)), xn_src, (split(C, S * C, 1), flat(S, C)),
                          (S, S), F32, (flat(S, 1), flat(S, S)), S, S, B * C, variant="ln_b",
                          precision=precision, b_pro=b_pro, b_vec=b_vec).out
        grads["fc1_kernel"] = dk
        grads["fc1_bias"] = do.astype(F32).sum((0, 2)) if b1 is not None else None
    else:
        D = k1.shape[1]
        w1, w2 = token_weights(k1.T, k2.T, _pad_columns)  # (D, S), (S, D): the torch layout, aligned rows
        features = Features(norm=norm, has_b1=b1 is not None, approximate=approximate, precision=precision,
                            idx64=_idx64(x))
        inputs = bwd_inputs(x, do, mean, rstd, nwv, nbv, w1, b1, w2)
        strides = (_strides(x), _strides(x), _strides(w1), _strides(w2))
        capability = _capability()
        plan = launch_plan("token_mlp_dx", S, D, w1.dtype.itemsize, capability)
        # g in the weights' dtype, as the torch launcher (and eager) rounds it.
        if B:
            (g,) = call(token_mlp_dx_kernel, plan.grid(B, C), inputs, [_shape((B * S, C), w1.dtype)],
                        num_warps=plan.num_warps, num_stages=plan.num_stages,
                        **launch_constexprs("token_mlp_dx", plan, features, S, C, D, *strides, _launch.INTERPRET))
        else:
            g = jnp.zeros((0, C), w1.dtype)
        plan = launch_plan("token_mlp_dw", S, D, w1.dtype.itemsize, capability)
        grid = plan.dw_grid(B, C, D, _sm_count())
        splits = grid[1]
        dw1 = jnp.zeros((splits, D, S), F32)
        dw2 = jnp.zeros((splits, S, D), F32)
        db1 = jnp.zeros((splits, D), F32)
        meta = launch_constexprs("token_mlp_dw", plan, features, S, C, D, *strides, _launch.INTERPRET)
        for part in plan.parts:  # runs with B = 0 too: it writes the zero gradients
            p1, p2, pb = call(
                token_mlp_dw_kernel, grid, [*inputs, B, splits],
                [_shape(dw1.shape, F32), _shape(dw2.shape, F32), _shape(db1.shape, F32)],
                num_warps=plan.num_warps, num_stages=plan.num_stages, **meta, PART=part)
            # DW1 writes dW1 and db1, DW2 dW2; DW_BOTH all three.
            dw1, db1 = (p1, pb) if part in (DW_BOTH, DW1) else (dw1, db1)
            dw2 = p2 if part in (DW_BOTH, DW2) else dw2
        grads["fc1_kernel"], grads["fc2_kernel"] = dw1.sum(0).T, dw2.sum(0).T
        grads["fc1_bias"] = db1.sum(0) if b1 is not None else None
        grads["fc2_bias"] = do.astype(F32).sum((0, 2)) if b2 is not None else None
    grads["x"], dnw, dnb = _norm_backward(g, x, dout, nw, mean, rstd, norm)
    grads["norm_weight"] = dnw if nw is not None else None
    grads["norm_bias"] = dnb if nb is not None else None
    return grads


# ---------------------------------------------------------------------------------------------------------
# Channel mixing


def _fc1_operands(x: Array, k1: Array, b1, nwv: Array, nbv: Array, stats) -> Tuple[Array, Dict[str, Any]]:
    """channel_mixing.fc1_operands for a Flax kernel k1 (C, D): the weight as the ln_gelu GEMM reads it and
    the arguments that apply the norm, on load or folded (fold_weight_kernel on k1's columns as W's rows:
    W' (D, C), so the GEMM reads it as the torch launcher reads fc1's (D, C) copy)."""
    if ln_placement() != LN_FOLDED or x.dtype != k1.dtype:
        return k1, dict(a_pro=A_LAYERNORM if stats is not None else A_AFFINE, a_stats=stats, a_vec=(nwv, nbv),
                        bias=b1)
    C, D = k1.shape
    grid, meta = fold_launch(D, b1 is not None, _launch.INTERPRET)
    folded, u, v = call(fold_weight_kernel, grid, [k1, nwv, nbv, b1 if b1 is not None else nwv, D, C, 1, D],
                        [_shape((D, C), k1.dtype), _shape((D,), F32), _shape((D,), F32)], **meta)
    if stats is None:
        return folded, dict(a_pro=A_NONE, bias=v)
    return folded, dict(a_pro=A_LAYERNORM_FOLDED, a_stats=stats, a_vec=(u, u), bias=v)


def channel_mixing_forward(x: Array, nw, nb, k1: Array, b1, k2: Array, b2, *, eps: float, approximate: str,
                           norm: str, scale, ss, store_branch: bool, precision: str):
    """x (B, S, C), Flax kernels k1 (C, D), k2 (D, C) → (out (B, S, C), mean, rstd (B·S,) fp32 or None,
    Z (B·S, D) pre-activation, branch (B, S, C) before scale or None)."""
    B, S, C = x.shape
    D = k1.shape[1]
    M = B * S
    mean = rstd = None
    if norm == "layernorm":
        mean, rstd = layer_norm_stats(x, eps)
    nwv, nbv = _vec_or(nw, C, 1.0, x.dtype), _vec_or(nb, C, 0.0, x.dtype)
    tok, ch = split(S, S * C, C), flat(C, 1)
    h_axes = (flat(M, D), flat(D, 1))
    w1, norm_args = _fc1_operands(x, k1, b1, nwv, nbv, (mean, rstd) if mean is not None else None)
    w1_axes = (flat(C, D), flat(D, 1)) if w1 is k1 else (flat(C, 1), flat(D, C))  # k1 (C, D) or W' (D, C)
    hidden, z, _ = fused_matmul(
        x, (tok, ch), w1, w1_axes, (M, D), x.dtype, h_axes, M, D, C, variant="ln_gelu",
        precision=precision, **norm_args, store_branch=True, epi_gelu=True, approximate=approximate)
    out, branch, _ = fused_matmul(
        hidden, h_axes, k2, (flat(D, C), flat(C, 1)), x.shape, x.dtype, (tok, ch), M, C, D, variant="residual",
        precision=precision, bias=b2, store_branch=store_branch, scale=scale, ss=ss, res=x, res_axes=(tok, ch))
    return out, mean, rstd, z, branch


def channel_mixing_backward(dout: Array, x: Array, nw, nb, k1: Array, b1, k2: Array, b2, mean, rstd, z: Array,
                            branch, *, approximate: str, norm: str, scale, ss,
                            precision: str) -> Dict[str, Optional[Array]]:
    """Gradients for dout (B, S, C); keys as token_mixing_backward, Flax layout."""
    B, S, C = x.shape
    D = k1.shape[1]
    M = B * S
    grads: Dict[str, Optional[Array]] = {}
    do = _branch_grad(dout, scale, ss)
    nwv, nbv = _vec_or(nw, C, 1.0, x.dtype), _vec_or(nb, C, 0.0, x.dtype)
    _scale_grads(grads, dout, branch, scale, ss)
    tok, ch = split(S, S * C, C), flat(C, 1)
    h_axes = (flat(M, D), flat(D, 1))
    # dZ = (dO · K2ᵀ) ⊙ GELU'(Z): K2[d, c] read as B[k = c, n = d].
    # fc1's bias gradient as the epilogue's partial column sums of dZ (as the torch launcher).
    dz, _, db1 = fused_matmul(do, (tok, ch), k2, (flat(C, 1), flat(D, C)), (M, D), x.dtype, h_axes, M, D, C,
                              variant="gelu_grad", precision=precision, aux=z, epi_gelu_grad=True,
                              col_sum=b1 is not None, approximate=approximate)
    # g = dZ · K1ᵀ: K1[c, d] read as B[k = d, n = c].
    # g in the weights' dtype, as the torch launcher (and eager) rounds it.
    g = fused_matmul(dz, h_axes, k1, (flat(D, 1), flat(C, D)), (M, C), k1.dtype, (flat(M, C), flat(C, 1)), M, C, D,
                     variant="plain", precision=precision).out
    # dK1[c, d] = Σ_tok N(x)[tok, c] · dZ[tok, d]: computed as (dZᵀ · N(x))[d, c], stored transposed.
    dk1 = fused_matmul(dz, (flat(D, 1), flat(M, D)), x, (tok, ch), (C, D), F32, (flat(D, 1), flat(C, D)),
                       D, C, M, variant="ln_b", precision=precision,
                       b_pro=B_LAYERNORM if norm == "layernorm" else B_AFFINE_N,
                       b_stats=(mean, rstd) if mean is not None else None, b_vec=(nwv, nbv)).out
    # dK2[d, c] = Σ_tok GELU(Z)[tok, d] · dO[tok, c]: (dOᵀ · GELU(Z))[c, d], stored transposed.
    dk2 = fused_matmul(do, (ch, tok), z, h_axes, (D, C), F32, (flat(C, 1), flat(D, C)), C, D, M,
                       variant="gelu_b", precision=precision, b_pro=B_GELU, approximate=approximate).out
    grads["fc1_kernel"], grads["fc2_kernel"] = dk1, dk2
    grads["fc1_bias"] = db1
    grads["fc2_bias"] = do.astype(F32).sum((0, 1)) if b2 is not None else None
    grads["x"], dnw, dnb = _norm_backward(g, x, dout, nw, mean, rstd, norm)
    grads["norm_weight"] = dnw if nw is not None else None
    grads["norm_bias"] = dnb if nb is not None else None
    return grads
