"""Backend registry and choice: argument > MIXER_FAST_BACKEND > best available; explicit failures raise."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

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


def test_automatic_choice_for_cpu_tensors(monkeypatch):
    # The interpreter is for testing: CPU tensors never pick triton unless asked to. The C++ kernels run only
    # where the table of measured wins has them for this CPU class, op, mode and dtype; the rest, and
    # autocast, go to the reference.
    from mixer_fast import wins

    try:
        cpu = dispatch.load("cpu")
    except dispatch.BackendUnavailable:
        assert not IN_CI
        cpu = None
    fwd = dict(op="token_mixing", mode="forward")
    for dtype in ("float32", "bfloat16"):
        want = "cpu" if cpu and wins.is_win("torch", "cpu", cpu.device_class(), "token_mixing", "forward", dtype) \
            else "reference"
        assert dispatch.choose("torch", "cpu", needs=(dtype,), dtype=dtype, **fwd).name == want
    if cpu is None:
        return
    # On an AVX2 CPU without native bf16 matmuls the table has bf16 inference (8x eager on a Zen 3), not fp32
    # (0.73-1.16x there), and never training (which runs the reference ops anyway).
    monkeypatch.setattr(cpu, "device_class", lambda index=None: "avx2")
    assert dispatch.choose("torch", "cpu", needs=("bfloat16",), dtype="bfloat16", **fwd) is cpu
    assert dispatch.choose("torch", "cpu", needs=("float32",), dtype="float32", **fwd).name == "reference"
    assert dispatch.choose("torch", "cpu", needs=("bfloat16",), op="token_mixing", mode="training",
                           dtype="bfloat16").name == "reference"
    assert dispatch.choose("torch", "cpu", needs=("bfloat16",), dtype="bfloat16", op="channel_mixing",
                           mode=None).name == "reference"  # mode unknown: it must win both
    assert dispatch.choose("torch", "cpu", needs=("bfloat16",)).name == "reference"  # no op given
    monkeypatch.setattr(cpu, "device_class", lambda index=None: "avx512_amx")
    assert dispatch.choose("torch", "cpu", needs=("bfloat16",), dtype="bfloat16", **fwd).name == "reference"
    for needs in (("float64",), ("float16",), ("autocast", "float32"), ("dropout", "float32")):
        assert dispatch.choose("torch", "cpu", needs=needs, dtype=needs[-1], **fwd).name == "reference"
    # asked for by name it runs anywhere, measured or not
    assert dispatch.choose("torch", "cpu", "cpu", needs=("bfloat16",)) is cpu
    # Why it was passed over (seen here with the reference taken out of the registry):
    monkeypatch.setattr(dispatch, "REGISTRY", tuple(s for s in dispatch.REGISTRY if s.name != "reference"))
    with pytest.raises(dispatch.BackendUnavailable, match="no measured win over the reference for token_mixing "
                                                          "forward bf16 on avx512_amx"):
        dispatch.choose("torch", "cpu", needs=("bfloat16",), dtype="bfloat16", **fwd)


def test_ops_choose_by_op_mode_and_dtype(monkeypatch, cpu_backend):
    # ops.py passes the op, the mode (training when a gradient is wanted) and the dtype to the choice.
    from mixer_fast import ops

    calls = []
    choose = dispatch.choose

    def spy(*args, **kw):
        calls.append((kw["op"], kw["mode"], kw["dtype"]))
        return choose(*args, **kw)

    monkeypatch.setattr(dispatch, "choose", spy)
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    w1, w2 = torch.randn(6, 4, dtype=torch.bfloat16), torch.randn(4, 6, dtype=torch.bfloat16)
    ops.token_mixing(x, None, None, w1, None, w2, None)
    ops.channel_mixing(x, None, None, torch.randn(6, 8, dtype=torch.bfloat16), None,
                       torch.randn(8, 6, dtype=torch.bfloat16), None)
    ops.token_mixing(x.float().requires_grad_(), None, None, w1.float(), None, w2.float(), None)
    assert calls == [("token_mixing", "forward", "bfloat16"), ("channel_mixing", "forward", "bfloat16"),
                     ("token_mixing", "training", "float32")]


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
    """A loadable 'triton' without dropout, in place of the real (unbuilt) module, measured as an sm_90 GPU."""
    module = types.ModuleType("fake_triton_backend")
    module.load = lambda: types.SimpleNamespace(name="triton", features=frozenset(),
                                                device_class=lambda index=None: "sm_90")
    monkeypatch.setitem(sys.modules, "mixer_fast.torch.triton_backend", module)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    return module


def test_needs_and_measured_wins_are_checked(fake_backend, monkeypatch):
    from mixer_fast import wins

    kw = dict(op="channel_mixing", mode="forward", dtype="bfloat16")
    # No measured win (the H200 measured 0.50x eager): the reference runs, and the reason is kept.
    assert dispatch.choose("torch", "cuda", **kw).name == "reference"
    monkeypatch.setattr(wins, "_chosen", lambda: {("torch", "triton", "sm_90", "channel_mixing", "forward", "bf16")})
    assert dispatch.choose("torch", "cuda", **kw).name == "triton"
    assert dispatch.choose("torch", "cuda", **dict(kw, mode="training")).name == "reference"
    assert dispatch.choose("torch", "cuda", **dict(kw, dtype="float16")).name == "reference"
    # Automatic: a backend lacking a needed feature is passed over.
    assert dispatch.choose("torch", "cuda", needs={"dropout"}, **kw).name == "reference"
    # Explicit: it is an error, not a silent fallback; and an explicit choice needs no measured win.
    with pytest.raises(NotImplementedError, match="backend 'triton' does not support dropout"):
        dispatch.choose("torch", "cuda", "triton", needs={"dropout"})
    monkeypatch.setattr(wins, "_chosen", lambda: frozenset())
    assert dispatch.choose("torch", "cuda", "triton", **kw).name == "triton"
    with pytest.raises(ValueError, match=r"mode: expected one of \['forward', 'training'\] or None, got 'train'"):
        dispatch.choose("torch", "cuda", **dict(kw, mode="train"))
    with pytest.raises(ValueError, match="op: expected one of .* or None, got 'token'"):
        dispatch.choose("torch", "cuda", **dict(kw, op="token"))


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
