"""``mixer-fast roofline`` on this machine: a PNG, a JSON, a table; points under the measured ceilings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import require


def test_roofline_cli_writes_png_and_json(tmp_path):
    require("matplotlib")
    out = tmp_path / "r.png"
    env = dict(os.environ)
    env.pop("MIXER_FAST_BACKEND", None)
    r = subprocess.run([sys.executable, "-m", "mixer_fast", "roofline", "--config", "mixer_s32", "--batch", "4",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "r.json").read_text())
    assert {p["op"] for p in result["points"]} == {"token_mixing", "channel_mixing"}
    assert "token_mixing" in r.stdout and "% bound" in r.stdout
    ceil = result["ceilings"]
    assert ceil["matmul_flops"] > 0 and ceil["copy_bytes"] > 0
    for p in result["points"]:
        bound = min(ceil["matmul_flops"], p["intensity"] * ceil["copy_bytes"])
        # Under the ceilings; 5% allows for timing noise between the ceiling and the op measurements.
        assert 0 < p["achieved"] <= 1.05 * bound, p
        assert p["fraction_of_bound"] == p["achieved"] / bound
