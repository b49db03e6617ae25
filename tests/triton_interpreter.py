"""Triton's interpreter as the test suite runs it: triton.language patched once per kernel launch, and its
int32 overflow check on only where a test asks for it.

conftest.py calls :func:`set_up`; so does a test's subprocess that runs kernels in the interpreter (this
module needs neither torch nor pytest).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

# Triton versions whose interpreter re-patches triton.language on every call of a @triton.jit helper
# (interpreter.py, InterpretedFunction.__call__ -> _patch_lang), and where skipping that is checked to be
# a no-op: 3.8 (the dev pin: the whole suite passes with it) and 3.6 (the lent GPU machines' version, whose
# _patch_lang and helper call are the same code; its triton test files pass with it, bench/NOTES.md).
REPATCHING_INTERPRETERS = ("3.6.", "3.8.")


def set_up() -> None:
    """The suite's interpreter: triton.language patched once per launch, the int32 overflow check not computed."""
    patch_language_once_per_launch()
    set_int32_overflow_check(False)


def patch_language_once_per_launch() -> None:
    """Skip Triton's interpreter re-patching triton.language inside a running kernel.

    The kernel launch patches triton.language for the launch and restores it after. Each call of a
    @triton.jit helper inside the kernel (GELU, the LayerNorm prologues, the dot helpers: thousands per
    test) patched it again, finding every builtin already replaced: ~1.7 ms of inspect.getmembers each, about
    40 % of an interpreter test's time (bench/NOTES.md, "The suite's time"). The skip applies only while
    every triton.language module the helper sees is already patched, so a call outside a launch, or with a
    module the launch did not patch, still patches as before.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if not triton.__version__.startswith(REPATCHING_INTERPRETERS) or not hasattr(interpreter, "_patch_lang"):
        return
    patch_lang = interpreter._patch_lang

    class _Unchanged:
        def restore(self) -> None:
            pass

    def patch_lang_unless_patched(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and not any(tl.core.is_builtin(lang.load) for lang in langs):
            return _Unchanged()
        return patch_lang(fn)

    patch_lang_unless_patched.original = patch_lang
    interpreter._patch_lang = patch_lang_unless_patched


def _builder():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    return builder if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow") else None


def set_int32_overflow_check(on: bool) -> bool:
    """Make the interpreter check every 32-bit integer add, sub and mul for overflow and fail on one (on), or
    not compute the check at all (off); returns whether it was checking (False where there is no interpreter).

    By default Triton's interpreter computes the check (each operand widened to 64 bits, the result
    compared with int32's range) and then drops it: the assert is made only with debug on, which the
    interpreter's options never set. That cost about 40 % of an interpreter test's time for no check
    (bench/NOTES.md, "The suite's time"). So the suite turns it off, and on, with debug so that it
    asserts, where a test is marked int32_overflow_checked: tests/test_interpreter.py runs every kernel
    that way (their index arithmetic does not change with the dtypes and shapes the numerics grids vary).
    """
    builder = _builder()
    if builder is None:
        return False
    was = builder.options.sanitize_overflow and builder.options.debug
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=on, debug=on)
    return was


@contextlib.contextmanager
def int32_overflow_checked() -> Iterator[None]:
    """The interpreter's int32 overflow check on inside the block (see :func:`set_int32_overflow_check`)."""
    was = set_int32_overflow_check(True)
    try:
        yield
    finally:
        set_int32_overflow_check(was)
