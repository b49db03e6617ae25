"""Shared fixtures. Optional stacks (timm, …) skip only outside CI: with CI=true a missing one fails."""
from __future__ import annotations

import importlib
import os

import torch

# Triton's interpreter must be chosen before triton is first imported (it rewrites Triton's own jit
# functions too): on a machine without CUDA the triton backend is tested in it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Triton's interpreter as the suite runs it (the suite's time): triton.language patched once per launch, not
# on every helper call; the int32 overflow check, which it computes and never asserts, computed and
# asserted only in tests marked int32_overflow_checked (triton_interpreter.py).
import triton_interpreter  # noqa: E402

triton_interpreter.set_up()


@pytest.fixture(autouse=True)
def _int32_overflow_check(request):
    if request.node.get_closest_marker("int32_overflow_checked") is None:
        yield
        return
    with triton_interpreter.int32_overflow_checked():
        yield


def pytest_collection_modifyitems(config, items):
    # Tests marked gpu need CUDA hardware (not an installable stack): they skip without it, in CI too,
    # and run on a lent GPU (bench/gpu_suite.sh runs the whole suite there).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by bench/gpu_suite.sh on a lent one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require(module: str):
    """Import an optional dependency: skip the test without it, except in CI where it must be there."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"{module} is required in CI but cannot be imported: {e}")
        pytest.skip(f"{module} not installed: {e}")


def env_without_mixer_fast() -> dict:
    """This process's environment without mixer_fast's variables, for a subprocess that must see mixer_fast's
    defaults (MIXER_FAST_TMA=0 inherited would drop the TMA configs a test counts)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MIXER_FAST_")}


@pytest.fixture
def timm():
    return require("timm")


@pytest.fixture
def triton_backend(monkeypatch):
    """The loaded triton backend with output poisoning on (skip without triton, except in CI)."""
    require("triton")
    from mixer_fast import dispatch
    from mixer_fast.kernels.triton import _launch

    monkeypatch.setattr(_launch, "POISON", True)
    return dispatch.load("triton")


@pytest.fixture
def cpu_backend():
    """The loaded cpu backend (the C++ extension; skip without it, except in CI where it must load)."""
    from mixer_fast import dispatch

    try:
        return dispatch.load("cpu")
    except dispatch.BackendUnavailable as e:
        if IN_CI:
            pytest.fail(f"the cpu backend must load in CI: {e}")
        pytest.skip(str(e))


TORCH_BACKENDS = ["reference", "triton", "cpu"]


def use_backend(request, name: str) -> str:
    """Make torch backend ``name`` usable in this test (its fixture) and return the name."""
    if name in ("triton", "cpu"):
        request.getfixturevalue(f"{name}_backend")
    return name


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("MIXER_FAST_BACKEND", raising=False)


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so no bias, norm or head keeps its (often zero or one) init,
    which would hide a wrong term."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return module


def grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.fixture
def cublas_engine(monkeypatch):
    """Every GEMM of channel and token mixing on the cuBLAS engine (MIXER_FAST_GEMM=cublas and
    MIXER_FAST_TOKEN=cublas; kernels/triton/cublas_engine.py), with the fused GEMM and the flash-MLP kernels
    made to fail if anything still launches them."""
    from mixer_fast.kernels.triton import channel_mixing, token_mixing

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("a flash-MLP kernel ran on the cuBLAS engine")

    def refuse(*args, **kwargs):
        raise AssertionError("the fused GEMM ran on the cuBLAS engine")

    monkeypatch.setenv("MIXER_FAST_GEMM", "cublas")
    monkeypatch.setenv("MIXER_FAST_TOKEN", "cublas")
    for name in ("token_mlp_fwd_kernel", "token_mlp_dx_kernel", "token_mlp_dw_kernel"):
        monkeypatch.setattr(token_mixing, name, Refuse())
    for module in (channel_mixing, token_mixing):
        monkeypatch.setattr(module, "fused_matmul", refuse)


def spy_ln_gelu_prologues(monkeypatch, module) -> list:
    """The A prologue (a_pro) of every ln_gelu GEMM that ``module`` (a launcher module: channel_mixing,
    spatial_gating, jax_launch) launches through its ``fused_matmul``, in order: which LayerNorm placement ran."""
    seen = []
    real = module.fused_matmul

    def spy(*args, variant, a_pro=0, **kw):
        if variant == "ln_gelu":
            seen.append(a_pro)
        return real(*args, variant=variant, a_pro=a_pro, **kw)

    monkeypatch.setattr(module, "fused_matmul", spy)
    return seen
