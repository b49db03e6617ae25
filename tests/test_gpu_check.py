"""bench/gpu_check.py, the prepared command for a lent GPU: its ``--quick`` mode run here as a subprocess (Triton's
interpreter without CUDA; tiny shapes on a GPU) must pass and write the record schema the dispatch table is built
from, and its pure helpers (timing records, the budget, FLOP floors, strict JSON, the fault and sanitizer text,
the case lists, the pytest command) behave."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load()

KEYS = {
    "env": {"kind", "date", "commit", "gpu", "device_class", "driver", "versions", "ptxas"},
    "check": {"kind", "op", "mode", "dtype", "shape", "batch", "ln", "gemm", "ok", "errors", "error", "sanitizer",
              "without_tma"},
    "graph": {"kind", "ok", "max_diff", "error"},
    "summary": {"kind", "checks", "failed", "faulted", "timings", "skipped", "seconds"},
}


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_quick_check_passes_and_writes_the_schema(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "check", "--out", str(tmp_path), "--quick", "--jobs", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    log = (tmp_path / "check.log").read_text() if (tmp_path / "check.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{log}"
    records = [_strict(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    for r in records:
        assert set(r) == KEYS[r["kind"]], r
    assert records[0]["kind"] == "env" and records[-1]["kind"] == "summary"
    assert records[0]["versions"].keys() == {"torch", "triton", "python"}
    checks = [r for r in records if r["kind"] == "check"]
    for op in ("token_mixing", "channel_mixing", "spatial_gating"):
        for mode in ("forward", "backward"):
            assert any(r["op"] == op and r["mode"] == mode and r["ok"] for r in checks), (op, mode)
    for r in checks:
        assert r["ok"] and r["error"] is None and r["sanitizer"] is None, r
        assert r["errors"] and all(0 <= err <= bound for err, bound in r["errors"].values()), r
    assert {(r["mode"], r["ln"], r["gemm"]) for r in checks if r["op"] == "channel_mixing"} >= {
        (mode, ln, gemm) for mode in ("forward", "backward") for ln, gemm in (("load", "fused"), ("fold", "fused"),
                                                                            ("load", "cublas"))}
    assert {(r["mode"], r["gemm"]) for r in checks if r["op"] == "token_mixing"} >= {
        (mode, gemm) for mode in ("forward", "backward") for gemm in ("fused", "cublas")}
    backward = next(r for r in checks if r["op"] == "token_mixing" and r["mode"] == "backward")
    assert {"x", "norm_weight", "fc1_weight", "fc1_bias"} <= backward["errors"].keys()
    summary = records[-1]
    assert summary["checks"] == len(checks) and summary["failed"] == [] and summary["faulted"] == []
    assert summary["timings"] == 0
    assert any(s.startswith("graph: ") for s in summary["skipped"])  # quick (or no CUDA): named, with the reason
    assert any(s.startswith("timings: ") for s in summary["skipped"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.jsonl", "check.log"]
    assert f"{len(checks)} of {len(checks)} passed" in done.stdout


def test_timing_record_schema():
    fwd = gpu_check.timing_record("block", "gmlp_s16", 256, "forward", "bf16", "sm_90",
                                  {"reference": 1.2, "triton": 3.0}, {}, 0.5, {})
    assert fwd == {"kind": "timing", "op": "block", "block": "gmlp", "shape": "gmlp_s16", "batch": 256,
                   "mode": "forward", "dtype": "bf16", "device_class": "sm_90",
                   "ms": {"reference": 1.2, "triton": 3.0}, "floor_ms": 0.5}
    train = gpu_check.timing_record("channel_mixing", "mixer_b16", 256, "training", "fp16", "sm_90",
                                    {"reference": 3.1}, {"triton": "RuntimeError: boom"}, None, {"reference": 1602.0})
    assert train["block"] is None and train["errors"] == {"triton": "RuntimeError: boom"}
    assert train["peak_mib"] == {"reference": 1602.0} and "triton" not in train["ms"]


def test_floor_matches_the_h200_figures_in_design_md():
    # DESIGN.md: Mixer-B/16, batch 256, 786 TFLOP/s: token 59 GFLOP, channel 474; block floor 0.68 / 2.03 ms.
    dims = gpu_check.SHAPES["mixer_b16"]
    assert gpu_check.forward_flops("token_mixing", dims, 256) / 1e9 == pytest.approx(59.2, abs=0.1)
    assert gpu_check.forward_flops("channel_mixing", dims, 256) / 1e9 == pytest.approx(473.6, abs=0.1)
    assert gpu_check.floor_ms("block", dims, 256, "forward", 786.0) == pytest.approx(0.678, abs=0.001)
    assert gpu_check.floor_ms("block", dims, 256, "training", 786.0) == pytest.approx(2.03, abs=0.01)
    assert gpu_check.floor_ms("block", dims, 256, "forward", None) is None
    # ResMLP's token branch is one S×S GEMM; gMLP's block is fc1, the gate's S×S linear on H/2, fc2.
    assert gpu_check.forward_flops("token_mixing", gpu_check.SHAPES["resmlp_24"], 1) == 2 * 384 * 196 * 196
    gmlp = 2 * 196 * (256 * 1536 + 768 * 196 + 768 * 256)
    assert gpu_check.forward_flops("block", gpu_check.SHAPES["gmlp_s16"], 1) == gmlp


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_runs_what_fits_and_names_what_was_skipped():
    clock = FakeClock()
    budget = gpu_check.Budget(100, clock=clock)
    groups = [gpu_check.TimingGroup("peak", None, "bf16", 10), gpu_check.TimingGroup("block", "mixer_b16", "bf16", 50),
              gpu_check.TimingGroup("token_mixing", "mixer_b16", "bf16", 45),  # 40 s left when its turn comes
              gpu_check.TimingGroup("token_mixing", "resmlp_24", "bf16", 30)]
    ran = []

    def run(group, timeout):
        ran.append((group.name, timeout))
        clock.now += group.estimate_s

    skipped = gpu_check.run_in_budget(groups, budget, run)
    assert ran == [("timing peak", 100), ("timing block mixer_b16 bf16", 90),
                   ("timing token_mixing resmlp_24 bf16", 40)]
    assert skipped == ["timing token_mixing mixer_b16 bf16: budget (needs ~45 s, 40 s left)"]
    clock.now = 1000
    assert budget.left() == 0


def test_strict_json_and_fault_texts():
    line = gpu_check.dumps({"errors": {"out": [math.inf, 0.1], "x": [math.nan, -math.inf]}})
    assert _strict(line) == {"errors": {"out": ["inf", 0.1], "x": ["nan", "-inf"]}}
    assert gpu_check.is_device_fault("RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered")
    assert gpu_check.is_device_fault("AcceleratorError: CUDA error: unspecified launch failure")
    assert not gpu_check.is_device_fault("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not gpu_check.is_device_fault("AssertionError: max|fused - ref64| = 1e-1 > bound 1e-2")
    report = "\n".join(["python noise"] + [f"========= line {i}" for i in range(50)] + ["more noise"])
    excerpt = gpu_check.sanitizer_excerpt(report).splitlines()
    assert len(excerpt) == 40 and excerpt[0] == "========= line 0"
    assert gpu_check.sanitizer_excerpt("a\nb") == "a\nb"  # no report: the end of the output


def test_worker_run_fault_classification():
    def run(rc, output=""):
        return gpu_check.WorkerRun([], rc, 1.0, output)

    assert run(gpu_check.FAULT_EXIT).faulted and run(-11).faulted
    assert run(1, "AcceleratorError: CUDA error: an illegal memory access was encountered").faulted
    assert not run(0).faulted and not run(None).faulted  # a timeout is a failure, not a fault
    assert not run(1, "ImportError: no module named timm").faulted
    assert "killed at its timeout" in run(None, "last words").failure()


def test_case_lists():
    cases = gpu_check.check_cases(quick=False)
    # (2 ops × 3 shapes + gating) × 3 dtypes, 4 with fc1's LayerNorm folded, 6 on the cuBLAS engine
    assert len(cases) == len({c.name for c in cases}) == 31
    folded = [c for c in cases if c.ln == "fold"]
    assert {c.op for c in folded} == {"channel_mixing", "spatial_gating"} and len(folded) == 4
    assert all(c.name.endswith(" ln fold") and c.task()["ln"] == "fold" for c in folded)
    on_cublas = [c for c in cases if c.gemm == "cublas"]
    assert {c.op for c in on_cublas} == {"token_mixing", "channel_mixing", "spatial_gating"} and len(on_cublas) == 6
    assert all(c.name.endswith(" gemm cublas") and c.task()["gemm"] == "cublas" and c.ln == "load" for c in on_cublas)
    assert {c.shape for c in cases if c.op == "spatial_gating"} == {"gmlp_s16"}
    assert {c.shape for c in cases if c.op == "token_mixing"} == {"mixer_b16", "resmlp_24", "awkward"}
    assert all(2 <= c.batch <= 4 for c in cases)
    quick = gpu_check.check_cases(quick=True)
    assert {c.op for c in quick} == {"token_mixing", "channel_mixing", "spatial_gating"}
    assert {c.dtype for c in quick} == {"bf16", "fp16", "fp32"} and all(c.quick for c in quick)
    assert [g.name for g in gpu_check.timing_groups("timing block")] == [
        "timing peak", "timing block mixer_b16 bf16", "timing block resmlp_24 bf16", "timing block gmlp_s16 bf16"]
    assert gpu_check.timing_groups("nothing matches") == []
    assert gpu_check.TIMING_GROUPS[0].what == "peak" and all(g.estimate_s > 0 for g in gpu_check.TIMING_GROUPS)


def test_tile_candidates_start_with_the_plan():
    from mixer_fast.kernels.triton.token_mixing import KERNELS, gpu_config

    candidates = gpu_check.tile_candidates()
    assert set(candidates) == set(KERNELS)
    for kernel, launches in candidates.items():
        assert launches[0] == gpu_config(kernel, 196, 384)  # the planned launch is the baseline
        assert len(set(launches)) == len(launches) and all(sum(launch.pieces) >= 196 for launch in launches)
    assert [g.name for g in gpu_check.TILE_GROUPS] == ["timing tiles mixer_b16 bf16", "timing tiles mixer_l16 bf16"]
    assert gpu_check.parse_args(["check", "--out", "x"]).parts == {"checks", "graph", "timings"}
    assert gpu_check.parse_args(["check", "--out", "x", "--parts", "tiles"]).parts == {"tiles"}


def test_tests_stage_command():
    files = gpu_check.gpu_test_files()
    assert files[:2] == ["tests/test_token_mixing.py", "tests/test_channel_mixing.py"]
    assert "tests/test_large_tensors.py" in files and all((ROOT / f).exists() for f in files)
    cmd = gpu_check.pytest_command(files, 12, xdist=True, timeout_plugin=False)
    assert cmd[1:3] == ["-m", "pytest"] and "-v" in cmd and cmd[cmd.index("-n") + 1] == "12"
    assert "--timeout" not in cmd
    assert "-n" not in gpu_check.pytest_command(files, 12, xdist=False, timeout_plugin=True)


def test_a_fault_is_rerun_under_the_sanitizer_and_recorded(tmp_path, monkeypatch):
    fault = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    report_text = "noise\n========= Invalid __shared__ read of size 512 bytes\n========= at token_mlp_fwd_kernel+0x9340"
    wrappers = []

    def fake_run_worker(task, timeout, env=None, wrapper=()):
        assert env["CUDA_LAUNCH_BLOCKING"] == "1"
        if env.get("MIXER_FAST_TMA") == "0":  # the rerun without TMA loads: the fault is elsewhere
            return gpu_check.WorkerRun([gpu_check._check_record(task, "forward", error=fault)], gpu_check.FAULT_EXIT,
                                       5.0, fault)
        wrappers.append(list(wrapper))
        if wrapper:
            return gpu_check.WorkerRun([], 1, 2.0, report_text)
        forward = gpu_check._check_record(task, "forward", error=fault)  # the worker died before its backward
        return gpu_check.WorkerRun([forward], gpu_check.FAULT_EXIT, 5.0, fault)

    monkeypatch.setattr(gpu_check, "run_worker", fake_run_worker)
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: "/cuda/bin/compute-sanitizer")
    report = gpu_check.Report(tmp_path)
    phase = gpu_check.CheckPhase(report, gpu_check.Budget(100), gpu_check.Budget(100), sanitize_left=1)
    first, second = (gpu_check.CheckCase("token_mixing", shape, "bf16", 4) for shape in ("mixer_b16", "awkward"))
    gpu_check._run_check(first, phase)
    gpu_check._run_check(second, phase)  # the one sanitizer rerun is spent
    gpu_check._run_check(gpu_check.CheckCase("channel_mixing", "awkward", "fp32", 3),
                         gpu_check.CheckPhase(report, gpu_check.Budget(0), gpu_check.Budget(100), 1))
    report.close()
    assert wrappers[1][0] == "/cuda/bin/compute-sanitizer" and [bool(w) for w in wrappers] == [False, True, False]
    records = [_strict(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    assert [(r["shape"], r["mode"], r["ok"]) for r in records] == [
        ("mixer_b16", "forward", False), ("mixer_b16", "backward", False),
        ("awkward", "forward", False), ("awkward", "backward", False),
        ("awkward", "forward", False), ("awkward", "backward", False)]
    assert records[0]["error"] == fault and records[0]["sanitizer"].startswith("========= Invalid __shared__ read")
    # Mixer's token mixing runs no fused GEMM: no rerun without TMA; ResMLP's does
    assert records[0]["without_tma"] is None and not first.uses_gemm
    assert gpu_check.CheckCase("token_mixing", "resmlp_24", "bf16", 4).uses_gemm
    assert gpu_check.CheckCase("channel_mixing", "mixer_b16", "bf16", 4).uses_gemm
    assert records[4]["without_tma"] is None  # never ran: nothing to rerun
    assert "exited with status 3" in records[1]["error"]  # the mode it never reported
    assert records[2]["sanitizer"].startswith("not run: --max-sanitize")
    assert records[4]["error"].startswith("not run") and records[4]["sanitizer"] is None
    assert phase.faulted == ["token_mixing mixer_b16 bf16", "token_mixing awkward bf16"]
    assert "Invalid __shared__ read" in (tmp_path / "sanitizer.txt").read_text()


def test_a_failed_gemm_case_is_rerun_without_tma(tmp_path, monkeypatch):
    fault = "AcceleratorError: CUDA error: an illegal instruction was encountered"
    envs = []

    def fake_run_worker(task, timeout, env=None, wrapper=()):
        envs.append(dict(env or {}))
        if wrapper:
            return gpu_check.WorkerRun([], 1, 2.0, "")
        if env.get("MIXER_FAST_TMA") == "0":  # pointer loads alone: sound
            return gpu_check.WorkerRun([gpu_check._check_record(task, m) for m in ("forward", "backward")], 0, 5.0, "")
        return gpu_check.WorkerRun([gpu_check._check_record(task, "forward", error=fault)], gpu_check.FAULT_EXIT,
                                   5.0, fault)

    monkeypatch.setattr(gpu_check, "run_worker", fake_run_worker)
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: None)
    report = gpu_check.Report(tmp_path)
    phase = gpu_check.CheckPhase(report, gpu_check.Budget(100), gpu_check.Budget(100), sanitize_left=1)
    gpu_check._run_check(gpu_check.CheckCase("channel_mixing", "mixer_b16", "bf16", 4), phase)
    report.close()
    records = [_strict(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["ok"], r["without_tma"]) for r in records] == [("forward", False, "ok"),
                                                                         ("backward", False, "ok")]
    assert [e.get("MIXER_FAST_TMA") for e in envs] == [None, "0"]


def _time_without_a_gpu(monkeypatch, providers, records) -> None:
    """timing_worker with ``providers`` as the op's, each call timed as 1 ms (it runs once), its records
    appended to ``records``."""
    monkeypatch.setattr(gpu_check, "_op_providers", lambda *args: providers)
    # no warm-up runs (the interpreter's answer, stated so that a CUDA machine's suite gets it too)
    monkeypatch.setattr(gpu_check, "warm_providers", lambda fns: {"compile_threads": 0, "compile_s": 0.0})
    monkeypatch.setattr(gpu_check, "_measure", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_check, "_peak_mib", lambda fn: 10.0)
    monkeypatch.setattr(gpu_check, "device_class", lambda: "sm_90")
    monkeypatch.setattr(gpu_check, "emit", records.append)


def test_timing_worker_runs_the_fused_providers_last_and_emits_one_record_a_mode(monkeypatch):
    # Channel mixing is timed with fc1's LayerNorm on load (triton) and folded (triton_ln_folded): both after
    # every other provider (a fault in them spoils nothing else), both in each mode's one record.
    calls, records = [], []
    providers = {name: {mode: (lambda name=name, mode=mode: calls.append((name, mode)))
                        for mode in ("forward", "training")}
                 for name in ("reference", "cublas", "triton", gpu_check.FOLDED_PROVIDER, gpu_check.CUBLAS_PROVIDER)}
    _time_without_a_gpu(monkeypatch, providers, records)
    assert gpu_check.timing_worker("channel_mixing", "mixer_b16", "bf16", 256, None) is False
    assert [name for name, _ in calls] == ["reference"] * 2 + ["cublas"] * 2 + ["triton"] * 2 + [
        gpu_check.FOLDED_PROVIDER] * 2 + [gpu_check.CUBLAS_PROVIDER] * 2
    assert [r["mode"] for r in records] == ["forward", "training"]
    for r in records:
        assert set(r["ms"]) == {"reference", "cublas", "triton", gpu_check.FOLDED_PROVIDER, gpu_check.CUBLAS_PROVIDER}
    assert set(records[1]["peak_mib"]) == {"reference", "triton", gpu_check.FOLDED_PROVIDER,
                                           gpu_check.CUBLAS_PROVIDER}
    summary = {"failed": [], "faulted": [], "skipped": [], "seconds": 1.0}
    text = gpu_check.format_summary(records, summary)
    assert "ln fold" in text and "+cuBLAS" in text


def test_timing_worker_warms_the_fused_providers_before_timing_any(monkeypatch):
    # Every triton provider's calls, in each mode, go to warm_providers before any of them is timed (their
    # kernels then compile at once, not one by one inside the first timed calls), after the other providers
    # (the warm-up runs fused GEMMs where a site is tuned: a fault there must spoil nothing else), and every
    # record says how the warm-up went.
    events, records = [], []
    providers = {name: {mode: (lambda name=name, mode=mode: events.append(("run", name, mode)))
                        for mode in ("forward", "training")}
                 for name in ("reference", "triton", gpu_check.CUBLAS_PROVIDER)}
    _time_without_a_gpu(monkeypatch, providers, records)

    def warm(fns):
        events.append(("warm", len(fns)))
        for fn in fns:
            fn()
        return {"compile_threads": 4, "compile_s": 2.5}

    monkeypatch.setattr(gpu_check, "warm_providers", warm)
    assert gpu_check.timing_worker("token_mixing", "mixer_b16", "bf16", 256, None) is False
    fused = [("run", p, m) for p in ("triton", gpu_check.CUBLAS_PROVIDER) for m in ("forward", "training")]
    assert events == [("run", "reference", "forward"), ("run", "reference", "training"), ("warm", 4), *fused,
                      *fused]
    assert [(r["compile_threads"], r["compile_s"]) for r in records] == [(4, 2.5)] * 2


def test_a_fault_in_the_warm_up_is_the_warm_up_s(monkeypatch):
    # A CUDA fault in the warm-up (a GEMM site tuned there) loses the context: no triton provider is run after
    # it, and each says the warm-up faulted; the providers timed before it keep their times.
    records = []
    providers = {name: {mode: (lambda: None) for mode in ("forward", "training")}
                 for name in ("reference", "triton", gpu_check.CUBLAS_PROVIDER)}
    _time_without_a_gpu(monkeypatch, providers, records)
    fault = "RuntimeError: CUDA error: an illegal memory access was encountered"
    monkeypatch.setattr(gpu_check, "warm_providers",
                        lambda fns: {"compile_threads": 0, "compile_s": 1.0, "warm_up_error": fault})
    assert gpu_check.timing_worker("token_mixing", "mixer_b16", "bf16", 256, None) is True
    for r in records:
        assert r["ms"] == {"reference": 1.0} and r["warm_up_error"] == fault
        assert set(r["errors"]) == {"triton", gpu_check.CUBLAS_PROVIDER}
        assert all(e == "not run: the CUDA context was lost when the triton providers' warm-up faulted"
                   for e in r["errors"].values())
    text = gpu_check.format_summary(records, {"failed": [], "faulted": [], "skipped": [], "seconds": 1.0})
    assert "warm-up failed: RuntimeError: CUDA error" in text


def test_a_failing_warm_up_run_is_passed_over_and_a_fault_ends_it(monkeypatch):
    # A provider whose run fails in the warm-up leaves its compiles to its timed calls, which record the error
    # themselves; the other runs still run and what they recorded compiles; the records say a run failed, and
    # why. A CUDA fault ends the warm-up: no run after it, nothing compiled, the fault named.
    from mixer_fast.kernels.triton import _launch

    monkeypatch.setattr(_launch, "INTERPRET", False)
    ran, compiled = [], []
    monkeypatch.setattr(_launch, "compile_concurrently", lambda warmups: compiled.append(len(warmups)) or 2)

    def run(n):
        return lambda: ran.append(n) or _launch.record(lambda: None)

    def broken():
        raise RuntimeError("the launcher broke")

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    warmed = gpu_check.warm_providers([run(1), broken, run(3)])
    assert ran == [1, 3] and compiled == [2] and warmed["compile_threads"] == 2
    assert warmed["warm_up_error"] == "RuntimeError: the launcher broke"
    assert _launch._RECORDED is None  # the recording is over
    ran.clear(), compiled.clear()
    warmed = gpu_check.warm_providers([run(1), broken, fault, run(4)])
    assert ran == [1] and compiled == [] and warmed["compile_threads"] == 0
    assert warmed["warm_up_error"] == ("RuntimeError: CUDA error: an illegal memory access was encountered"
                                       " (2 of 4 runs failed)")
    assert gpu_check.is_device_fault(warmed["warm_up_error"]) and _launch._RECORDED is None
    monkeypatch.setattr(_launch, "INTERPRET", True)  # nothing compiles in the interpreter: nothing runs
    assert gpu_check.warm_providers([broken]) == {"compile_threads": 0, "compile_s": 0.0}


def test_env_modes_hold_the_engine_through_the_whole_step(monkeypatch):
    # A provider's training step is forward and backward: both must run under its engine and placement (the
    # backward reads MIXER_FAST_GEMM / MIXER_FAST_TOKEN too), and the process's own settings come back afterwards.
    monkeypatch.setenv("MIXER_FAST_GEMM", "fused")
    monkeypatch.delenv("MIXER_FAST_TOKEN", raising=False)
    monkeypatch.delenv("MIXER_FAST_LN", raising=False)
    names = ("MIXER_FAST_GEMM", "MIXER_FAST_TOKEN", "MIXER_FAST_LN")
    seen = []

    def training():
        seen.append(tuple(os.environ.get(n) for n in names))
        seen.append(tuple(os.environ.get(n) for n in names))  # "the backward"

    gpu_check._env_modes({"training": training}, "cublas", "load")["training"]()
    gpu_check._env_modes({"training": training}, "fused", "fold")["training"]()
    assert seen == [("cublas", "cublas", "load")] * 2 + [("fused", "flash", "fold")] * 2
    assert os.environ["MIXER_FAST_GEMM"] == "fused" and "MIXER_FAST_TOKEN" not in os.environ
    assert "MIXER_FAST_LN" not in os.environ


def test_after_a_fault_the_remaining_triton_providers_are_not_run(monkeypatch):
    # A CUDA fault loses the context: what comes after it would fail too, and that failure must not be taken
    # for its own (the cuBLAS engine's timing is not a loss because the fused kernels faulted).
    records = []

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    providers = {"reference": {"forward": lambda: None, "training": lambda: None},
                 "triton": {"forward": lambda: None, "training": fault},
                 gpu_check.CUBLAS_PROVIDER: {"forward": lambda: None, "training": lambda: None}}
    _time_without_a_gpu(monkeypatch, providers, records)
    assert gpu_check.timing_worker("token_mixing", "mixer_b16", "bf16", 256, None) is True
    forward, training = records
    assert "triton" in training["errors"] and gpu_check.is_device_fault(training["errors"]["triton"])
    assert training["errors"][gpu_check.CUBLAS_PROVIDER] == (
        "not run: the CUDA context was lost when triton (training) faulted")
    # triton's forward ran before the fault; the cuBLAS provider comes after triton in both modes
    assert "triton" in forward["ms"] and gpu_check.CUBLAS_PROVIDER in forward["errors"]


def test_cublas_cases_rerun_without_tma_only_where_a_fused_gemm_runs():
    cases = {(c.op, c.gemm): c for c in gpu_check.check_cases(quick=False) if c.shape != "awkward"}
    assert not cases[("channel_mixing", "cublas")].uses_gemm and not cases[("token_mixing", "cublas")].uses_gemm
    assert cases[("spatial_gating", "cublas")].uses_gemm  # the gate's token GEMMs stay fused
    assert cases[("channel_mixing", "fused")].uses_gemm


def test_tile_warm_up_runs_each_candidate_recorded_under_its_plan(monkeypatch):
    """warm_tiles is an optimisation. It runs each candidate's mode once under that candidate's override_plan
    while launches are recorded, then compiles what was recorded at once (recorded_warm_up: a candidate
    whose run fails is passed over; a CUDA fault ends it, nothing compiled). In Triton's interpreter nothing
    runs."""
    from mixer_fast.kernels.triton import _launch, token_mixing
    from mixer_fast.kernels.triton.token_mixing import DW1, DW2, Launch

    p = (64, 0, 0)
    fwd, dx, dw = Launch(p, 32, 32, 4, 2), Launch(p, 64, 16, 4, 2), Launch(p, 16, 32, 4, 2, (DW1, DW2))
    candidates = {"token_mlp_fwd": [fwd], "token_mlp_dx": [dx], "token_mlp_dw": [dw]}
    ran, compiled = [], []

    def run(mode, error=None):
        def call():
            ran.append((mode, dict(token_mixing._OVERRIDES), _launch.recording()))
            _launch.record(lambda: None)
            if error and len(ran) == 2:
                raise RuntimeError(error)
        return call

    monkeypatch.setattr(_launch, "compile_concurrently", lambda warmups: compiled.append(len(warmups)) or 2)
    warmed = gpu_check.warm_tiles({"forward": run("forward"), "training": run("training")}, candidates)
    assert warmed == {"compile_threads": 0, "compile_s": 0.0} and ran == compiled == []  # the interpreter
    monkeypatch.setattr(_launch, "INTERPRET", False)
    modes = {"forward": run("forward"), "training": run("training", "a shape this tile cannot take")}
    warmed = gpu_check.warm_tiles(modes, candidates)
    assert warmed["compile_threads"] == 2 and "a shape this tile cannot take" in warmed["warm_up_error"]
    assert ran == [("forward", {"token_mlp_fwd": fwd}, True), ("training", {"token_mlp_dx": dx}, True),
                   ("training", {"token_mlp_dw": dw}, True)]
    assert compiled == [3] and token_mixing._OVERRIDES == {} and not _launch.recording()
    ran.clear(), compiled.clear()
    modes["training"] = run("training", "CUDA error: an illegal memory access was encountered")
    warmed = gpu_check.warm_tiles(modes, candidates)
    assert warmed["compile_threads"] == 0 and gpu_check.is_device_fault(warmed["warm_up_error"])
    assert [mode for mode, _, _ in ran] == ["forward", "training"] and compiled == []
    assert token_mixing._OVERRIDES == {} and _launch._RECORDED is None


def test_a_fault_in_the_tile_warm_up_is_named_on_every_candidate(monkeypatch):
    # The CUDA context is lost: no candidate is timed (the first, the shipped plan, would fail and have the
    # fault taken for its own), and each record says why; the worker reports the fault.
    records, measured = [], []
    fault = "RuntimeError: CUDA error: an illegal memory access was encountered"
    monkeypatch.setattr(gpu_check, "tile_modes", lambda *a: {"forward": None, "training": None})
    monkeypatch.setattr(gpu_check, "warm_tiles", lambda modes, candidates: {
        "compile_threads": 0, "compile_s": 1.0, "warm_up_error": fault})
    monkeypatch.setattr(gpu_check, "_measure", measured.append)
    monkeypatch.setattr(gpu_check, "emit", records.append)
    assert gpu_check.tiles_worker("mixer_b16", "bf16", 256) is True
    assert measured == [] and len(records) == sum(map(len, gpu_check.tile_candidates().values()))
    assert all(r["error"] == "not run: the CUDA context was lost when the tiles' warm-up faulted"
               and r["warm_up_error"] == fault and r["ms"] is None for r in records)
