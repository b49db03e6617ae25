"""Backend registry and choice.

A backend is a module exposing ``load()``, which returns an object with the ops (``token_mixing``,
``channel_mixing``) and a ``features`` set (what it can run), optionally an ``auto_features`` subset (what
it can be chosen for automatically), or raises :class:`BackendUnavailable` saying why. A fused backend
(``measured`` in its spec) also has ``device_class(device_index)``, the key it is measured under (``sm_90``,
``avx2``, …). An op beyond those two is a feature of its own name (``"spatial_gating"``): a backend has it
only if it lists it, so one without it is never chosen for it and, asked for by name, raises
NotImplementedError. Loading is lazy and cached, so ``import mixer_fast`` stays light (no triton, jax or C++
extension until first use).

Choice order: the ``backend=`` argument, then the ``MIXER_FAST_BACKEND`` environment variable, then the
first backend in priority order that serves the input's device, is chosen for the features the call needs
(its ``auto_features``) and, if it is a fused backend, has a measured win over the reference for the call's
op, mode, dtype and device class in the shipped table (mixer_fast/wins.py). Where no fused backend has one,
the reference runs: the automatic choice never picks a path slower than the reference on the evidence. An
explicitly requested backend that cannot run raises, saying why; an automatic choice falls through.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import wins  # stdlib only: import mixer_fast stays light

ENV_VAR = "MIXER_FAST_BACKEND"
FRAMEWORKS = ("torch", "jax")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend. ``devices``: the device types it is chosen for automatically, best first in
    ``REGISTRY`` order; ``accepts``: the device types it can run on when asked for by name."""

    name: str
    framework: str
    module: str
    devices: Tuple[str, ...]
    accepts: Tuple[str, ...]
    description: str
    not_built: str  # the reason given while ``module`` is not part of this version
    measured: bool = True  # a fused backend: chosen automatically only where the wins table says it wins


REGISTRY: Tuple[BackendSpec, ...] = (
    BackendSpec("triton", "torch", "mixer_fast.torch.triton_backend", ("cuda",), ("cuda", "cpu"),
                "fused Triton kernels (CUDA tensors; Triton's interpreter for CPU tensors)",
                "not built yet: this version of mixer_fast has no Triton kernels"),
    BackendSpec("cpu", "torch", "mixer_fast.torch.cpu_backend", ("cpu",), ("cpu",),
                "fused C++ kernels (mixer_fast._C, CPU tensors)",
                "not built yet: this version of mixer_fast has no C++ extension (mixer_fast._C)"),
    BackendSpec("reference", "torch", "mixer_fast.torch.reference_backend", ("cpu", "cuda", "mps", "xpu", "meta"),
                ("*",), "plain eager PyTorch (mixer_fast.reference), any device",
                "missing: mixer_fast.torch.reference_backend is part of every install", measured=False),
    BackendSpec("pallas", "jax", "mixer_fast.jax.pallas_backend", ("tpu",), ("tpu", "cpu"),
                "Pallas kernels (TPU Mosaic; interpret mode on CPU)",
                "not built yet: this version of mixer_fast has no Pallas kernels"),
    BackendSpec("triton", "jax", "mixer_fast.jax.triton_backend", ("gpu",), ("gpu", "cpu"),
                "the Triton kernels through jax-triton (GPU; Triton's interpreter on CPU)",
                "not built yet: this version of mixer_fast has no jax-triton path"),
    BackendSpec("xla", "jax", "mixer_fast.jax.xla_backend", ("tpu", "gpu", "cpu"), ("*",),
                "plain jax.numpy reference compiled by XLA",
                "not built yet: this version of mixer_fast has no JAX reference", measured=False),
)

_lock = threading.Lock()
_loaded: Dict[Tuple[str, str], Any] = {}
_failed: Dict[Tuple[str, str], str] = {}


def backend_names(framework: str = "torch") -> List[str]:
    """Every registered backend name of ``framework``, whether or not it can run here."""
    _check_framework(framework)
    return [s.name for s in REGISTRY if s.framework == framework]


def get_spec(name: str, framework: str = "torch") -> BackendSpec:
    """The registry entry; ValueError naming the known backends for an unknown name."""
    _check_framework(framework)
    for spec in REGISTRY:
        if spec.framework == framework and spec.name == name:
            return spec
    raise ValueError(f"backend: expected one of {backend_names(framework)} for {framework}, got {name!r}")


def load(name: str, framework: str = "torch") -> Any:
    """The loaded backend object; raises :class:`BackendUnavailable` with the reason if it cannot run."""
    spec = get_spec(name, framework)
    key = (framework, name)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        if key in _failed:
            raise BackendUnavailable(f"backend {name!r} ({framework}) is unavailable: {_failed[key]}")
        try:
            try:
                impl = importlib.import_module(spec.module).load()
            except ModuleNotFoundError as e:
                # The backend's module itself absent: not part of this version. Something it imports
                # absent (triton, jax, …): a missing optional dependency.
                if e.name == spec.module:
                    raise BackendUnavailable(spec.not_built) from None
                raise BackendUnavailable(f"{e.name} is not installed ({e})") from None
        except BackendUnavailable as e:
            _failed[key] = str(e)
            raise BackendUnavailable(f"backend {name!r} ({framework}) is unavailable: {e}") from None
        _loaded[key] = impl
        return impl


