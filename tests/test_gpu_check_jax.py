"""bench/gpu_check_jax.py, the JAX part of the prepared GPU command (``check --parts jax``): run here in Triton's
interpreter through jax.pure_callback on tiny shapes, its checks must pass, a wrong kernel must fail them, and its
timing worker must emit the records bench/wins_table.py reads."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load(name: str):
    """bench/<name>.py as module ``name`` (gpu_check_jax imports gpu_check by that name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")
gj = _load("gpu_check_jax")
JAX_CHECK_KEYS = {"kind", "op", "mode", "dtype", "shape", "batch", "ok", "errors", "error"}


@pytest.fixture(autouse=True)
def _scaled16_restored(monkeypatch):
    """The timing worker without hints replaces matmul.scaled16 for its whole process; here, for one test."""
    try:
        from mixer_fast.kernels.triton import matmul
    except ImportError:  # no triton: the tests that need it say so
        return
    monkeypatch.setattr(matmul, "scaled16", matmul.scaled16)


def test_quick_jax_part_passes_and_writes_its_records(tmp_path):
    require("jax")
    done = subprocess.run([sys.executable, str(SCRIPT), "check", "--out", str(tmp_path), "--quick", "--parts", "jax",
                           "--only", "jax channel_mixing"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "check.log").read_text() if (tmp_path / "check.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{log}"
    records = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    checks = [r for r in records if r["kind"] == "jax_check"]
    assert [(r["op"], r["mode"]) for r in checks] == [("channel_mixing", "forward"), ("channel_mixing", "backward")]
    for r in checks:
        assert set(r) == JAX_CHECK_KEYS and r["ok"] and r["error"] is None, r
        assert r["errors"] and all(0 <= err <= bound for err, bound in r["errors"].values()), r
    # every parameter's gradient, ResMLP's layer scale included
    assert {"['x']", "['norm_weight']", "['fc1_kernel']", "['fc2_bias']", "['scale']"} <= checks[1]["errors"].keys()
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["checks"] == 2 and summary["failed"] == []
    assert any(s.startswith("jax timings: ") for s in summary["skipped"])
    assert "checks: 2 of 2 passed" in done.stdout


def test_a_wrong_kernel_fails_the_jax_check(monkeypatch):
    # The triton backend's results replaced by XLA's off by 1 %: both modes fail, with the errors and bounds.
    jax = require("jax")
    from mixer_fast import dispatch

    real = dispatch.choose
    xla = real("jax", jax.default_backend(), "xla")
    wrong = types.SimpleNamespace(**{op: (lambda *a, op=op, **k: getattr(xla, op)(*a, **k) * 1.01)
                                     for op in gj.JAX_OPS})
    monkeypatch.setattr(dispatch, "choose", lambda framework, device, backend=None, *a, **k:
                        wrong if backend == "triton" else real(framework, device, backend, *a, **k))
    records = []
    monkeypatch.setattr(gj.gc, "emit", records.append)
    assert gj.jax_check_worker("channel_mixing", "resmlp_24", "fp32", 2, quick=True) is False
    assert [(r["mode"], r["ok"], r["error"]) for r in records] == [("forward", False, None), ("backward", False, None)]
    err, bound = records[0]["errors"]["out"]
    assert err > 10 * bound


def test_jax_timing_worker_records(monkeypatch):
    # On tiny shapes: every op and mode with both providers; without hints, channel mixing alone with the
    # fused GEMM's integers undivided (matmul.scaled16 off for the whole process).
    require("jax")
    from mixer_fast.kernels.triton import matmul

    monkeypatch.setattr(gj.gc, "SHAPES", gj.gc.QUICK_SHAPES)
    records, plans = [], []
    monkeypatch.setattr(gj.gc, "emit", records.append)
    monkeypatch.setattr(gj, "measure", lambda fn: 1.0)
    monkeypatch.setattr(gj, "not_run_reason", lambda quick: None)  # as on a GPU
    assert gj.jax_timing_worker("mixer_b16", "bf16", 2, 700.0, hints=True) is False
    assert [(r["op"], r["mode"]) for r in records] == [(op, mode) for op in ("token_mixing", "channel_mixing", "block")
                                                       for mode in ("forward", "training")]
    assert all(r["ms"] == {"xla": 1.0, "jax-triton": 1.0} and r["hints"] and r["floor_ms"] > 0 for r in records)
    assert records[4]["block"] == "mixer" and records[0]["block"] is None
    records.clear()

    from mixer_fast.kernels.triton import jax_launch

    plan = jax_launch.plan

    def recording_plan(*args, **kwargs):  # each fused GEMM launch's integer scaling
        p = plan(*args, **kwargs)
        plans.append(p.meta["SCALED16"])
        return p

    def measure(fn):  # runs the launches
        sys.modules["jax"].block_until_ready(fn())
        return 2.0

    monkeypatch.setattr(jax_launch, "plan", recording_plan)
    monkeypatch.setattr(gj, "measure", measure)
    assert gj.jax_timing_worker("mixer_b16", "bf16", 2, None, hints=False) is False
    assert [(r["op"], r["mode"], r["ms"], r["hints"], r["floor_ms"]) for r in records] == [
        ("channel_mixing", mode, {"jax-triton": 2.0}, False, None) for mode in ("forward", "training")]
    assert plans and set(plans) == {0}
    lines = "\n".join(gj.format_records(records))
    assert "channel_mixing mixer_b16  bf16  forward   no" in lines


def test_jax_groups_and_cases():
    cases = gj.jax_cases(quick=False)
    assert len(cases) == len({c.name for c in cases}) == 11
    assert {c.op for c in cases} == {"token_mixing", "channel_mixing", "block"}
    assert ("block", "mixer_b16", "bf16") in {(c.op, c.shape, c.dtype) for c in cases}
    assert all(c.task()["task"] == "jax_check" and c.name.startswith("jax ") for c in cases)
    assert all(c.quick for c in gj.jax_cases(quick=True))
    # the runbook's selection (item 6; no spaces: gpu_suite.sh splits CHECK_ARGS on them): every JAX case, and
    # the torch block to compare with beside the JAX groups, peak first
    opts = gc.parse_args(["check", "--out", "x", "--parts", "jax,timings", "--only", "jax|block.mixer_b16"])
    assert len(gc._selected(gj.jax_cases(quick=False), opts.only)) == 11
    names = [g.name for g in gc.timing_groups(opts.only, jax=True)]
    assert names == ["timing peak", "timing block mixer_b16 bf16", "timing jax mixer_b16 bf16",
                     "timing jax_no_hints mixer_b16 bf16"]
    assert [g.name for g in gc.timing_groups("jax mixer", jax=True, torch=False)] == [
        "timing peak", "timing jax mixer_b16 bf16"]
    assert gc.parse_args(["check", "--out", "x", "--parts", "jax,timings"]).parts == {"jax", "timings"}
    record = {"kind": "jax_check", "op": "block", "mode": "backward", "shape": "mixer_b16", "dtype": "bf16"}
    assert gc.check_name(record) == "jax block backward mixer_b16 bf16"
    with pytest.raises(SystemExit):
        gc.parse_args(["check", "--out", "x", "--parts", "jaxx"])


def test_what_cannot_run_is_recorded_as_not_run(monkeypatch):
    # A backend that did not load, or a JAX without a GPU outside --quick: "not run" records with the reason
    # (wins_table does not count them as losses); a reference that fails likewise.
    jax = require("jax")
    records = []
    monkeypatch.setattr(gj.gc, "emit", records.append)
    assert gj.jax_check_worker("token_mixing", "awkward", "bf16", 3, quick=False) is False
    if jax.default_backend() != "gpu":
        assert [r["error"] for r in records] == ["not run: JAX has no GPU in this process (its default backend is "
                                                 "'cpu')"] * 2
    records.clear()
    monkeypatch.setattr(gj, "_unavailable", "not run: the JAX triton backend did not load: no ptxas")
    monkeypatch.setattr(gj.gc, "SHAPES", gj.gc.QUICK_SHAPES)
    assert gj.jax_timing_worker("mixer_b16", "bf16", 2, None, hints=False) is False
    assert [r["errors"] for r in records] == [{"jax-triton": "not run: the JAX triton backend did not load: "
                                                             "no ptxas"}] * 2
    records.clear()
    monkeypatch.setattr(gj, "_unavailable", None)
    monkeypatch.setattr(gj, "_problem", lambda *a: 1 / 0)
    assert gj.jax_check_worker("token_mixing", "awkward", "bf16", 3, quick=True) is False
    assert [r["error"] for r in records] == ["not run: the XLA reference failed: ZeroDivisionError: division by "
                                             "zero"] * 2
