"""The ``mixer-fast`` command: info and demo (the README's main job), through the installed script."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import mixer_fast
from conftest import IN_CI


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MIXER_FAST_BACKEND", None)
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)


def script() -> str:
    path = shutil.which("mixer-fast") or os.path.join(os.path.dirname(sys.executable), "mixer-fast")
    if not os.path.exists(path):
        if IN_CI:
            pytest.fail("the mixer-fast console script is not installed")
        pytest.skip("mixer-fast console script not installed (pip install -e .)")
    return path


def test_info_lists_every_backend_with_reason():
    r = run(script(), "info")
    assert r.returncode == 0, r.stderr
    lines = {tuple(line.split()[:2]) for line in r.stdout.splitlines() if line.startswith("  ")}
    assert ("reference", "loaded") in lines and ("triton", "loaded") in lines, r.stdout
    assert "Triton's interpreter on CPU tensors" in r.stdout or "compiled Triton kernels" in r.stdout
    assert ("xla", "loaded") in lines and ("pallas", "loaded") in lines, r.stdout
    assert "Triton's interpreter through jax.pure_callback" in r.stdout or "through jax-triton" in r.stdout
    # The C++ extension is built by the install (CI has a compiler); elsewhere it may be missing, with a reason.
    assert ("cpu", "loaded") in lines or ("cpu", "unavailable") in lines and "mixer_fast._C" in r.stdout, r.stdout
    assert "not built yet" not in r.stdout, r.stdout
    # The table of measured wins the automatic choice follows, and the ptxas the Triton kernels would use.
    assert "automatic choice: a fused backend runs only where a committed measurement shows it faster" in r.stdout
    assert "torch cpu on avx2: channel_mixing forward bf16" in r.stdout
    assert "\nptxas for sm_" in r.stdout, r.stdout
    # with jax-triton installed, the ptxas XLA assembles its kernels with (XLA's search runs ./bin/ptxas)
    assert ("\n  jax-triton's kernels: " in r.stdout) == (importlib.util.find_spec("jax_triton") is not None)
    # the choices a GPU measurement makes, and how to override them
    assert "triton channel GEMMs and ResMLP's token linear: fused (MIXER_FAST_GEMM: fused or cublas; default fused)" \
        in r.stdout
    assert ("triton token MLP: flash (MIXER_FAST_TOKEN: flash or cublas; default flash), on the cuBLAS engine "
            "past 256 tokens unless MIXER_FAST_TOKEN=flash is set") in r.stdout


def test_info_names_the_triton_backends_choices_as_overridden(monkeypatch):
    from conftest import require
    from mixer_fast import cli

    require("triton")
    monkeypatch.setenv("MIXER_FAST_GEMM", "cublas")
    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    monkeypatch.setenv("MIXER_FAST_TOKEN", "cublas")
    assert "token linear: cublas (MIXER_FAST_GEMM" in cli._triton_choices_text()
    assert "fc1's LayerNorm fold (MIXER_FAST_LN" in cli._triton_choices_text()
    assert "token MLP: cublas (MIXER_FAST_TOKEN" in cli._triton_choices_text()
    monkeypatch.setenv("MIXER_FAST_GEMM", "x")
    assert "MIXER_FAST_GEMM: expected fused or cublas, got 'x'" in cli._triton_choices_text()


def test_python_dash_m_is_the_same_command():
    r = run(sys.executable, "-m", "mixer_fast", "info")
    assert r.returncode == 0 and "reference  loaded" in r.stdout, r.stdout + r.stderr
    r = run(sys.executable, "-m", "mixer_fast")
    assert r.returncode == 2 and "usage: mixer-fast" in r.stdout


def test_bad_arguments_are_rejected():
    r = run(sys.executable, "-m", "mixer_fast", "demo", "--batch", "0")
    assert r.returncode == 2 and "--batch and --iters must be at least 1" in r.stderr
    r = run(sys.executable, "-m", "mixer_fast", "demo", "--model", "vit_b16", "--no-compile")
    assert r.returncode != 0 and "name: expected one of" in r.stderr
    r = run(sys.executable, "-m", "mixer_fast", "report", "--jobs", "0")
    assert r.returncode == 2 and "argument --jobs: expected a positive integer, got 0" in r.stderr, r.stderr


def test_demo_small_resmlp():
    r = run(script(), "demo", "--model", "resmlp_12", "--batch", "1", "--iters", "1", "--no-compile")
    assert r.returncode == 0, r.stdout + r.stderr
    # The blocks run where the table of measured wins sends fp32 inference on this CPU (the C++ kernels where
    # they won, else the reference, which the demo then says).
    from mixer_fast import dispatch

    assert "cpu" in mixer_fast.available_backends() or not IN_CI
    label = "/".join(dict.fromkeys(
        dispatch.choose("torch", "cpu", None, ("float32",), op=op, mode="forward", dtype="float32").name
        for op in ("token_mixing", "channel_mixing")))
    assert f"mixer_fast [{label}]" in r.stdout
    assert ("the reference backend runs here" in r.stdout) == (label == "reference")
    assert "OK: mixer_fast logits match" in r.stdout


def test_demo_says_when_only_the_reference_serves():
    r = run(script(), "demo", "--model", "resmlp_12", "--batch", "1", "--iters", "1", "--no-compile",
            "--dtype", "fp16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the reference backend runs here" in r.stdout and "for fp16 inference on this\n      cpu" in r.stdout
    assert "mixer_fast [reference]" in r.stdout


def test_demo_default_is_the_readme_main_job():
    # Exactly what the README's first command runs: Mixer-B/16, eager vs converted vs torch.compile.
    r = run(script(), "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "mixer_b16" in out and "torch.compile (unconverted)" in out and "speed-up" in out
    assert "OK: mixer_fast logits match the unconverted model" in out
