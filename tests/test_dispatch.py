"""Backend registry and choice: argument > MIXER_FAST_BACKEND > best available; explicit failures raise."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

import mixer_fast
from conftest import IN_CI, require
from mixer_fast import dispatch


def test_available_backends_lists_only_what_loads():
    require("triton")
    # triton loads everywhere: compiled with a CUDA device, else in Triton's interpreter.
    assert mixer_fast.available_backends() in (["triton", "cpu", "reference"], ["triton", "reference"])
    require("jax")
    assert mixer_fast.available_backends("jax") == ["pallas", "triton", "xla"]
    with pytest.raises(ValueError, match=r"framework: expected one of \['torch', 'jax'\], got 'tf'"):
        mixer_fast.available_backends("tf")


def test_status_gives_reasons():
    rows = {(s.framework, s.name): (ok, reason) for s, ok, reason in dispatch.status()}
    assert rows[("torch", "reference")] == (True, "plain eager PyTorch (mixer_fast.reference), any device")
    require("triton")
    assert rows[("torch", "triton")][0] and "Triton" in rows[("torch", "triton")][1]
    ok, reason = rows[("torch", "cpu")]
    assert ok and "C++" in reason or not ok and "mixer_fast._C is not built" in reason, reason
    assert rows[("jax", "triton")][0] and "Triton" in rows[("jax", "triton")][1]


def test_automatic_choice_for_cpu_tensors():
    # The interpreter is for testing: CPU tensors never pick triton unless asked to. The C++ kernels (built in
    # CI) serve float32, and bfloat16 unless the CPU multiplies bf16 natively (oneDNN is faster there); the
    # rest, and autocast, go to the reference.
    try:
        cpu = dispatch.load("cpu")
    except dispatch.BackendUnavailable:
        assert not IN_CI
        cpu = None
    fast = "cpu" if cpu else "reference"
    assert dispatch.choose("torch", "cpu", needs=("float32",)).name == fast
    bf16 = "reference" if cpu is None or "bfloat16" not in cpu.auto_features else "cpu"
    if cpu is not None:
        from mixer_fast import _C
        assert ("bfloat16" in cpu.auto_features) == (not _C.native_bf16_matmul())
    assert dispatch.choose("torch", "cpu", needs=("bfloat16",)).name == bf16
    for needs in (("float64",), ("float16",), ("autocast", "float32"), ("dropout", "float32")):
        assert dispatch.choose("torch", "cpu", needs=needs).name == "reference"
    if cpu is not None:  # asked for by name it runs bf16 anywhere
        assert dispatch.choose("torch", "cpu", "cpu", needs=("bfloat16",)) is cpu


def test_explicit_choice_raises_saying_why(monkeypatch):
    # A backend that failed to load (here: as if the C++ extension had not been built) says why when asked for.
    monkeypatch.delitem(dispatch._loaded, ("torch", "cpu"), raising=False)
    monkeypatch.setitem(dispatch._failed, ("torch", "cpu"), "the C++ extension mixer_fast._C is not built (no g++)")
    with pytest.raises(dispatch.BackendUnavailable,
                       match="backend 'cpu' \\(torch\\) is unavailable: the C\\+\\+ extension .* \\(no g\\+\\+\\)"):
        dispatch.choose("torch", "cpu", "cpu")
    with pytest.raises(ValueError, match="backend: 'cpu' runs on cpu tensors, but the input is on cuda"):
        dispatch.choose("torch", "cuda", "cpu")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.requested_backend(None, "torch") == "reference"
    assert dispatch.requested_backend("triton", "torch") == "triton"  # the argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, "pallas")  # a JAX backend: torch ignores it
    assert dispatch.requested_backend(None, "torch") is None
    assert dispatch.requested_backend(None, "jax") == "pallas"
    monkeypatch.setenv(dispatch.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="MIXER_FAST_BACKEND: expected one of .* or unset, got 'cudnn'"):
        dispatch.requested_backend(None, "torch")
    monkeypatch.setenv(dispatch.ENV_VAR, "  ")
    assert dispatch.requested_backend(None, "torch") is None


@pytest.fixture
def fake_backend(monkeypatch):
    """A loadable 'triton' without dropout, in place of the real (unbuilt) module."""
    module = types.ModuleType("fake_triton_backend")
    module.load = lambda: types.SimpleNamespace(name="triton", features=frozenset())
    monkeypatch.setitem(sys.modules, "mixer_fast.torch.triton_backend", module)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    return module


def test_needs_are_checked(fake_backend):
    assert dispatch.choose("torch", "cuda").name == "triton"
    # Automatic: a backend lacking a needed feature is passed over.
    assert dispatch.choose("torch", "cuda", needs={"dropout"}).name == "reference"
    # Explicit: it is an error, not a silent fallback.
    with pytest.raises(NotImplementedError, match="backend 'triton' does not support dropout"):
        dispatch.choose("torch", "cuda", "triton", needs={"dropout"})


def test_missing_dependency_reason(monkeypatch):
    def load():
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    module = types.ModuleType("broken")
    module.load = load
    monkeypatch.setitem(sys.modules, "mixer_fast.torch.triton_backend", module)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    with pytest.raises(dispatch.BackendUnavailable, match="unavailable: triton is not installed"):
        dispatch.load("triton")
    assert "triton" not in dispatch.available_backends()


def test_import_is_light():
    code = ("import sys, mixer_fast; "
            "heavy = [m for m in ('torch', 'triton', 'jax', 'timm', 'mixer_fast._C') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_interpreter_refuses_a_known_broken_triton_numpy_pair(monkeypatch):
    # triton 3.6's interpreter int()s 1-element arrays, an error since numpy 2.4: 136 tests failed with
    # "only 0-dimensional arrays can be converted" on that pair; the backend now says why instead.
    require("triton")
    import numpy
    import triton

    from mixer_fast.kernels.triton import _launch

    monkeypatch.setattr(_launch, "INTERPRET", True)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "install numpy<2.4 or triton>=3.8" in _launch.interpreter_problem()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert _launch.interpreter_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.5")
    assert _launch.interpreter_problem() is None
    monkeypatch.setattr(_launch, "INTERPRET", False)  # compiled kernels: numpy is not involved
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert _launch.interpreter_problem() is None
