"""The test suite's shortcut in Triton's interpreter (triton_interpreter.py): in place where it is meant to be,
and a kernel calling @triton.jit helpers computes the same with it as without."""
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
                    f"triton.language on each helper call, then add the version to conftest's "
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
