"""Which ptxas assembles the Triton kernels (kernels/triton/toolchain.py): never one known to miscompile them.

Fake ptxas binaries (scripts printing a version) stand in for the real ones, so every branch runs on any
machine; one test uses Triton's own cache key to show a new assembler means new cache entries.
"""
from __future__ import annotations

import os
import stat
import sys
import types
from pathlib import Path

import pytest

from conftest import require



def fake_ptxas(folder: Path, version: str) -> str:
    """An executable that answers ``--version`` like ptxas ``version`` ("12.8.93")."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ptxas"
    major_minor = ".".join(version.split(".")[:2])
    path.write_text("#!/bin/sh\n"
                    "echo 'ptxas: NVIDIA (R) Ptx optimizing assembler'\n"
                    f"echo 'Cuda compilation tools, release {major_minor}, V{version}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture
def tc(monkeypatch, tmp_path):
    """toolchain with Triton's bundled ptxas and the other candidates replaced by fakes under tmp_path."""
    require("triton")
    from mixer_fast.kernels.triton import toolchain

    toolchain.version_of.cache_clear()
    monkeypatch.delenv(toolchain.ENV_VAR, raising=False)
    monkeypatch.delenv(toolchain.BLACKWELL_ENV_VAR, raising=False)
    monkeypatch.setattr(toolchain, "_applied", {})
    state = {"bundled": fake_ptxas(tmp_path / "bundled", "12.8.93"), "others": []}
    monkeypatch.setattr(toolchain, "bundled_path", lambda arch: state["bundled"])
    monkeypatch.setattr(toolchain, "candidates", lambda: list(state["others"]))
    toolchain.state = state  # the test's handle on the fakes
    yield toolchain
    del toolchain.state
    toolchain.version_of.cache_clear()


def test_version_parsing(tc, tmp_path):
    assert tc.version_of(fake_ptxas(tmp_path / "a", "13.5.37")) == (13, 5, 37)
    assert tc.version_of(str(tmp_path / "missing")) is None
    assert tc.known_bad((12, 8, 93), 90) and not tc.known_bad((12, 8, 93), 80) and not tc.known_bad((12, 9, 86), 90)
    assert not tc.known_bad((12, 8, 93), 100)  # Blackwell goes through ptxas-blackwell


def test_bundled_ptxas_is_kept_where_it_is_not_known_bad(tc, tmp_path):
    tc.state["bundled"] = fake_ptxas(tmp_path / "b129", "12.9.86")
    chosen = tc.choose(90)
    assert chosen.path == tc.state["bundled"] and chosen.source == "bundled with triton"
    assert tc.apply(90) == chosen and tc.ENV_VAR not in os.environ
    # 12.8 is only known bad on Hopper: on an A100 (no wgmma) Triton's own stays.
    tc.state["bundled"] = fake_ptxas(tmp_path / "b128", "12.8.93")
    assert tc.choose(80).path == tc.state["bundled"]


def test_known_bad_bundled_ptxas_is_replaced_by_the_newest_cuda13_one(tc, tmp_path, monkeypatch):
    tc.state["others"] = [(fake_ptxas(tmp_path / "c129", "12.9.86"), "PATH"),
                          (fake_ptxas(tmp_path / "c130", "13.0.88"), "the CUDA toolkit in /usr/local/cuda"),
                          (fake_ptxas(tmp_path / "c135", "13.5.37"), "the nvidia-cuda-nvcc wheel (mixer_fast[gpu])")]
    chosen = tc.choose(90)
    assert chosen.version == (13, 5, 37) and chosen.source.startswith("the nvidia-cuda-nvcc wheel")
    assert "replaces Triton's bundled ptxas (12.8.93), which builds wgmma shared-memory descriptors" in chosen.why
    monkeypatch.setenv(tc.ENV_VAR, "")  # restored by monkeypatch after apply() sets it
    monkeypatch.delenv(tc.ENV_VAR)
    assert tc.apply(90) == chosen and os.environ[tc.ENV_VAR] == chosen.path
    # What apply() set is reported as chosen (mixer-fast info after the backend loaded), not as the user's.
    assert tc.choose(90) == chosen and tc.apply(90) == chosen
    # 12.9 alone is not taken as a replacement (its own wgmma hazard, fixed in 13.3).
    monkeypatch.delenv(tc.ENV_VAR)
    tc.state["others"] = tc.state["others"][:1]
    with pytest.raises(tc.ToolchainProblem, match=r"no CUDA >= 13\.0 ptxas was found to replace it; "
                                                  r"pip install \"mixer_fast\[gpu\]\""):
        tc.choose(90)