def loaded(name: str, framework: str = "torch") -> Any:
    """A backend that :func:`choose` or :func:`load` has loaded (a plain dict read, traceable by dynamo)."""
    return _loaded[(framework, name)]


def status(framework: Optional[str] = None) -> List[Tuple[BackendSpec, bool, str]]:
    """(spec, loaded, what runs or why not) for every backend, loading each: what ``mixer-fast info`` prints."""
    if framework is not None:
        _check_framework(framework)
    rows = []
    for spec in REGISTRY:
        if framework is not None and spec.framework != framework:
            continue
        try:
            impl = load(spec.name, spec.framework)
            rows.append((spec, True, getattr(impl, "detail", spec.description)))
        except BackendUnavailable as e:
            rows.append((spec, False, str(e).split(": ", 1)[-1]))
    return rows


def available_backends(framework: str = "torch") -> List[str]:
    """Names of the ``framework``'s backends that load on this machine, in preference order."""
    return [spec.name for spec, ok, _ in status(framework) if ok]


def requested_backend(backend: Optional[str], framework: str) -> Optional[str]:
    """The backend named by the argument, else by ``MIXER_FAST_BACKEND``, else None (automatic).

    The environment variable applies to the framework that has a backend of that name, so one value
    (say ``pallas``) does not break the other framework; a name neither framework knows is an error.
    """
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a backend name (str) or None, got {type(backend).__name__}")
        get_spec(backend, framework)
        return backend
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None
    if env in backend_names(framework):
        return env
    if any(env in backend_names(f) for f in FRAMEWORKS):
        return None
    known = sorted({s.name for s in REGISTRY})
    raise ValueError(f"{ENV_VAR}: expected one of {known} or unset, got {env!r}")


def choose(framework: str, device_type: str, backend: Optional[str] = None, needs: Iterable[str] = (), *,
           op: Optional[str] = None, mode: Optional[str] = None, dtype: Optional[str] = None,
           device_index: Optional[int] = None) -> Any:
    """The backend object to run ``op`` in ``mode`` ("forward" or "training"; None: either may follow, so
    both must win) on ``dtype`` data on ``device_type`` (device ``device_index``), needing the ``needs``
    features. Without ``op`` and ``dtype`` no fused backend can show a measured win: the reference runs."""
    if op is not None and op not in wins.OPS:
        raise ValueError(f"op: expected one of {list(wins.OPS)} or None, got {op!r}")
    if mode is not None and mode not in wins.MODES:
        raise ValueError(f"mode: expected one of {list(wins.MODES)} or None, got {mode!r}")
    needs = frozenset(needs)
    name = requested_backend(backend, framework)
    if name is not None:
        spec = get_spec(name, framework)
        if "*" not in spec.accepts and device_type not in spec.accepts:
            raise ValueError(f"backend: {name!r} runs on {'/'.join(spec.accepts)} tensors, "
                             f"but the input is on {device_type}")
        impl = load(name, framework)
        missing = needs - impl.features
        if missing:
            raise NotImplementedError(f"backend {name!r} does not support {', '.join(sorted(missing))}; "
                                      f"use backend='reference' or leave backend unset")
        return impl
    reasons = []
    for spec in REGISTRY:
        if spec.framework != framework or device_type not in spec.devices:
            continue
        try:
            impl = load(spec.name, framework)
        except BackendUnavailable as e:
            reasons.append(str(e))
            continue
        auto = getattr(impl, "auto_features", impl.features)
        if not needs <= auto:
            reasons.append(f"backend {spec.name!r} is not chosen for {', '.join(sorted(needs - auto))}")
            continue
        if spec.measured:
            why = _no_win(framework, spec.name, impl, op, mode, dtype, device_index)
            if why:
                reasons.append(why)
                continue
        return impl
    raise BackendUnavailable(f"no {framework} backend can run on {device_type}: " + "; ".join(reasons))


def _no_win(framework: str, name: str, impl: Any, op: Optional[str], mode: Optional[str], dtype: Optional[str],
            device_index: Optional[int]) -> Optional[str]:
    """Why fused backend ``name`` is not chosen automatically for this call (None: it has a measured win)."""
    if op is None or dtype is None:
        return f"backend {name!r} is chosen only for a known op and dtype (none given)"
    device_class = impl.device_class(device_index)
    modes = (mode,) if mode else wins.MODES
    missing = [m for m in modes if not wins.is_win(framework, name, device_class, op, m, dtype)]
    if missing:
        return (f"backend {name!r} has no measured win over the reference for {op} {'/'.join(missing)} "
                f"{wins.dtype_name(dtype)} on {device_class} (mixer_fast/{wins.TABLE_FILE})")
    return None


def _check_framework(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework: expected one of {list(FRAMEWORKS)}, got {framework!r}")

