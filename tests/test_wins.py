"""The table of measured wins: generated from bench/results/, shipped in the package, and the rule it applies."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mixer_fast import wins

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import wins_table  # noqa: E402


def test_shipped_table_is_the_one_generated_from_bench_results():
    shipped = (REPO / "mixer_fast" / wins.TABLE_FILE).read_text()
    assert shipped == wins_table.render(wins_table.build()), \
        "mixer_fast/measured_wins.json is stale: run python bench/wins_table.py --write"
    assert wins.table() == json.loads(shipped)


def test_h200_evidence_keeps_triton_out_of_the_automatic_choice():
    # The 2026-11-27 H200 run: every triton timing slower than the reference, so none is chosen on sm_90.
    rows = [r for r in wins.table()["evidence"] if r["backend"] == "triton" and r["device_class"] == "sm_90"]
    assert {(r["op"], r["mode"]) for r in rows} >= {("channel_mixing", "forward"), ("channel_mixing", "training"),
                                                   ("block:resmlp", "training"), ("block:gmlp", "training")}
    assert all(r["speedup"] < 1 for r in rows)
    assert not wins.wins_for("torch", "triton")
    for op in wins.OPS:
        for mode in wins.MODES:
            assert not wins.is_win("torch", "triton", "sm_90", op, mode, "bfloat16")


def _row(op, speedup, mode="forward", dtype="bf16", cls="sm_90", backend="triton"):
    return dict(framework="torch", backend=backend, device_class=cls, op=op, mode=mode, dtype=dtype, shape="s",
                batch=1, reference_ms=1.0, backend_ms=1.0 / speedup, speedup=speedup, source="x")


def test_rule_every_piece_of_evidence_must_win_and_blocks_count_for_their_ops():
    chosen = wins_table.chosen([_row("block:mixer", 1.3), _row("channel_mixing", 0.9), _row("token_mixing", 1.2),
                                _row("block:gmlp", 1.0), _row("token_mixing", 1.5, mode="training")])
    keys = {(r["op"], r["mode"]): r for r in chosen}
    # token forward: the block (1.3) and the op (1.2) both win; channel forward: the op lost (0.9); gMLP: a tie
    # is not a win; token training: one winning timing.
    assert set(keys) == {("token_mixing", "forward"), ("token_mixing", "training")}
    assert keys[("token_mixing", "forward")]["min_speedup"] == 1.2
    assert keys[("token_mixing", "forward")]["evidence"] == 2
    assert wins_table.chosen([]) == []


def test_gpu_check_timings_are_evidence(tmp_path):
    # bench/gpu_check.py's "timing" records (its schema) become rows; a triton error there, or a failed
    # correctness check, is a loss that vetoes its key.
    folder = tmp_path / "2026-12-01-NVIDIA_H100"
    folder.mkdir()
    lines = [{"kind": "env", "device_class": "sm_90"},
             {"kind": "timing", "op": "token_mixing", "block": None, "shape": "mixer_b16", "batch": 256,
              "mode": "forward", "dtype": "bf16", "device_class": "sm_90",
              "ms": {"reference": 0.9, "compile": 0.8, "triton": 0.3}, "floor_ms": 0.1},
             {"kind": "timing", "op": "block", "block": "mixer", "shape": "mixer_b16", "batch": 256,
              "mode": "training", "dtype": "bf16", "device_class": "sm_90", "ms": {"reference": 6.0, "triton": 5.0}},
             {"kind": "timing", "op": "channel_mixing", "block": None, "shape": "mixer_b16", "batch": 256,
              "mode": "forward", "dtype": "bf16", "device_class": "sm_90", "ms": {"reference": 1.0},
              "errors": {"triton": "fault"}},
             {"kind": "check", "op": "token_mixing", "mode": "backward", "dtype": "fp16", "shape": "awkward",
              "batch": 3, "ok": False, "errors": {"dx": [1.0, 0.1]}, "error": None, "sanitizer": None},
             {"kind": "check", "op": "token_mixing", "mode": "forward", "dtype": "fp16", "shape": "awkward",
              "batch": 3, "ok": True, "errors": {}, "error": None, "sanitizer": None},
             {"kind": "timing", "op": "token_mixing", "block": None, "shape": "mixer_b16", "batch": 256,
              "mode": "training", "dtype": "fp16", "device_class": "sm_90", "ms": {"reference": 2.0, "triton": 1.0}}]
    (folder / "check.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = wins_table.evidence(tmp_path)
    assert [(r["op"], r["mode"], r["dtype"], r["speedup"]) for r in rows] == [
        ("token_mixing", "forward", "bf16", 3.0), ("block:mixer", "training", "bf16", 1.2),
        ("channel_mixing", "forward", "bf16", 0.0), ("token_mixing", "training", "fp16", 0.0),
        ("token_mixing", "training", "fp16", 2.0)]
    assert rows[2]["failure"] == "fault" and rows[3]["failure"] == "outside the numerics rule"
    assert {(r["op"], r["mode"], r["dtype"]) for r in wins_table.chosen(rows)} == {
        ("token_mixing", "forward", "bf16"), ("token_mixing", "training", "bf16"),
        ("channel_mixing", "training", "bf16")}


def test_gpu_check_jax_records_are_evidence_for_jax(tmp_path):
    # bench/gpu_check_jax.py's records: timings of the backend as shipped (with the integer hints) against
    # XLA, and failed checks as losses; the timing without hints is an experiment, not what runs.
    folder = tmp_path / "2026-12-01-NVIDIA_H100"
    folder.mkdir()
    timing = dict(kind="jax_timing", block=None, shape="mixer_b16", batch=256, dtype="bf16", device_class="sm_90",
                  floor_ms=0.1)
    lines = [{"kind": "env", "device_class": "sm_90"},
             dict(timing, op="channel_mixing", mode="forward", hints=True, ms={"xla": 1.5, "jax-triton": 1.0}),
             dict(timing, op="channel_mixing", mode="forward", hints=False, ms={"jax-triton": 0.5}),
             dict(timing, op="block", block="mixer", mode="training", hints=True, ms={"xla": 6.0},
                  errors={"jax-triton": "fault"}),
             dict(timing, op="token_mixing", mode="training", hints=True, ms={"xla": 2.0},
                  errors={"jax-triton": "not run: the CUDA context was lost"}),
             {"kind": "jax_check", "op": "token_mixing", "mode": "backward", "dtype": "fp16", "shape": "mixer_b16",
              "batch": 4, "ok": False, "errors": {"x": [1.0, 0.1]}, "error": None},
             {"kind": "jax_check", "op": "block", "mode": "forward", "dtype": "bf16", "shape": "mixer_b16",
              "batch": 4, "ok": False, "errors": {}, "error": "not run: correctness budget spent"}]
    (folder / "check.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = wins_table.evidence(tmp_path)
    assert [(r["framework"], r["backend"], r["op"], r["mode"], r["dtype"], r["speedup"]) for r in rows] == [
        ("jax", "triton", "channel_mixing", "forward", "bf16", 1.5), ("jax", "triton", "block:mixer", "training",
                                                                      "bf16", 0.0),
        ("jax", "triton", "token_mixing", "training", "fp16", 0.0)]
    assert rows[1]["failure"] == "fault" and rows[2]["failure"] == "outside the numerics rule"
    assert {(r["framework"], r["op"], r["mode"]) for r in wins_table.chosen(rows)} == {
        ("jax", "channel_mixing", "forward")}


def test_backward_only_benchmarks_are_not_evidence_and_unknown_modes_are_errors(tmp_path):
    info = dict(op="channel_mixing", config="mixer_b16", batch=256, dtype="bf16", device_class="sm_90")
    bench = {"benchmarks": [{"extra_info": dict(info, mode=mode, provider=p), "stats": {"median": t}}
                            for mode in ("fwd", "bwd") for p, t in (("eager", 2e-3), ("triton", 1e-3))]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert [(r["mode"], r["speedup"]) for r in wins_table.evidence(tmp_path)] == [("forward", 2.0)]
    for b in bench["benchmarks"][:2]:
        b["extra_info"]["mode"] = "fwd2"
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    with pytest.raises(ValueError, match="mode: expected one of .* got 'fwd2'"):
        wins_table.evidence(tmp_path)


def test_cpu_class(monkeypatch):
    wins.cpu_class.cache_clear()
    try:
        for flags, isa, want in ((("avx2", "fma"), None, "avx2"), (("avx512f", "avx2", "fma"), None, "avx512"),
                                 (("avx512f", "avx512_bf16"), "avx512", "avx512_bf16"),
                                 (("avx512f", "avx512_bf16"), "avx512_bf16", "avx512_bf16"),
                                 (("avx512f", "avx512_bf16", "amx_bf16"), "avx512", "avx512_amx"),
                                 ((), None, "portable")):
            monkeypatch.setattr(wins, "_cpu_flags", lambda flags=flags: frozenset(flags))
            wins.cpu_class.cache_clear()
            assert wins.cpu_class(isa) == want
    finally:
        wins.cpu_class.cache_clear()
    assert wins.cuda_class((9, 0)) == "sm_90"
    assert wins.dtype_name("bfloat16") == "bf16" and wins.dtype_name("float64") == "float64"


def test_block_names_are_known():
    assert wins_table.block_op("mixer_b16") == "block:mixer"
    assert wins_table.block_op("resmlp_big_24") == "block:resmlp"
    with pytest.raises(ValueError, match="config: no block family known for 'vit_b16'"):
        wins_table.block_op("vit_b16")


def test_checks_of_the_other_layernorm_placement_are_not_evidence(tmp_path):
    # gpu_check also checks fc1's LayerNorm folded (MIXER_FAST_LN=fold): a failure there says nothing about
    # the placement the backend runs (matmul.LN_PLACEMENT), whose own failures stay losses.
    from mixer_fast.kernels.triton.matmul import LN_FOLDED, LN_ON_LOAD, LN_PLACEMENT

    other = LN_FOLDED if LN_PLACEMENT == LN_ON_LOAD else LN_ON_LOAD
    folder = tmp_path / "2026-12-01-NVIDIA_H100"
    folder.mkdir()
    check = {"kind": "check", "op": "channel_mixing", "mode": "forward", "dtype": "bf16", "shape": "mixer_b16",
             "batch": 4, "ok": False, "errors": {"out": [1.0, 0.1]}, "error": None, "sanitizer": None}
    lines = [{"kind": "env", "device_class": "sm_90"}, dict(check, ln=other), dict(check, ln=LN_PLACEMENT, dtype="fp16")]
    (folder / "check.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = wins_table.evidence(tmp_path)
    assert [(r["op"], r["dtype"], r["speedup"]) for r in rows] == [("channel_mixing", "fp16", 0.0)]


def _timing(op, ms, block=None, mode="forward", dtype="bf16", errors=None):
    return {"kind": "timing", "op": op, "block": block, "shape": "mixer_b16", "batch": 256, "mode": mode,
            "dtype": dtype, "device_class": "sm_90", "ms": ms, **({"errors": errors} if errors else {})}


def _write_run(folder: Path, lines) -> None:
    folder.mkdir(parents=True)
    (folder / "check.jsonl").write_text("\n".join(json.dumps(line) for line in [
        {"kind": "env", "device_class": "sm_90"}, *lines]) + "\n")


@pytest.mark.parametrize("engine,token,placement,want", [
    ("fused", "flash", "load", (2.0, 2.0, 2.0)), ("fused", "flash", "fold", (4.0, 2.0, 0.0)),
    ("cublas", "cublas", "load", (1.25, 4.0, 0.5)), ("cublas", "cublas", "fold", (1.25, 4.0, 0.5)),
    ("cublas", "flash", "load", (1.25, 2.0, 0.0)), ("fused", "cublas", "load", (2.0, 4.0, 0.0))])
def test_timings_count_the_engines_and_placement_the_backend_ships(tmp_path, monkeypatch, engine, token, placement,
                                                                  want):
    # gpu_check times every op as "triton" (fused kernels, LayerNorm on load), "triton_cublas" (both engines on
    # cuBLAS) and channel mixing also "triton_ln_folded": the evidence is what the backend runs
    # (matmul.GEMM_ENGINE, token_mixing.TOKEN_ENGINE, LN_PLACEMENT). A block mixing the engines, or the
    # Mixer block with the LayerNorm folded, was not timed: no evidence for it then.
    monkeypatch.setattr(wins_table, "GEMM_ENGINE", engine)
    monkeypatch.setattr(wins_table, "TOKEN_ENGINE", token)
    monkeypatch.setattr(wins_table, "LN_PLACEMENT", placement)
    ms = {"reference": 1.0, "triton": 0.5, "triton_ln_folded": 0.25, "triton_cublas": 0.8}
    _write_run(tmp_path / "2026-12-01-NVIDIA_H100", [
        _timing("channel_mixing", ms), _timing("block", {"reference": 2.0, "triton": 1.0, "triton_cublas": 4.0},
                                               block="mixer"),
        _timing("token_mixing", {"reference": 1.0, "triton": 0.5, "triton_cublas": 0.25})])
    by_op = {r["op"]: r["speedup"] for r in wins_table.evidence(tmp_path)}
    assert (by_op["channel_mixing"], by_op["token_mixing"], by_op.get("block:mixer", 0.0)) == want


def test_token_mixing_at_resmlp_shapes_follows_the_gemm_engine(tmp_path, monkeypatch):
    # ResMLP's token linear is a GEMM: matmul.GEMM_ENGINE decides it, not TOKEN_ENGINE
    monkeypatch.setattr(wins_table, "GEMM_ENGINE", "cublas")
    monkeypatch.setattr(wins_table, "TOKEN_ENGINE", "flash")
    timing = dict(_timing("token_mixing", {"reference": 1.0, "triton": 0.5, "triton_cublas": 0.25}),
                  shape="resmlp_24")
    _write_run(tmp_path / "2026-12-01-NVIDIA_H100", [timing, _timing("block", {"reference": 1.0, "triton": 2.0,
                                                                               "triton_cublas": 0.5}, block="resmlp")])
    assert [(r["op"], r["speedup"]) for r in wins_table.evidence(tmp_path)] == [("token_mixing", 4.0),
                                                                               ("block:resmlp", 2.0)]


def test_checks_of_another_engine_are_not_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(wins_table, "GEMM_ENGINE", "cublas")
    monkeypatch.setattr(wins_table, "TOKEN_ENGINE", "flash")
    monkeypatch.setattr(wins_table, "LN_PLACEMENT", "fold")
    check = {"kind": "check", "mode": "forward", "dtype": "bf16", "shape": "mixer_b16", "batch": 4, "ok": False,
             "errors": {"out": [1.0, 0.1]}, "error": None, "sanitizer": None}
    _write_run(tmp_path / "2026-12-01-NVIDIA_H100", [
        dict(check, op="channel_mixing", ln="load", gemm="fused"),  # another engine: not evidence
        dict(check, op="channel_mixing", ln="load", gemm="cublas", dtype="fp16"),  # the shipped engine: a loss
        dict(check, op="token_mixing", ln="load", gemm="fused", dtype="fp32"),  # the flash kernels: a loss
        dict(check, op="token_mixing", ln="load", gemm="cublas", dtype="fp16"),  # the other token engine
        dict(check, op="spatial_gating", ln="fold", gemm="fused", dtype="fp16"),  # gating's other engine
        dict(check, op="spatial_gating", ln="load", gemm="cublas", dtype="fp32")])  # its engine: a loss
    rows = wins_table.evidence(tmp_path)
    assert [(r["op"], r["dtype"]) for r in rows] == [("channel_mixing", "fp16"), ("token_mixing", "fp32"),
                                                     ("spatial_gating", "fp32")]


def test_the_newest_run_decides(tmp_path):
    # The 2026-11-27 losses were of kernels since rewritten: a newer run that times a key decides it alone,
    # blocks counted for their ops; keys the newer run did not time keep their older evidence.
    _write_run(tmp_path / "2026-11-27-NVIDIA_H200", [
        _timing("channel_mixing", {"reference": 1.0, "triton": 2.0}),
        _timing("block", {"reference": 1.0, "triton": 2.0}, block="resmlp", mode="training"),
        _timing("token_mixing", {"reference": 1.0, "triton": 0.5}, dtype="fp32")])
    _write_run(tmp_path / "2026-12-01-NVIDIA_H100", [
        _timing("channel_mixing", {"reference": 1.0, "triton": 0.5}),
        _timing("block", {"reference": 1.0, "triton": 0.8}, block="mixer", mode="training")])
    _write_run(tmp_path / "2026-12-01b-NVIDIA_H100", [
        _timing("token_mixing", {"reference": 1.0, "triton": 2.0}, dtype="fp32")])
    chosen = {(r["op"], r["mode"], r["dtype"]): r for r in wins_table.chosen(wins_table.evidence(tmp_path))}
    assert set(chosen) == {("channel_mixing", "forward", "bf16"), ("token_mixing", "training", "bf16"),
                           ("channel_mixing", "training", "bf16")}
    assert chosen[("channel_mixing", "forward", "bf16")]["run"].endswith("2026-12-01-NVIDIA_H100")
    # the fp32 token win of 2026-11-27 is overruled by the later run of the same day 2026-12-01 ("b")
    assert wins_table.run_order("a/2026-12-01b-X/check.jsonl") > wins_table.run_order("a/2026-12-01-X/check.jsonl")
    assert wins_table.run_order("cpu-2026-11-23-zen3/cpu_bench.json")[0] == "2026-11-23"


def test_providers_not_run_after_a_fault_are_not_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(wins_table, "GEMM_ENGINE", "cublas")
    monkeypatch.setattr(wins_table, "TOKEN_ENGINE", "cublas")
    lost = "not run: the CUDA context was lost when triton (training) faulted"
    _write_run(tmp_path / "2026-12-01-NVIDIA_H100", [
        _timing("channel_mixing", {"reference": 1.0}, errors={"triton": "AcceleratorError: CUDA error: illegal",
                                                             "triton_cublas": lost}),
        _timing("token_mixing", {"reference": 1.0}, errors={"triton_cublas": "RuntimeError: its own failure"})])
    assert [(r["op"], r["speedup"]) for r in wins_table.evidence(tmp_path)] == [("token_mixing", 0.0)]


def test_benchmark_files_count_for_the_engines_they_ran(tmp_path, monkeypatch):
    # bench/conftest.py records the triton provider's engines; a file counts for the engines that ship
    info = dict(op="token_mixing", config="mixer_b16", batch=256, dtype="bf16", device_class="sm_90", mode="fwd")
    bench = {"benchmarks": [
        {"extra_info": dict(info, provider="eager"), "stats": {"median": 2e-3}},
        {"extra_info": dict(info, provider="triton", gemm_engine="cublas", token_engine="cublas",
                            ln_placement="load"), "stats": {"median": 1e-3}}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    for token, want in (("cublas", [2.0]), ("flash", [])):
        monkeypatch.setattr(wins_table, "TOKEN_ENGINE", token)
        assert [r["speedup"] for r in wins_table.evidence(tmp_path)] == want
    del bench["benchmarks"][1]["extra_info"]["token_engine"]  # an older file: the flash kernels ran
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert [r["speedup"] for r in wins_table.evidence(tmp_path)] == [2.0]