def test_the_other_ptxas_binaries_are_listed_once_each(tc, tmp_path):
    # mixer-fast info lists them: XLA assembles jax-triton's PTX with a ptxas of its own finding, which must
    # be at least as new as the one Triton wrote the PTX for.
    c130 = fake_ptxas(tmp_path / "c130", "13.0.88")
    c135 = fake_ptxas(tmp_path / "c135", "13.5.37")
    (tmp_path / "link").mkdir()
    os.symlink(c130, tmp_path / "link" / "ptxas")
    tc.state["others"] = [(c135, "the nvidia-cuda-nvcc wheel (mixer_fast[gpu])"),
                          (c130, "the CUDA toolkit in /usr/local/cuda"),
                          (str(tmp_path / "link" / "ptxas"), "PATH")]
    chosen = tc.choose(90)
    assert chosen.path == c135
    assert tc.others(chosen, 90) == [(tc.state["bundled"], (12, 8, 93), "bundled with triton"),
                                     (c130, (13, 0, 88), "the CUDA toolkit in /usr/local/cuda")]
    tc.state["bundled"] = fake_ptxas(tmp_path / "b129", "12.9.86")
    chosen = tc.choose(90)
    assert chosen.source == "bundled with triton"
    assert [p for p, _, _ in tc.others(chosen, 90)] == [c135, c130]


def test_a_missing_bundled_ptxas_is_replaced_too(tc, tmp_path):
    # Some builds of triton ship without one: the other ptxas binaries are tried as for a known-bad one.
    tc.state["bundled"] = str(tmp_path / "no-ptxas")
    tc.state["others"] = [(fake_ptxas(tmp_path / "c130", "13.0.88"), "/usr/local/cuda")]
    chosen = tc.choose(90)
    assert chosen.version == (13, 0, 88) and "bundled ptxas (missing), which does not run" in chosen.why


def test_a_path_the_user_set_is_never_overridden(tc, tmp_path, monkeypatch):
    good = fake_ptxas(tmp_path / "u", "13.0.88")
    monkeypatch.setenv(tc.ENV_VAR, good)
    tc.state["others"] = [(fake_ptxas(tmp_path / "c135", "13.5.37"), "wheel")]
    chosen = tc.choose(90)
    assert chosen.path == good and chosen.source == "TRITON_PTXAS_PATH (set by the user)"
    assert tc.apply(90) == chosen and os.environ[tc.ENV_VAR] == good
    # Known bad where the user points: refuse (the backend does not load) rather than crash on the GPU.
    monkeypatch.setenv(tc.ENV_VAR, fake_ptxas(tmp_path / "u128", "12.8.93"))
    with pytest.raises(tc.ToolchainProblem, match="TRITON_PTXAS_PATH points to ptxas 12.8.93, which builds wgmma"):
        tc.choose(90)
    monkeypatch.setenv(tc.ENV_VAR, str(tmp_path / "nothing"))
    with pytest.raises(tc.ToolchainProblem, match="does not run as a ptxas"):
        tc.choose(90)


def test_wheel_ptxas_is_found(tmp_path, monkeypatch):
    # The gpu extra's nvidia-cuda-nvcc (CUDA 13) installs nvidia/cu13/bin/ptxas into the nvidia namespace package.
    require("triton")
    from mixer_fast.kernels.triton import toolchain

    fake_ptxas(tmp_path / "site" / "nvidia" / "cu13" / "bin", "13.5.37")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    assert str(tmp_path / "site" / "nvidia" / "cu13" / "bin" / "ptxas") in toolchain.wheel_paths()


