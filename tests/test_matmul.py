"""kernels/triton/matmul.py's deterministic split-K: the weight gradients of the S × S token linears (ResMLP,
gMLP's gate) have 4 output tiles over K = B·C; they are split over K into fp32 partial products summed in a
fixed order (no atomics). The choice of split, and the split path against float64, in Triton's interpreter.
Also the tuner (its table, keys and timing loop) and the tune stage; where they compile, in compiled mode for
a stand-in sm_90 (tests/fake_cuda.py): a tuning launch compiles its candidates at once, in a thread pool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import env_without_mixer_fast, require


def test_split_choice(monkeypatch):
    from mixer_fast.kernels.triton import _launch, matmul

    monkeypatch.setattr(_launch, "INTERPRET", False)
    # ResMLP-24's token-linear weight gradient at batch 256: 4 tiles, K = 256 · 384. One wave of 132
    # programs (33 ranges of 3 008) beats two (66) once the partials are priced in.
    assert matmul.split_k(196, 196, 256 * 384) == 33
    assert matmul.split_k(196, 196, 256 * 768) == 33  # gMLP-S/16's gate weight gradient, K = 256 · 768
    # Mixer-B/16's channel dW1: 144 tiles are two waves on 132 SMs, the second 12 tiles; four ranges make
    # 576 programs in five waves, modelled at 2/3 of the time
    assert matmul.split_cost(3072, 768, 256 * 196, 1) == 2.0
    assert matmul.split_k(3072, 768, 256 * 196) == 4
    assert matmul.split_cost(3072, 768, 256 * 196, 4) < 0.7 * 2.0
    assert matmul.split_k(3072, 768, 256 * 196, sms=114) == 3  # an H100 PCIe
    # Mixer-L/16's (256 tiles: 1.94 waves) already fills the GPU: no split, no extra pass
    assert matmul.split_k(4096, 1024, 256 * 196) == 1
    # short K: ranges of at least SPLIT_K_MIN_LEN
    assert matmul.split_k(196, 196, 2048) == 2048 // matmul.SPLIT_K_MIN_LEN
    assert matmul.split_k(196, 196, 300) == 1
    assert matmul.split_k(3072, 768, 8 * 196) == 1
    # a batch of 0: the weight gradients' K is 0, M and N are not
    assert matmul.split_k(3072, 768, 0) == matmul.split_k(196, 196, 0) == matmul.split_k(0, 768, 10**5) == 1
    # never more programs than SPLIT_K_MAX_WAVES waves
    for M, N, K in ((196, 196, 10**6), (3072, 768, 10**6), (64, 64, 10**7)):
        tiles = -(-M // 128) * -(-N // 128)
        assert tiles * (matmul.split_k(M, N, K) - 1) < matmul.SPLIT_K_MAX_WAVES * _launch.DEFAULT_SMS
    monkeypatch.setattr(_launch, "INTERPRET", True)
    assert matmul.split_k(16, 16, 65) == 2 and matmul.split_k(16, 16, 64) == 1


def test_split_plan_only_without_epilogue(monkeypatch):
    from mixer_fast.kernels.triton import _launch, matmul
    from mixer_fast.kernels.triton.matmul import flat

    monkeypatch.setattr(_launch, "INTERPRET", False)
    axes = (flat(196, 196), flat(196, 1))
    common = dict(a_pro=0, b_pro=0, has_bias=False, bias_on_m=False, epi_gelu=False, epi_gelu_grad=False,
                  store_branch=False, has_scale=False, has_ss=False, ss_on_n=False, has_res=False,
                  approximate="none", precision="ieee", idx64=False, out_numel=196 * 196)
    p = matmul.plan(196, 196, 98304, axes, axes, axes, None, None, allow_split=True, **common)
    assert p.split_k == 33 and p.grid({"BLOCK_M": 128, "BLOCK_N": 128}) == (4, 33)
    k_len, o_split = p.scalars[-2:]
    assert k_len % matmul.SPLIT_K_GRANULE == 0 and (p.split_k - 1) * k_len < 98304 <= p.split_k * k_len
    assert o_split == 196 * 196
    assert matmul.plan(196, 196, 98304, axes, axes, axes, None, None, allow_split=False, **common).split_k == 1
    with_bias = dict(common, has_bias=True)
    assert matmul.plan(196, 196, 98304, axes, axes, axes, None, None, allow_split=True, **with_bias).split_k == 1


@pytest.mark.parametrize("K", [65, 200, 1000])
def test_split_k_matches_float64_and_is_deterministic(triton_backend, monkeypatch, K):
    import torch

    from conftest import DEVICE
    from mixer_fast.kernels.triton import _launch, matmul
    from mixer_fast.kernels.triton.matmul import flat

    g = torch.Generator().manual_seed(K)
    M, N = 40, 24
    a = torch.randn(M, K, generator=g).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(K, N, generator=g).to(torch.bfloat16).to(DEVICE)
    if not _launch.INTERPRET:  # a GPU's model would not split so small a GEMM: the interpreter's rule
        monkeypatch.setattr(matmul, "split_k", lambda M, N, K, sms=0: 2 if K > matmul.SPLIT_K_GRANULE else 1)
    assert matmul.split_k(M, N, K) == 2  # the path under test

    def run():
        out = torch.full((M, N), float("nan"), device=DEVICE)
        return matmul.fused_matmul(a, (flat(M, K), flat(K, 1)), b, (flat(K, N), flat(N, 1)), out,
                                   (flat(M, N), flat(N, 1)), M, N, K, variant="plain")

    out = run()
    ref = a.double() @ b.double()
    assert (out.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.equal(out, run())


def test_tma_layouts_follow_the_rules_of_tma(monkeypatch):
    import torch

    from mixer_fast.kernels.triton import matmul
    from mixer_fast.kernels.triton.matmul import TMA_K_INNER, TMA_K_OUTER, TMA_NONE, flat, split

    x = torch.zeros(2, 196, 768, dtype=torch.bfloat16)
    tokens, channels = split(196, 196 * 768, 768), flat(768, 1)  # (b, s) collapses to one stride
    assert not tokens.split
    assert matmul.tma_layout(x, tokens, channels, 768) == TMA_K_INNER  # channel mixing's A = x
    assert matmul.tma_layout(x, channels, tokens, 392) == TMA_K_OUTER  # a weight gradient's B = x
    w = torch.zeros(3072, 768, dtype=torch.bfloat16)
    assert matmul.tma_layout(w, flat(3072, 768), flat(768, 1), 768) == TMA_K_INNER
    # rows of 100 bf16 (200 B) are not 16-byte multiples; a split axis is two strides; K = 0; a base off 16 B
    assert matmul.tma_layout(torch.zeros(8, 100, dtype=torch.bfloat16), flat(8, 100), flat(100, 1), 100) == TMA_NONE
    assert matmul.tma_layout(x, split(768, 196 * 768, 1), flat(196, 768), 196) == TMA_NONE
    assert matmul.tma_layout(w, flat(3072, 768), flat(768, 1), 0) == TMA_NONE
    assert matmul.tma_layout(w.view(-1)[1:].as_strided((8, 16), (16, 1)), flat(8, 16), flat(16, 1), 16) == TMA_NONE
    monkeypatch.setenv(matmul.TMA_ENV, "0")  # the switch that turns descriptors off
    assert matmul.tma_layout(w, flat(3072, 768), flat(768, 1), 768) == TMA_NONE
    configs = matmul.site_configs("ln_gelu", False)
    offered = matmul.tma_configs("ln_gelu", configs)
    assert offered[:len(configs)] == configs
    assert all(c[5] == matmul.TMA and c[0] >= matmul.TMA_MIN_BLOCK_M for c in offered[len(configs):])
    assert len(offered) > len(configs)
    assert matmul.tma_configs("gelu_grad", matmul.site_configs("gelu_grad", False)) == matmul.site_configs(
        "gelu_grad", False)


@pytest.mark.parametrize("layout", ["k_inner", "k_outer"])
def test_tma_loads_match_pointer_loads_bitwise(triton_backend, monkeypatch, layout):
    """The interpreter launches with descriptors wherever the operands allow; the same GEMM by pointers
    (tma_layout patched to TMA_NONE) must give the same bits, prologue (LayerNorm of A, GELU of B) and
    K tail (K = 72, not a multiple of the interpreter's BLOCK_K) included; A also in fp32 (autocast)."""
    import torch

    from mixer_fast.kernels.triton import _launch, matmul
    from mixer_fast.kernels.triton.matmul import A_LAYERNORM, B_GELU, flat

    if not _launch.INTERPRET:
        pytest.skip("the interpreter's rule (descriptors wherever allowed); on a GPU only the tuner's TMA "
                    "configs load by descriptors, and bench/gpu_check.py checks them")
    g = torch.Generator().manual_seed(5)
    descriptor = matmul._descriptor
    M, N, K = 40, 48, 72
    for a_dtype in (torch.bfloat16, torch.float32):
        if layout == "k_inner":  # A (M, K) and B stored (N, K): K contiguous in both
            a = torch.randn(M, K, generator=g).to(a_dtype)
            b = torch.randn(N, K, generator=g).to(torch.bfloat16)
            a_axes, b_axes = (flat(M, K), flat(K, 1)), (flat(K, 1), flat(N, K))
        else:  # A stored (K, M) and B (K, N): the other axis contiguous
            a = torch.randn(K, M, generator=g).to(a_dtype)
            b = torch.randn(K, N, generator=g).to(torch.bfloat16)
            a_axes, b_axes = (flat(M, 1), flat(K, M)), (flat(K, N), flat(N, 1))
        mean, rstd = torch.randn(M, generator=g), torch.rand(M, generator=g) + 0.5
        w, bias = torch.randn(K, generator=g).to(a_dtype), torch.randn(K, generator=g).to(a_dtype)
        expected_layout = matmul.TMA_K_INNER if layout == "k_inner" else matmul.TMA_K_OUTER
        assert matmul.tma_layout(a, *a_axes, K) == expected_layout
        assert matmul.tma_layout(b, b_axes[1], b_axes[0], K) == expected_layout

        def run():
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
            return matmul.fused_matmul(a, a_axes, b, b_axes, out, (flat(M, N), flat(N, 1)), M, N, K,
                                       variant="plain", a_pro=A_LAYERNORM, a_stats=(mean, rstd), a_vec=(w, bias),
                                       b_pro=B_GELU)

        made = []
        with monkeypatch.context() as m:
            m.setattr(matmul, "_descriptor", lambda *args: made.append(args[1]) or descriptor(*args))
            with_tma = run()
        assert made == [expected_layout] * 2  # both operands loaded by descriptors
        with monkeypatch.context() as m:
            m.setattr(matmul, "tma_layout", lambda *args: matmul.TMA_NONE)
            by_pointers = run()
        assert not with_tma.isnan().any()
        assert torch.equal(with_tma, by_pointers), a_dtype


def _key(matmul, variant="ln_b", M=50176, N=768, K=3072, **flags):
    meta = dict(A_PRO=0, B_PRO=1, EPI_GELU=False, EPI_GELU_GRAD=False, HAS_RES=False, RES_MUL=False,
                PRECISION="ieee", IDX64=False, K_SPLIT=False)
    return matmul.tune_key(variant, M, N, K, dict(meta, **flags))


def test_tune_keys_bucket_the_batch():
    from mixer_fast.kernels.triton import matmul

    # batch 256 and 200 of Mixer-B/16 (M = B·196) share a bucket; 64 does not; flags always count
    assert _key(matmul, M=256 * 196) == _key(matmul, M=200 * 196) != _key(matmul, M=64 * 196)
    assert _key(matmul) != _key(matmul, K_SPLIT=True) and _key(matmul) != _key(matmul, variant="gelu_b")


def test_tuner_takes_the_table_its_neighbour_or_nothing(monkeypatch):
    from mixer_fast.kernels.triton import matmul

    tuner = matmul.Tuner()
    cfg = list(matmul.VARIANTS["ln_b"][1][1])
    tuner._table = {"sm_90": {_key(matmul): cfg, _key(matmul, variant="plain"): [16, 16, 16, 4, 1]}}
    candidates = matmul.site_configs("ln_b", False)
    assert tuner.shipped("sm_90", _key(matmul), candidates) == tuple(cfg)
    # another batch: the nearest bucket of the same site and flags
    assert tuner.shipped("sm_90", _key(matmul, M=64 * 196), candidates) == tuple(cfg)
    # not for other flags, another GPU, or a config no longer among the site's
    assert tuner.shipped("sm_90", _key(matmul, K_SPLIT=True), candidates) is None
    assert tuner.shipped("sm_80", _key(matmul), candidates) is None
    assert tuner.shipped("sm_90", _key(matmul, variant="plain"), matmul.site_configs("plain", False)) is None
    ran = []
    assert tuner.config("sm_90", _key(matmul), candidates, ran.append) == tuple(cfg) and not ran
    monkeypatch.setenv(matmul.AUTOTUNE_ENV, "1")  # re-tune: the table is ignored
    assert tuner.shipped("sm_90", _key(matmul), candidates) is None


def test_shipped_table_is_valid():
    import importlib.resources
    import json

    from mixer_fast.kernels.triton import matmul

    table = json.loads(importlib.resources.files("mixer_fast").joinpath(matmul.TUNED_FILE).read_text())
    for device_class, entries in table.items():
        if device_class.startswith("_"):
            continue
        assert device_class.startswith("sm_"), device_class
        for key, cfg in entries.items():
            site, dims, flags = key.split("|")
            assert all(int(v) & (int(v) - 1) == 0 for v in dims.split("x")), key
            split, jax, fp32 = "K_SPLIT=True" in flags, site.startswith("jax:"), site.endswith(",fp32")
            name = site.removeprefix("jax:").removesuffix(",fp32")
            candidates = matmul.site_configs(name, split, fp32=fp32)
            if not (jax or fp32):  # what the torch launcher offers where the operands allow TMA
                candidates = matmul.tma_configs(name, candidates)
            assert tuple(cfg) in candidates, (key, cfg)


def test_tune_table_merge():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tune_table", Path(__file__).parent.parent / "bench" / "tune_table.py")
    tune_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_table)
    table = {"_about": "text", "sm_90": {"a": [1, 2, 3, 4, 5]}}
    merged = tune_table.merge(table, [{"sm_90": {"a": [6, 7, 8, 9, 10], "b": [1, 1, 1, 1, 1]}},
                                      {"sm_100": {"c": [2, 2, 2, 2, 2]}}])
    assert merged == {"_about": "text", "sm_90": {"a": [6, 7, 8, 9, 10], "b": [1, 1, 1, 1, 1]},
                      "sm_100": {"c": [2, 2, 2, 2, 2]}}
    assert table["sm_90"] == {"a": [1, 2, 3, 4, 5]}  # not modified in place


