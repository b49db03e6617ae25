"""Install layout: kernels/ is mixer_fast.kernels, never a top-level ``kernels`` module."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _in_fresh_interpreter(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_kernels_install_as_a_subpackage(tmp_path):
    # Run outside the repository, so only what is installed can be found.
    out = _in_fresh_interpreter(
        "import importlib.util, mixer_fast.kernels, mixer_fast.kernels.triton, mixer_fast.kernels.pallas; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(mixer_fast.kernels.__file__); print(spec and spec.origin)", tmp_path)
    kernels_file, top_level = out.splitlines()
    assert Path(kernels_file).resolve().parent.name == "kernels"
    # A top-level `kernels`, if any, must not be ours (it would be the PyPI package of that name).
    assert top_level == "None" or not Path(top_level).resolve().is_relative_to(REPO)


def test_version_and_public_names():
    import mixer_fast

    assert mixer_fast.__version__
    for name in ("MixerBlock", "ResMLPBlock", "convert", "available_backends", "ops", "reference"):
        assert getattr(mixer_fast, name) is not None
    assert callable(mixer_fast.ops.token_mixing) and callable(mixer_fast.ops.channel_mixing)
