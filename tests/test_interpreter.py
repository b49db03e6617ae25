"""Triton's interpreter as the suite runs it (triton_interpreter.py): the once-per-launch patch is in place where
it is meant to be, and a kernel calling @triton.jit helpers computes the same with it as without; the int32
overflow check is off unless asked for, fails on an overflow when on, and every kernel runs under it."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import IN_CI, require
from triton_interpreter import REPATCHING_INTERPRETERS

triton = require("triton")
tl = require("triton.language")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the shortcut is for Triton's interpreter (no CUDA GPU here)")


@triton.jit
def _affine_plus_sum(x):
    return x * 2 + tl.sum(x, axis=0)


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    x = tl.load(x_ptr + offsets)
    tl.store(y_ptr + offsets, _affine_plus_sum(_affine_plus_sum(x)) + tl.sqrt(tl.abs(x)))


def _run():
    x = torch.linspace(-3, 5, 16)
    y = torch.empty_like(x)
    _helpers_kernel[(1,)](x, y, 16)
    return x, y


def test_shortcut_is_installed_on_the_interpreters_it_was_checked_on():
    from triton.runtime import interpreter

    installed = getattr(interpreter._patch_lang, "__name__", "") == "patch_lang_unless_patched"
    if triton.__version__.startswith(REPATCHING_INTERPRETERS):
        assert installed
    elif IN_CI:
        pytest.fail(f"triton {triton.__version__}: check whether its interpreter still re-patches "
                    f"triton.language on each helper call, then add the version to triton_interpreter's "
                    f"REPATCHING_INTERPRETERS (the suite's time depends on it) or remove the shortcut")
    else:
        assert not installed


def test_helpers_compute_the_same_with_and_without_the_shortcut(monkeypatch):
    from triton.runtime import interpreter

    if not hasattr(interpreter._patch_lang, "original"):
        pytest.skip(f"no shortcut on triton {triton.__version__}")
    x, fast = _run()
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.original)
    _, slow = _run()
    inner = x * 2 + x.sum()
    torch.testing.assert_close(fast, inner * 2 + inner.sum() + x.abs().sqrt())
    assert torch.equal(fast, slow)


def test_language_is_restored_after_a_launch():
    # The launch's own patch is undone when it ends, so nothing outside a kernel sees the interpreter's
    # builtins and the next launch patches afresh (the shortcut then applies inside it again).
    _run()
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange)


@triton.jit
def _overflowing_kernel(y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y_ptr + offsets, (offsets + 1) * 1_500_000_000 // 1_000_000)


def test_int32_overflow_check_is_off_by_default_and_on_when_asked():
    from triton_interpreter import int32_overflow_checked

    y = torch.empty(4, dtype=torch.int32)
    _overflowing_kernel[(1,)](y, 4)  # wraps, as a compiled kernel (without debug) would
    with int32_overflow_checked():
        with pytest.raises(Exception, match="overflow"):
            _overflowing_kernel[(1,)](y, 4)
    _overflowing_kernel[(1,)](y, 4)


# Every kernel's index arithmetic under the overflow check at least once: the three blocks, training with
# drop path, on each engine and LayerNorm placement (the per-process choices of kernels/triton).
ENGINES = [{}, {"MIXER_FAST_GEMM": "cublas", "MIXER_FAST_TOKEN": "cublas"}, {"MIXER_FAST_LN": "fold"}]


@pytest.mark.int32_overflow_checked
def test_every_kernel_runs_under_the_int32_overflow_check(triton_backend, monkeypatch):
    import importlib
    import pkgutil

    import mixer_fast
    from mixer_fast.kernels import triton as package
    from triton.runtime import interpreter

    kernel_names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernel_names |= {name for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "fn")}
    assert len(kernel_names) >= 14, kernel_names

    launched = set()
    run_grid = interpreter.GridExecutor.__call__

    def recording(self, *args, **kwargs):
        options = interpreter.interpreter_builder.options
        assert options.sanitize_overflow and options.debug
        launched.add(self.fn.__name__)
        return run_grid(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", recording)
    B, S, C = 2, 16, 32
    for env in ENGINES:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for cls in (mixer_fast.MixerBlock, mixer_fast.ResMLPBlock, mixer_fast.SpatialGatingBlock):
            torch.manual_seed(0)
            block = cls(C, S, drop_path=0.5, backend="triton").train()
            x = torch.randn(B, S, C, requires_grad=True)
            out = block(x)
            out.square().sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), (cls.__name__, env)
        for name in env:
            monkeypatch.delenv(name)
    assert launched >= kernel_names, sorted(kernel_names - launched)
