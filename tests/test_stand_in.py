"""bench/stand_in.py: the GPU check's cases launched in compiled mode on a stand-in GPU (tests/fake_cuda.py),
every kernel specialised and compiled as it would launch there. CI runs a sample (each op once on sm_90; token
and channel mixing on sm_86, 99 KB of shared memory a block; the tiles part's, a timing group's and the tune
stage's warm-ups at S = 49); `python bench/stand_in.py` runs all 36 (31 check cases, 3 blocks and 2 tile shapes:
204 s on two cores with a cold Triton cache, 2026-11-29), as a GPU session's preparation should, and
`--timings` the 13 timing groups' triton providers too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import require

STAND_IN = Path(__file__).resolve().parent.parent / "bench" / "stand_in.py"
# Each op once (the flash token kernels, the fused GEMM with the affine norm in fp32, gMLP's block with its
# gate), a case compiling ~7 kernels cold: ~35 s in CI. The rest compile the same launchers' other branches.
HOPPER_SAMPLE = "^(token_mixing mixer_b16 bf16|channel_mixing resmlp_24 fp32|block gmlp_s16 bf16)$"


# The prelude of the warm-up tests' code: a stand-in sm_90 with a 4-thread compile pool, and every Triton
# compile counted, by the name of the thread it ran in (``threads``) and in stand_in.COMPILED.
_COUNTED_COMPILES = """
import json, threading
import stand_in
stand_in._setup(90)
import triton.compiler
from mixer_fast.kernels.triton import _launch
_launch.compile_workers = lambda: 4
threads = []
compile_ = triton.compiler.compile
def counted(*a, **k):
    threads.append(threading.current_thread().name)
    stand_in.COMPILED.append(1)
    return compile_(*a, **k)
