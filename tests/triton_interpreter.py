"""A shortcut in Triton's interpreter for the test suite: triton.language patched once per kernel launch.

conftest.py installs it; a test's subprocess that runs kernels in the interpreter imports this module
(it needs neither torch nor pytest) and installs it too.
"""
from __future__ import annotations

import os

# Triton versions whose interpreter re-patches triton.language on every call of a @triton.jit helper
# (interpreter.py, InterpretedFunction.__call__ -> _patch_lang), and where skipping that is checked to be
# a no-op (the whole suite passes with it).
REPATCHING_INTERPRETERS = ("3.8.",)


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