def test_tune_stage_makes_every_case_s_inputs():
    """``bench/tune_table.py run`` (gpu_suite.sh's tune stage) imports the tests' input makers as gpu_check's
    workers do: its gMLP case once failed on an import (bench/'s conftest shadowed tests/'s), found by
    running the whole stage on a stand-in GPU (tests/fake_cuda.py; bench/NOTES.md has that run), and
    which only a GPU would otherwise have shown. A process of its own: this one has tests/'s conftest."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent.parent / "bench")!r})
import tune_table
tune_table.import_paths()
import gpu_check
for op, shape in tune_table.CASES:
    gpu_check._op_inputs(op, gpu_check.SHAPES[shape], 1, drop_path=False)
print("ok", len(tune_table.CASES))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_without_mixer_fast(),
                       timeout=300, cwd=Path(__file__).parent.parent / "bench")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.split() == ["ok", "5"]


def test_the_tune_stage_compiles_ahead_only_the_first_dtype_of_a_key_family(monkeypatch, tmp_path):
    """bf16 and fp16 share their tune keys (matmul.tune_key names no 16-bit dtype), so the tune stage records
    for its compile-ahead only the steps of the first dtype of each family: the others' sites are tuned by the
    time they run, and compiling their every candidate would be waste (252 compiles against 155 on the
    stand-in, bench/NOTES.md). Every step then runs, in order, and its cases are written."""
    import functools

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "bench"))
    import gpu_check
    import tune_table

    monkeypatch.setattr(tune_table, "import_paths", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("MIXER_FAST_AUTOTUNE", "0")  # run() sets it
    ran, recorded = [], []
    monkeypatch.setattr(tune_table, "training_step", lambda *a: functools.partial(ran.append, a[2:]))
    monkeypatch.setattr(gpu_check, "recorded_warm_up", lambda runs: recorded.append([r.args[0] for r in runs]) or {})
    assert tune_table.run(tmp_path, [64], ["fp16", "bf16", "fp32"], cases=[("channel_mixing", "awkward")]) == 0
    # fp16's and fp32's steps, each LayerNorm placement
    assert recorded == [[(dtype, 64, placement) for dtype in ("fp16", "fp32") for placement in ("load", "fold")]]
    assert ran == [(dtype, 64, placement) for dtype in ("fp16", "bf16", "fp32") for placement in ("load", "fold")]
    assert (tmp_path / "tuned.json").exists() and tune_table.key_family("fp16") == tune_table.key_family("bf16")


def test_tuner_times_each_config_once_per_key(monkeypatch):
    import triton.testing

    from mixer_fast.kernels.triton import matmul

    tuner = matmul.Tuner()
    tuner._table = {}
    candidates = matmul.site_configs("plain", False)
    fastest = candidates[1]
    ran = []

    def fake_bench(fn, **kw):
        fn()
        return 1.0 if ran[-1] == fastest else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    key = _key(matmul, variant="plain", B_PRO=0)
    assert tuner.config("sm_90", key, candidates, ran.append) == fastest
    assert ran == list(candidates)
    assert tuner.config("sm_90", key, candidates, ran.append) == fastest and len(ran) == len(candidates)
    assert tuner.timed == {"sm_90": {key: fastest}} == tuner.chosen
    assert tuner.times == {"sm_90": {key: {"x".join(map(str, c)): 1.0 if c == fastest else 2.0 for c in candidates}}}


def test_tuner_compiles_the_candidates_before_timing(monkeypatch):
    """Tuning, every candidate is compiled (``warm``) before the first is timed, each once."""
    import triton.testing

    from mixer_fast.kernels.triton import _launch, matmul

    tuner = matmul.Tuner()
    tuner._table = {}
    candidates = matmul.site_configs("plain", False)
    events = []
    monkeypatch.setattr(_launch, "compile_concurrently", lambda warmups: events.append("compile") or
                        [w() for w in warmups])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    key = _key(matmul, variant="plain", B_PRO=0)
    tuner.config("sm_90", key, candidates, lambda cfg: events.append(("run", cfg)),
                 warm=lambda cfg: events.append(("warm", cfg)))
    assert events == ["compile", *(("warm", c) for c in candidates), *(("run", c) for c in candidates)]
    # a chosen key neither compiles nor times again
    tuner.config("sm_90", key, candidates, lambda cfg: events.append(("run", cfg)),
                 warm=lambda cfg: events.append(("warm", cfg)))
    assert len(events) == 1 + 2 * len(candidates)


def test_compile_concurrently_uses_a_pool_only_where_it_can(monkeypatch):
    """The warm-ups run in the caller's thread with Triton's AsyncCompileMode active (their compiles go to
    the pool), and the mode is cleared after; not at all where a pool gains nothing (one CPU, one warm-up,
    the interpreter: each config then compiles at its first launch); into the caller's own AsyncCompileMode
    where one is active. A warm-up that raises is passed over, an interrupt is not."""
    import concurrent.futures
    import threading

    require("triton")
    async_compile = require("triton.runtime._async_compile")  # Triton 3.4 and later
    AsyncCompileMode, active_mode = async_compile.AsyncCompileMode, async_compile.active_mode

    from mixer_fast.kernels.triton import _launch

    seen = []

    def warm():
        seen.append((threading.current_thread() is threading.main_thread(), active_mode.get()))

    monkeypatch.setattr(_launch, "INTERPRET", False)
    assert _launch.compile_concurrently([warm] * 3, workers=4) == 3
    assert len(seen) == 3 and all(main and mode is not None for main, mode in seen)
    assert active_mode.get() is None
    seen.clear()
    assert _launch.compile_concurrently([warm] * 3, workers=1) == 0
    assert _launch.compile_concurrently([warm], workers=4) == 0
    assert seen == []
    with concurrent.futures.ThreadPoolExecutor(2) as pool, AsyncCompileMode(pool) as outer:
        assert _launch.compile_concurrently([warm] * 2, workers=4) == 0
    assert seen == [(True, outer)] * 2
    seen.clear()
    monkeypatch.setattr(_launch, "INTERPRET", True)
    assert _launch.compile_concurrently([warm] * 2, workers=4) == 0 and seen == []
    monkeypatch.setattr(_launch, "INTERPRET", False)

    def broken():  # raised before its compile is submitted (binding its arguments, say): passed over
        raise TypeError("warmup() got an unexpected keyword argument")

    assert _launch.compile_concurrently([warm, broken, warm], workers=2) == 2 and len(seen) == 2
    with concurrent.futures.ThreadPoolExecutor(2) as pool, AsyncCompileMode(pool):
        assert _launch.compile_concurrently([broken, warm], workers=4) == 0 and len(seen) == 3

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _launch.compile_concurrently([warm, interrupted], workers=2)
    assert active_mode.get() is None


class _FakeKernel:
    """A JIT function's launch surface: ``kernel[grid](*args)`` runs, ``warmup(*args, grid=...)`` compiles."""

    def __init__(self) -> None:
        self.events = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.events.append(("launch", grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.events.append(("warmup", grid, args, kwargs))


def test_on_grid_launches_or_records(monkeypatch):
    """``on_grid(kernel, grid)(...)`` launches; under record_launches it records the warm-up for later, in
    every thread (a CUDA backward runs in autograd's own), and runs nothing; launching() runs launches under
    it (a tuner's timed candidates); and in Triton's interpreter it always launches."""
    import threading

    from mixer_fast.kernels.triton import _launch

    monkeypatch.setattr(_launch, "INTERPRET", False)
    k = _FakeKernel()
    _launch.on_grid(k, (2,))(1, X=3)
    assert k.events == [("launch", (2,), (1,), {"X": 3})]
    k.events.clear()
    with _launch.record_launches() as recorded:
        _launch.on_grid(k, (2,))(1, X=3)
        other = threading.Thread(target=lambda: _launch.on_grid(k, (8,))(9))
        other.start()
        other.join()
        with _launch.launching():
            _launch.on_grid(k, (4,))(5)
        with pytest.raises(RuntimeError, match="already being recorded"):
            with _launch.record_launches():
                pass
    assert k.events == [("launch", (4,), (5,), {})] and len(recorded) == 2
    _launch.on_grid(k, (10,))(11)  # the recording is over
    for warm in recorded:
        warm()
    assert k.events[1:] == [("launch", (10,), (11,), {}), ("warmup", (2,), (1,), {"X": 3}),
                            ("warmup", (8,), (9,), {})]
    k.events.clear()
    monkeypatch.setattr(_launch, "INTERPRET", True)
    with _launch.record_launches() as recorded:
        _launch.on_grid(k, (2,))(1)
    assert k.events == [("launch", (2,), (1,), {})] and recorded == []


def test_a_tuner_under_a_recording_defers_its_choice(monkeypatch):
    """A GEMM site with no table entry met while launches are recorded (gpu_check.warm_providers' runs)
    records every candidate's compile with the launches and answers its untimed first choice, unkept: nothing
    is launched or timed. Outside the recording the key is then tuned as usual; under MIXER_FAST_AUTOTUNE=none
    only the untimed choice's first config is recorded. launching() lets a thread time for real."""
    import triton.testing

    from mixer_fast.kernels.triton import _launch, matmul

    monkeypatch.setattr(_launch, "INTERPRET", False)
    monkeypatch.setattr(_launch, "compile_concurrently", lambda warmups: 0)
    k = _FakeKernel()
    candidates = matmul.site_configs("plain", False)
    key = _key(matmul, variant="plain", B_PRO=0)

    def bench(fn, **kw):
        fn()
        return 1.0 if len(k.events) == 2 else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", bench)
    tuner = matmul.Tuner()
    tuner._table = {}

    def run(cfg):
        _launch.on_grid(k, cfg)()

    def warm(cfg):
        k.warmup(grid=cfg)

    with _launch.record_launches() as recorded:
        run(tuner.config("sm_90", key, candidates, run, warm=warm))
    assert k.events == [] and tuner.chosen == {"sm_90": {}} and tuner.timed == {}
    for w in recorded:
        w()
    assert k.events == [("warmup", c, (), {}) for c in candidates] + [("warmup", candidates[0], (), {})]
    k.events.clear()
    assert tuner.config("sm_90", key, candidates, run, warm=warm) == candidates[1]  # tuned now
    assert k.events == [("launch", c, (), {}) for c in candidates]
    k.events.clear()
    monkeypatch.setenv(matmul.AUTOTUNE_ENV, matmul.AUTOTUNE_NONE)
    with _launch.record_launches() as recorded:
        assert tuner.config("sm_90", key + "x", candidates, run, warm=warm, fits=lambda c: False) == candidates[0]
    assert len(recorded) == 1 and k.events == []
    monkeypatch.setenv(matmul.AUTOTUNE_ENV, "1")
    with _launch.record_launches() as recorded, _launch.launching():
        assert tuner.config("sm_90", key + "y", candidates, run, warm=warm) == candidates[1]
    assert recorded == [] and k.events[-1] == ("launch", candidates[-1], (), {})


def test_tuning_compiles_each_candidate_once_in_the_pool_as_it_launches():
    """A real fused-GEMM launch with no table entry, compiled for sm_90 on a stand-in device
    (tests/fake_cuda.py): every candidate config, TMA ones included, compiles once, in the compile pool's
    threads, under the key its timed launch then finds (nothing compiles while timing), and the fastest
    is chosen."""
    require("triton")
    from mixer_fast.kernels.triton import matmul

    code = """
import json, threading
import fake_cuda
fake_cuda.install(90)
import torch, triton.compiler, triton.testing
from mixer_fast.kernels.triton import _launch, matmul
_launch.compile_workers = lambda: 4
threads, timed = [], []
compile = triton.compiler.compile
def counted(*a, **k):
    threads.append(threading.current_thread().name)
    return compile(*a, **k)
triton.compiler.compile = counted
def bench(fn, **kw):
    before = len(threads)
    fn()
    timed.append(len(threads) - before)
    return 1.0 if len(timed) == 2 else 2.0
triton.testing.do_bench = bench
M, N, K = 512, 256, 128
a, b = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(K, N, dtype=torch.bfloat16)
out = torch.empty(M, N, dtype=torch.bfloat16)
flat = matmul.flat
matmul.fused_matmul(a, (flat(M, K), flat(K, 1)), b, (flat(K, N), flat(N, 1)), out, (flat(M, N), flat(N, 1)),
                    M, N, K, variant="plain")
candidates = matmul.tma_configs("plain", matmul.site_configs("plain", False))
print(json.dumps(dict(threads=threads, timed=timed, launches=len(fake_cuda.LAUNCHES),
                      candidates=[list(c) for c in candidates], chosen=list(*matmul.TUNER.chosen["sm_90"].values()))))
"""
    env = dict(env_without_mixer_fast(), TRITON_INTERPRET="0", MIXER_FAST_AUTOTUNE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    n = len(got["candidates"])
    assert any(c[5:] == [matmul.TMA] for c in got["candidates"]), "the stand-in sm_90 device offers TMA configs"
    assert len(got["threads"]) == n and all(t.startswith("triton-compile") for t in got["threads"]), got["threads"]
    assert got["timed"] == [0] * n and got["launches"] == n + 1
    assert got["chosen"] == got["candidates"][1]


def test_autotune_none_never_times(monkeypatch):
    """MIXER_FAST_AUTOTUNE=none: the table's config where it has one, else the site's first TMA config where
    TMA is offered, else its first config; nothing timed. Other values are refused by name."""
    import triton.testing

    from mixer_fast.kernels.triton import matmul

    monkeypatch.setenv(matmul.AUTOTUNE_ENV, matmul.AUTOTUNE_NONE)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed under AUTOTUNE=none"))
    plain = matmul.site_configs("plain", False)
    with_tma = matmul.tma_configs("plain", plain)
    tuner = matmul.Tuner()
    tuner._table = {}
    key = _key(matmul, variant="plain", B_PRO=0)
    assert tuner.config("sm_90", key, with_tma, lambda cfg: None) == (*plain[0][:5], matmul.TMA)
    assert tuner.config("sm_90", key + "x", plain, lambda cfg: None) == plain[0]
    assert tuner.timed == {} and tuner.times == {}
    tuner = matmul.Tuner()
    tuner._table = {"sm_90": {key: list(plain[2])}}
    assert tuner.config("sm_90", key, with_tma, lambda cfg: None) == plain[2]
    # where the GPU's shared memory is smaller (99 KB on sm_86 / sm_89 / sm_120): the first that fits, TMA
    # ones first; none fits: the first, whose launch then says what it needs
    tuner = matmul.Tuner()
    tuner._table = {}
    tma = [c for c in with_tma if c[5:] == (matmul.TMA,)]
    asked = []
    assert tuner.config("sm_86", key, with_tma, lambda cfg: None,
                        fits=lambda cfg: asked.append(cfg) or cfg == plain[1]) == plain[1]
    assert asked == [*tma, plain[0], plain[1]]
    assert matmul.untuned_choice(with_tma, lambda cfg: cfg == tma[1]) == tma[1]
    assert matmul.untuned_choice(with_tma, lambda cfg: False) == tma[0]
    assert tuner.timed == {}
    monkeypatch.setenv(matmul.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="MIXER_FAST_AUTOTUNE: expected 0, 1 or none, got 'yes'"):
        matmul.Tuner().config("sm_90", key, plain, lambda cfg: None)


def test_site_configs_name_the_site():
    from mixer_fast.kernels.triton import matmul

    with pytest.raises(ValueError, match="variant: expected one of"):
        matmul.site_configs("nope", False)
    with pytest.raises(ValueError, match="split-K launches are planned for"):
        matmul.site_configs("ln_gelu", True)


def test_scaled16_round_trips_and_flags_what_it_divided():
    from mixer_fast.kernels.triton import matmul

    values = [50176, 3072, 768, 196, 1, 0, 16, 2**31 + 16, 37]
    scaled, mask = matmul.scaled16(values)
    assert [v * 16 if mask >> i & 1 else v for i, v in enumerate(scaled)] == values
    # multiples of 16 below 2³¹ are divided (0 too); 196, 1, 37 and the int64 value are not
    assert [mask >> i & 1 for i in range(len(values))] == [1, 1, 1, 0, 0, 1, 1, 0, 0]


def test_fp32_operands_take_the_fma_configs():
    from mixer_fast.kernels.triton import matmul

    for site in matmul.VARIANTS:
        linear = site in ("token_linear", "gate_proj", "gate_b")
        expected = matmul.FP32_TOKEN_LINEAR_CONFIGS if linear else matmul.FP32_CONFIGS
        assert matmul.site_configs(site, False, fp32=True) == expected
    for site in matmul.SPLIT_CONFIGS:
        assert matmul.site_configs(site, True, fp32=True) == matmul.FP32_SPLIT_CONFIGS
    with pytest.raises(ValueError, match="split-K launches are planned for"):
        matmul.site_configs("residual", True, fp32=True)
    fp32 = matmul.FP32_CONFIGS + matmul.FP32_SPLIT_CONFIGS + matmul.FP32_TOKEN_LINEAR_CONFIGS
    assert all(bm * bn <= 64 * 64 for bm, bn, *_ in fp32)


@pytest.mark.parametrize("rows", [8, 16, 32])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_col_sum_is_the_sum_of_the_stored_output(triton_backend, monkeypatch, dtype, rows):
    """The epilogue's column sums (a bias gradient, e.g. fc1's from dZ): Σ_m of the values as stored. In
    the interpreter (BLOCK_M 32, the epilogue on column halves) with 1, 2 or 4 partial rows a tile, and an
    M that ends inside a partial's rows and leaves later partials of its tile empty (M = 40); on a GPU the
    site's own rows per partial. Deterministic; M = 0 gives zeros."""
    import torch

    from conftest import DEVICE
    from mixer_fast.kernels.triton import _launch, matmul
    from mixer_fast.kernels.triton.matmul import flat

    if _launch.INTERPRET:
        monkeypatch.setattr(matmul, "INTERPRET_COL_SUM_ROWS", rows)
        assert matmul.col_sum_rows("gelu_grad") == rows
    elif rows != 32:
        pytest.skip("on a GPU the rows per partial are the site's (col_sum_rows), not the test's")
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(11)
    M, N, K = 40, 48, 24
    a = torch.randn(M, K, generator=g).to(dt).to(DEVICE)
    b = torch.randn(K, N, generator=g).to(dt).to(DEVICE)
    z = torch.randn(M, N, generator=g).to(dt).to(DEVICE)

    def run(m):
        out = torch.full((m, N), float("nan"), dtype=dt, device=DEVICE)
        sums = torch.full((N,), float("nan"), device=DEVICE)
        matmul.fused_matmul(a[:m], (flat(m, K), flat(K, 1)), b, (flat(K, N), flat(N, 1)), out,
                            (flat(m, N), flat(N, 1)), m, N, K, variant="gelu_grad", aux=z[:m],
                            epi_gelu_grad=True, col_sum=sums)
        return out, sums

    out, sums = run(M)
    expected = out.double().sum(0)
    assert (sums.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert torch.equal(sums, run(M)[1])
    assert torch.equal(run(0)[1], torch.zeros(N, device=DEVICE))