def test_backend_refuses_to_load_without_a_safe_ptxas(tc, monkeypatch):
    # On a Hopper GPU with triton 3.6 and no CUDA 13 ptxas, the torch backend says why and how to fix it; the
    # automatic choice then runs the reference. (Simulated: no GPU here.)
    torch = require("torch")
    from mixer_fast import dispatch
    from mixer_fast.kernels.triton import _launch
    from mixer_fast.torch import triton_backend

    monkeypatch.setattr(_launch, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(dispatch.BackendUnavailable, match=r"on NVIDIA H200: the ptxas bundled with this triton "
                                                          r"\(12\.8\.93\) builds wgmma .*mixer_fast\[gpu\]"):
        triton_backend.load()


def test_a_new_assembler_means_new_cache_entries(tc, tmp_path):
    # Triton keys compiled kernels on backend.hash(), which holds the ptxas version: once apply() switches
    # assemblers, cubins made by the bad one are not found any more. Its memo of the version is cleared.
    require("triton")
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget

    os.environ.pop(tc.ENV_VAR, None)
    bad = nvidia.CUDABackend(GPUTarget("cuda", 90, 32)).hash()
    tc.state["others"] = [(fake_ptxas(tmp_path / "c135", "13.5.37"), "wheel")]
    try:
        tc.apply(90)
        good = nvidia.CUDABackend(GPUTarget("cuda", 90, 32)).hash()
    finally:
        os.environ.pop(tc.ENV_VAR, None)
        nvidia.get_ptxas_version.cache_clear()
    assert bad != good and "13.5" in good


@pytest.fixture
def xla(tc, monkeypatch, tmp_path):
    """tc, with XLA's search for the ptxas that assembles jax-triton's kernels confined to tmp_path: the working
    directory, PATH (``xla.path``: folders, first first), the CUDA roots and no jaxlib plugin."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tc, "XLA_CUDA_ROOTS", (str(tmp_path / "usr-local-cuda"),))
    monkeypatch.setattr(tc, "XLA_PLUGINS", ())
    folders = []

    def set_path(*paths):
        folders[:] = [os.path.dirname(p) for p in paths]
        monkeypatch.setenv("PATH", os.pathsep.join(folders + [str(tmp_path / "empty")]))

    set_path()
    tc.set_xla_path = set_path
    yield tc
    del tc.set_xla_path


def test_xla_finds_its_ptxas_as_xla_does(xla, tmp_path, monkeypatch):
    # jaxlib's CUDA plugins assemble jax-triton's PTX with stream_executor's FindCudaExecutable: ./bin/ptxas,
    # then PATH, then the CUDA roots and the nvidia-cuda-nvcc wheel beside the plugin; the first with a
    # release >= 11.8 that is not 12.3.103 wins (not the newest, unlike the torch backend's choice).
    assert xla.xla_ptxas() is None
    root = fake_ptxas(tmp_path / "usr-local-cuda" / "bin", "13.5.37")
    xla.version_of.cache_clear()  # it remembers that nothing ran there
    assert xla.xla_ptxas().path == root
    old, excluded = fake_ptxas(tmp_path / "p117", "11.7.99"), fake_ptxas(tmp_path / "p123", "12.3.103")
    on_path = fake_ptxas(tmp_path / "p130", "13.0.88")
    xla.set_xla_path(old, excluded, on_path)
    found = xla.xla_ptxas()
    assert (found.path, found.version, found.source) == (on_path, (13, 0, 88), "PATH")
    fake_ptxas(tmp_path / "work" / "bin", "12.9.86")
    xla.version_of.cache_clear()
    assert xla.xla_ptxas().source == "bin/ptxas under the working directory"
    # The wheel beside jaxlib's plugin: site-packages/nvidia/cu13/bin/ptxas for jax_cuda13_plugin.
    site = tmp_path / "site"
    (site / "fake_cuda13_plugin").mkdir(parents=True)
    (site / "fake_cuda13_plugin" / "__init__.py").write_text("")
    wheel = fake_ptxas(site / "nvidia" / "cu13" / "bin", "13.5.37")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(xla, "XLA_PLUGINS", (("fake_cuda13_plugin", "cu13"),))
    assert (wheel, f"{site / 'nvidia' / 'cu13'}, beside fake_cuda13_plugin") in xla.xla_search_paths()
    assert xla.xla_search_paths().index((on_path, "PATH")) < len(xla.xla_search_paths()) - 5


def test_jax_triton_ptx_is_written_for_xlas_ptxas(xla, tmp_path, monkeypatch):
    # Triton writes PTX for its ptxas's release (13.5: PTX ISA 9.5); XLA's 13.0 would reject it
    # ("Unsupported .version"), so for the JAX backend Triton takes XLA's ptxas. The torch backend, loaded in
    # the same process afterwards, keeps that choice (it passed the known-bad check).
    wheel = fake_ptxas(tmp_path / "c135", "13.5.37")
    xla.state["others"] = [(wheel, "the nvidia-cuda-nvcc wheel (mixer_fast[gpu])")]
    assert xla.choose(90).path == wheel
    on_path = fake_ptxas(tmp_path / "p130", "13.0.88")
    xla.set_xla_path(on_path)
    triton_ptxas, xla_ptxas = xla.choose_for_jax(90)
    assert xla_ptxas.path == on_path and triton_ptxas.path == on_path and triton_ptxas.version == (13, 0, 88)
    assert triton_ptxas.source == "XLA's ptxas (PATH)"
    assert "ptxas 13.5.37, the nvidia-cuda-nvcc wheel (mixer_fast[gpu]), would write PTX XLA's cannot read" \
        in triton_ptxas.why
    monkeypatch.setenv(xla.ENV_VAR, "")  # restored by monkeypatch after apply_for_jax() sets it
    monkeypatch.delenv(xla.ENV_VAR)
    assert xla.apply_for_jax(90) == (triton_ptxas, xla_ptxas) and os.environ[xla.ENV_VAR] == on_path
    assert xla.choose(90) == triton_ptxas and xla.apply(90) == triton_ptxas
    # After the torch backend chose the wheel's 13.5 in this process, the JAX backend still switches.
    monkeypatch.setattr(xla, "_applied", {})
    monkeypatch.delenv(xla.ENV_VAR)
    assert xla.apply(90).path == wheel and os.environ[xla.ENV_VAR] == wheel
    assert xla.apply_for_jax(90)[0].path == on_path and os.environ[xla.ENV_VAR] == on_path
    # XLA's as new as Triton's: nothing changes.
    monkeypatch.setattr(xla, "_applied", {})
    monkeypatch.delenv(xla.ENV_VAR)
    xla.set_xla_path(fake_ptxas(tmp_path / "p135", "13.5.37"))
    assert xla.choose_for_jax(90)[0].path == wheel


def test_jax_triton_refuses_what_xla_cannot_assemble_safely(xla, tmp_path, monkeypatch):
    xla.state["bundled"] = fake_ptxas(tmp_path / "b129", "12.9.86")
    with pytest.raises(xla.ToolchainProblem, match=r"XLA finds no ptxas to assemble jax-triton's kernels .*"
                                                   r"pip install \"mixer_fast\[gpu\]\""):
        xla.choose_for_jax(90)
    # XLA's first ptxas is the one that miscompiles the token kernels: XLA would assemble them with it.
    bad = fake_ptxas(tmp_path / "p128", "12.8.93")
    xla.set_xla_path(bad, fake_ptxas(tmp_path / "p135", "13.5.37"))
    with pytest.raises(xla.ToolchainProblem, match=rf"first ptxas it finds, 12\.8\.93 at {bad} \(PATH\), which "
                                                   r"builds wgmma .* first on PATH"):
        xla.choose_for_jax(90)
    assert xla.choose_for_jax(80)[1].path == bad  # only known bad on Hopper
    # A TRITON_PTXAS_PATH the user set is never overridden: newer than XLA's, the JAX backend refuses.
    xla.set_xla_path(fake_ptxas(tmp_path / "p130", "13.0.88"))
    user = fake_ptxas(tmp_path / "u135", "13.5.37")
    monkeypatch.setenv(xla.ENV_VAR, user)
    with pytest.raises(xla.ToolchainProblem, match=r"TRITON_PTXAS_PATH points to ptxas 13\.5\.37, so Triton writes "
                                                   r"PTX for that release, which XLA's ptxas \(13\.0\.88 .*unset it"):
        xla.choose_for_jax(90)
    monkeypatch.setenv(xla.ENV_VAR, fake_ptxas(tmp_path / "u129", "12.9.86"))
    assert xla.apply_for_jax(90)[0].source == "TRITON_PTXAS_PATH (set by the user)"


def test_jax_backend_refuses_to_load_where_xla_would_miscompile(xla, tmp_path, monkeypatch):
    # On a Hopper GPU whose first ptxas on PATH is 12.8 (simulated: no GPU here), the JAX triton backend does
    # not load, and says why and how to fix it; with a good one it names both assemblers.
    jax = require("jax")
    require("torch")
    from mixer_fast import dispatch
    from mixer_fast.jax import triton_backend
    from mixer_fast.kernels.triton import _launch

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda: [types.SimpleNamespace(device_kind="NVIDIA H200")])
    monkeypatch.setattr(_launch, "INTERPRET", False)
    monkeypatch.setattr(triton_backend, "_import_jax_triton", lambda: None)
    monkeypatch.setattr(triton_backend, "_capability", lambda device: 90)
    xla.set_xla_path(fake_ptxas(tmp_path / "p128", "12.8.93"))
    with pytest.raises(dispatch.BackendUnavailable, match=r"on NVIDIA H200: XLA assembles jax-triton's kernels with "
                                                          r"the first ptxas it finds, 12\.8\.93"):
        triton_backend.load()
    monkeypatch.setenv(xla.ENV_VAR, "")
    monkeypatch.delenv(xla.ENV_VAR)
    xla.state["others"] = [(fake_ptxas(tmp_path / "c135", "13.5.37"), "wheel")]
    xla.set_xla_path(fake_ptxas(tmp_path / "p130", "13.0.88"))
    detail = triton_backend.load().detail
    assert f"PTX written for ptxas 13.0.88 (XLA's ptxas (PATH)), assembled by XLA's ptxas 13.0.88 at " \
           f"{tmp_path / 'p130' / 'ptxas'} (PATH)" in detail, detail


def test_jax_triton_takes_xlas_ptxas_where_triton_finds_no_replacement(xla, tmp_path, monkeypatch):
    # Bundled 12.8 on Hopper and no CUDA 13 ptxas among the torch backend's candidates, but XLA finds a safe
    # one (in a place only XLA looks, say): XLA's assembles the kernels, so Triton writes PTX for it.
    xla.set_xla_path(fake_ptxas(tmp_path / "p129", "12.9.86"))
    with pytest.raises(xla.ToolchainProblem):
        xla.choose(90)
    triton_ptxas, xla_ptxas = xla.choose_for_jax(90)
    assert triton_ptxas.path == xla_ptxas.path and triton_ptxas.version == (12, 9, 86)
    assert "no other ptxas safe for these kernels was found" in triton_ptxas.why
    # A user's known-bad TRITON_PTXAS_PATH still refuses.
    monkeypatch.setenv(xla.ENV_VAR, fake_ptxas(tmp_path / "u128", "12.8.93"))
    with pytest.raises(xla.ToolchainProblem, match="TRITON_PTXAS_PATH points to ptxas 12.8.93"):
        xla.choose_for_jax(90)
