"""``mixer-fast report``: every Triton kernel and GPU config compiles for sm_90a ahead of time, with the ptxas the
backend would use, with no register spills and no wgmma descriptor hazard in the SASS, and every kernel with a
dot uses Hopper's wgmma."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require


@pytest.fixture(scope="module")
def rows():
    require("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "mixer_fast", "report", "--arch", "sm_90a", "--format", "json"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_report_rows_have_the_keys(rows):
    assert rows
    for row in rows:
        assert {"kernel", "config", "registers", "spills", "shared_bytes", "wgmma", "ptxas",
                "wgmma_descriptor_hazards"} <= row.keys()
    assert any("autocast" in row["kernel"] for row in rows)
    kernels = {row["kernel"].split("[")[0] for row in rows}
    assert kernels == {"fused_matmul", "token_mlp_fwd", "token_mlp_dx", "token_mlp_dw", "ln_stats", "ln_backward",
                       "gate_grad", "residual_grad", "affine_backward", "fold_weight", "norm_apply", "gelu", "gelu_backward",
                       "residual_add"}
    # gMLP's launch sites are in it
    assert {"fused_matmul[gate_proj]", "fused_matmul[gate_b]", "ln_backward[gate,C=768]"} <= {r["kernel"] for r in rows}


def test_assembled_by_the_backends_ptxas(rows):
    from mixer_fast.kernels.triton import toolchain

    assert {r["ptxas"] for r in rows} == {toolchain.choose(90).version_text}


def test_no_wgmma_descriptor_hazards(rows):
    # ptxas 12.8.93 built these descriptors from data registers (an H200 crash); kernels/triton/sass.py.
    hazards = [(r["kernel"], r["config"], r["wgmma_descriptor_hazards"]) for r in rows
               if r["wgmma_descriptor_hazards"]]
    assert not hazards, hazards


def test_no_config_spills(rows):
    spilling = [(r["kernel"], r["config"], r["spills"]) for r in rows if r["spills"]]
    assert not spilling, spilling


def test_every_dot_kernel_uses_wgmma_on_sm90a(rows):
    missing = [(r["kernel"], r["config"]) for r in rows if r["has_dot"] and not r["wgmma"]]
    assert not missing, missing
    assert sum(r["has_dot"] for r in rows) >= 20


def test_registers_and_shared_memory_fit_hopper(rows):
    for r in rows:
        assert 0 < r["registers"] <= 255
        assert 0 <= r["shared_bytes"] <= 227 * 1024, r


def test_report_arguments_are_checked():
    require("triton")
    from mixer_fast.kernels.triton import aot, matmul

    with pytest.raises(ValueError, match="jobs: expected a positive integer, got True"):
        aot.report("sm_90a", jobs=True)
    with pytest.raises(ValueError, match="arch: expected one of"):
        aot.report("sm_70")
    if not hasattr(matmul.fused_matmul_kernel, "params"):  # this process runs Triton's interpreter (no GPU)
        with pytest.raises(RuntimeError, match="needs triton in compiled mode"):
            aot.report("sm_90a", jobs=2)


def test_token_plans_on_ampere_are_spill_free_and_fit_99_kb():
    # Below Hopper the token kernels run on mma.sync with plans of their own (token_mixing.gpu_config):
    # compiled for sm_80, every bf16 token row is spill-free and fits the 99 KB a block of sm_86 / sm_89.
    require("triton")
    code = """
import json
from mixer_fast.kernels.triton import aot
rows = [aot._compile(v, "sm_80", "bf16").as_dict() for v in aot.variants("bf16", "sm_80") if v[1].startswith("token_mlp")]
print(json.dumps(rows))
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    assert len(rows) >= 12 and any("autocast" in row["kernel"] for row in rows)
    bad = [(row["kernel"], row["config"], row["spills"], row["shared_bytes"]) for row in rows
           if row["spills"] or row["shared_bytes"] > 99 * 1024]
    assert not bad, bad