triton.compiler.compile = counted
"""


def _run(args, code=None, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="0")  # stand_in.py clears the MIXER_FAST_ variables itself
    command = [sys.executable, "-c", code] if code else [sys.executable, str(STAND_IN), *args]
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=STAND_IN.parent)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r, lines[:-1], lines[-1] if lines else None


def test_a_sample_of_the_check_launches_compiled_for_hopper():
    require("triton")
    r, records, summary = _run(["--only", HOPPER_SAMPLE])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [rec["case"] for rec in records] == ["token_mixing mixer_b16 bf16", "channel_mixing resmlp_24 fp32",
                                                "block gmlp_s16 bf16"]
    assert all(rec["error"] is None for rec in records), records
    assert summary["arch"] == 90 and summary["failed"] == [] and summary["cases"] == 3
    # the first case compiles its kernels (a cold case compiles 7); later ones may find them compiled
    assert records[0]["compiles"] > 0 and summary["compiles"] >= records[0]["compiles"]


def test_a_99_kb_ampere_gpu_gets_plans_and_configs_of_its_own():
    """Below Hopper the token kernels have plans of their own (mma.sync, no wgmma), and sm_86 / sm_89 /
    sm_120 give a block 99 KB of shared memory, where the fused GEMM's first configs, sized for Hopper,
    need more (115 KB at fc1): untimed (MIXER_FAST_AUTOTUNE=none), a site takes the first that fits. On a
    stand-in sm_86 the token launchers plan for capability 86 (not Hopper's plans), and token and channel
    mixing at Mixer-B/16 compile and launch (channel mixing failed with OutOfResources before)."""
    require("triton")
    code = """
import json, sys
import stand_in
stand_in._setup(86)
from mixer_fast.kernels.triton import token_mixing
planned = []
plan = token_mixing.gpu_config
def spy(kernel, S, D, mma_bytes=2, capability=token_mixing.WGMMA_CAPABILITY):
    launch = plan(kernel, S, D, mma_bytes, capability)
    planned.append([kernel, capability, launch != plan(kernel, S, D, mma_bytes, 90)])
    return launch
token_mixing.gpu_config = spy
status = stand_in.main(["--arch", "86", "--only", "^(token|channel)_mixing mixer_b16 bf16$"])
print(json.dumps({"planned": planned}))
sys.exit(status)
"""
    r, records, last = _run([], code=code)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = records[-1]
    assert summary["arch"] == 86 and summary["cases"] == 2 and summary["failed"] == []
    assert {k for k, _, _ in last["planned"]} == {"token_mlp_fwd", "token_mlp_dx", "token_mlp_dw"}
    assert all(capability == 86 for _, capability, _ in last["planned"]), last["planned"]
    assert any(differs for _, _, differs in last["planned"]), "sm_86's plans are Hopper's"


def test_a_failing_case_is_named_and_fails_the_run():
    """A case that raises is recorded with its error, and the cases after it still run (both launchers are
    broken here, so that nothing needs compiling)."""
    require("triton")
    code = """
import sys
import stand_in
stand_in._setup(90)
from mixer_fast.kernels.triton import channel_mixing, token_mixing
def broken(*args, **kwargs):
    raise RuntimeError("the launcher broke")
token_mixing.token_mixing_forward = channel_mixing.channel_mixing_forward = broken
sys.exit(stand_in.main(["--only", "^token_mixing awkward bf16$|^channel_mixing awkward bf16$"]))
"""
    r, records, summary = _run([], code=code)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert summary["failed"] == ["token_mixing awkward bf16", "channel_mixing awkward bf16"]
    assert all("RuntimeError: the launcher broke" in rec["error"] for rec in records)


def test_the_timing_groups_are_cases_only_when_asked(monkeypatch):
    """``--timings`` adds one case per timing group (the peak aside: it runs no kernel of ours), by the
    group's name; without it, none (they take about 12 minutes on two cores)."""
    monkeypatch.syspath_prepend(str(STAND_IN.parent))
    import gpu_check
    import stand_in

    plain = [name for name, _, _ in stand_in.cases()]
    timed = [name for name, _, _ in stand_in.cases(timings=True)]
    assert plain and not any(name.startswith("timing") for name in plain)
    assert timed[:len(plain)] == plain
    assert timed[len(plain):] == [g.name for g in gpu_check.TIMING_GROUPS if g.what != "peak"]


def test_an_empty_selection_is_refused():
    require("triton")
    r, records, summary = _run(["--only", "no such case"], timeout=300)
    assert r.returncode == 2 and records == [] and summary["cases"] == 0
    assert "--only 'no such case' selects no case" in r.stderr


def test_tile_candidates_compile_at_once_before_any_is_timed():
    """gpu_check's tiles part warms every candidate before timing any (gpu_check.warm_tiles): on a stand-in
    sm_90, at S = 49 with one candidate per token kernel (none the planned launch), each candidate's kernels
    and the planned ones beside them compile once, in the compile pool's threads, while no kernel launches
    (the backward's included); then the planned runs, and each candidate under its override_plan, as the
    timing runs them, compile nothing more."""
    require("triton")
    code = _COUNTED_COMPILES + """
import gpu_check
from mixer_fast.kernels.triton.token_mixing import DW1, DW2, Launch
p = (64, 0, 0)
candidates = {"token_mlp_fwd": [Launch(p, 32, 32, 4, 2)], "token_mlp_dx": [Launch(p, 64, 16, 4, 2)],
              "token_mlp_dw": [Launch(p, 16, 32, 4, 2, (DW1, DW2))]}
import fake_cuda
modes = gpu_check.tile_modes("awkward", "bf16", 16, "cpu")
used = gpu_check.warm_tiles(modes, candidates)["compile_threads"]
warmed = list(threads)
in_warm = list(fake_cuda.LAUNCHES)
modes["forward"]()
modes["training"]()
planned = sorted(set(n for n in fake_cuda.LAUNCHES if n.startswith("token_mlp")))
late_planned = len(threads) - len(warmed)
late = [n for _, _, n in stand_in.compiles_per_candidate(modes, candidates, threads)]
print(json.dumps(dict(used=used, warmed=warmed, late=late, late_planned=late_planned, in_warm=in_warm,
                      planned=planned)))
"""
    r, _, got = _run([], code=code)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # fwd, dx and dW's two parts, each as a candidate and as planned: more warm-ups than the pool's 4 threads
    assert got["used"] == 4 and len(got["warmed"]) >= 6, got
    assert all(t.startswith("triton-compile") for t in got["warmed"]), got["warmed"]
    assert got["in_warm"] == [], "the warm-up ran kernels"
    assert got["late_planned"] == 0 and got["late"] == [0, 0, 0], got
    assert {"token_mlp_fwd_kernel", "token_mlp_dx_kernel"} <= set(got["planned"]), got["planned"]


def test_a_timing_group_compiles_at_once_before_any_provider_is_timed():
    """gpu_check's timing groups warm their triton providers up before timing any (gpu_check.warm_providers):
    on a stand-in sm_90, channel mixing at S = 49 on both engines and both LayerNorm placements, every
    kernel compiles in the compile pool's threads and none is launched while they are recorded (the
    backward's included); running each provider's calls, as the timing then does, compiles nothing more:
    the GEMM sites' untimed choices (no table here, MIXER_FAST_AUTOTUNE=none) find the config they check for
    fit compiled."""
    require("triton")
    code = _COUNTED_COMPILES + """
import fake_cuda
import gpu_check
warm = gpu_check.warm_providers
seen = {}
def spied(fns):
    seen.update(warm(fns), launched=list(fake_cuda.LAUNCHES), fns=len(fns))
    return seen
gpu_check.warm_providers = spied
late = None
try:
    stand_in.timing("channel_mixing", "awkward", "bf16")
except RuntimeError as e:
    late = str(e)
seen.pop("compile_s")
print(json.dumps(dict(seen, threads=threads, late=late, launches=sorted(set(fake_cuda.LAUNCHES)))))
"""
    r, _, got = _run([], code=code)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert got["late"] is None, got["late"]
    # triton, triton_ln_folded, triton_cublas: forward and training each
    assert got["fns"] == 6 and got["compile_threads"] == 4, got
    assert got["launched"] == [], "the warm-up ran kernels"
    assert len(got["threads"]) >= 8 and all(t.startswith("triton-compile") for t in got["threads"]), got["threads"]
    # the timed calls then launched what was compiled: the fused GEMM, LayerNorm's and the cuBLAS engine's kernels
    assert {"fused_matmul_kernel", "ln_stats_kernel", "gelu_kernel"} <= set(got["launches"]), got["launches"]


def test_the_tune_stage_compiles_every_candidate_before_timing_any():
    """``bench/tune_table.py run`` (the runbook's call 2) on a stand-in sm_90, ResMLP's token linear at S = 49,
    C = 100, bf16: every candidate config of every fused-GEMM site that the forward and backward meet compiles in the
    compile pool before the first is timed (recorded_warm_up), not a site's 4-8 at a time as each is tuned,
    and the tuning then compiles nothing more; every site is tuned and written."""
    require("triton")
    code = _COUNTED_COMPILES + """
import tempfile
from pathlib import Path
import triton.testing
import gpu_check, tune_table
leaves = gpu_check._leaves
gpu_check._leaves = lambda args, dtype, device: leaves(args, dtype, "cpu")
timed = []
def bench(fn, **kw):
    timed.append(len(threads))
    fn()
    return 1.0
triton.testing.do_bench = bench
gpu_check.SHAPES["resmlp_49"] = gpu_check.Dims(49, 100, 49, 200, "resmlp")  # its token linear: one GEMM a site
with tempfile.TemporaryDirectory() as out:
    status = tune_table.run(Path(out), [16], ["bf16"], cases=[("token_mixing", "resmlp_49")])
    tuned = json.loads((Path(out) / "tuned.json").read_text())
print(json.dumps(dict(status=status, threads=threads, timed=timed, tuned=tuned)))
"""
    r, _, got = _run([], code=code)
    assert r.returncode == 0 and got["status"] == 0, (r.stdout + r.stderr)[-3000:]
    compiles, keys = len(got["threads"]), got["tuned"].get("sm_90", {})
    assert len(keys) >= 3 and compiles >= 2 * len(keys), (compiles, keys)  # fwd, dX, dW: each several configs
    assert all(t.startswith("triton-compile") for t in got["threads"]), got["threads"]
    assert got["timed"] and set(got["timed"]) == {compiles}, "compiled while tuning: " + str(got["timed"])
    assert "compiled token_mixing resmlp_49 ahead" in r.stdout and "tuned token_mixing resmlp_49 bf16 batch 16" in r.stdout
