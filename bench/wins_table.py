"""The automatic choice's table of measured wins (mixer_fast/measured_wins.json), generated from bench/results/.

    python bench/wins_table.py           print the chosen rows and every piece of evidence
    python bench/wins_table.py --write   rewrite mixer_fast/measured_wins.json

Evidence is every committed timing of a fused backend next to the reference at one op or block, mode,
dtype and device class: ``check.jsonl`` of bench/gpu_check.py ("timing" records, and "jax_timing" ones of
its JAX part against XLA), pytest-benchmark files
(``bench.json`` of bench/gpu_suite.sh, ``cpu_bench*.json`` of bench/test_cpu.py) and the 2026-11-27 H200
``measurements.jsonl``. The rule: a backend is chosen for (op, mode, dtype, device class) when it has
evidence there and every piece of it is faster than the reference (reference time / backend time > 1,
medians where a file has several rounds), counting only the newest run (results folder) with evidence for
that key: older runs timed kernels since rewritten. A block's timing counts for each op the block is made
of. A fault or error of the backend in a timing, or a failed correctness check of gpu_check.py (forward →
forward, backward → training), is evidence too: a loss (speedup 0). Backward-only benchmarks ("bwd") are not a mode
a call runs in and are left out. Nothing else enters the table: no evidence, no automatic choice.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

# the LayerNorm placement and the engines the backend runs
from mixer_fast.kernels.triton.matmul import GEMM_CUBLAS, GEMM_ENGINE, LN_FOLDED, LN_ON_LOAD, LN_PLACEMENT
from mixer_fast.kernels.triton.token_mixing import TOKEN_CUBLAS, TOKEN_ENGINE
from gpu_check import CUBLAS_PROVIDER, FOLDED_PROVIDER  # the providers that time the other choices

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TABLE = ROOT / "mixer_fast" / "measured_wins.json"
RULE = ("a fused backend is chosen for (op, mode, dtype, device class) only when it has committed evidence there "
        "and every piece of it from the newest run that has any is faster than the reference (speedup = reference "
        "ms / backend ms > 1; a fault or a failed correctness check counts as a loss)")
BLOCK_OPS = {"mixer": ("token_mixing", "channel_mixing"), "resmlp": ("token_mixing", "channel_mixing"),
             "gmlp": ("spatial_gating",)}
MODES = {"forward": "forward", "fwd": "forward", "training": "training", "train": "training", "fwd+bwd": "training",
         "fwd_bwd": "training", "backward": "training"}
SKIPPED_MODES = {"bwd"}  # a backward alone: no call runs only that
# GPUs of results that predate the device_class field.
GPU_CLASSES = {"NVIDIA H200": "sm_90", "NVIDIA H100 80GB HBM3": "sm_90", "NVIDIA H100": "sm_90"}
# Fused providers in pytest-benchmark files, and the reference provider they are measured against.
FUSED = {"triton": ("torch", "triton"), CUBLAS_PROVIDER: ("torch", "triton"), "cpu": ("torch", "cpu"),
         "pallas": ("jax", "pallas"),
         "jax-triton": ("jax", "triton")}
REFERENCE = {"torch": "eager", "jax": "xla"}


def evidence_row(framework: str, backend: str, device_class: str, op: str, mode: str, dtype: str, shape: str,
                 batch: int, reference_ms: Optional[float], backend_ms: Optional[float], source: Path,
                 failure: Optional[str] = None) -> dict:
    """One piece of evidence; ``failure`` (a fault, a failed check) makes it a loss whatever the times."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {sorted(MODES)} in {source}, got {mode!r}")
    speedup = 0.0 if failure or not backend_ms or not reference_ms else reference_ms / backend_ms
    return {"framework": framework, "backend": backend, "device_class": device_class, "op": op,
            "mode": MODES[mode], "dtype": dtype, "shape": shape, "batch": batch,
            "reference_ms": None if reference_ms is None else round(reference_ms, 4),
            "backend_ms": None if backend_ms is None else round(backend_ms, 4),
            "speedup": round(speedup, 3), **({"failure": failure[:200]} if failure else {}),
            "source": (source.relative_to(ROOT) if source.is_relative_to(ROOT) else source).as_posix()}


def block_op(config: str) -> str:
    """"block:mixer" for mixer_b16 and the like."""
    for block in BLOCK_OPS:  # named configs start with their family: mixer_b16, resmlp_24, gmlp_s16
        if config.startswith(block):
            return f"block:{block}"
    raise ValueError(f"config: no block family known for {config!r}")


# What changes what the triton backend runs, per op or block (gpu_check.py times each choice as a provider):
# fc1's LayerNorm placement (matmul.LN_PLACEMENT, fused GEMMs only), and two engines, fused kernels or cuBLAS:
# matmul.GEMM_ENGINE (the channel GEMMs and ResMLP's token linear) and token_mixing.TOKEN_ENGINE (Mixer's
# token MLP). gpu_check's providers: "triton" (all fused, LayerNorm on load), "triton_ln_folded" (fused,
# folded), "triton_cublas" (both engines on cuBLAS); a mix of engines within one block is not timed.
LN_OPS = frozenset({"channel_mixing", "spatial_gating", "block:mixer", "block:resmlp", "block:gmlp"})
ENGINE_FUSED, ENGINE_CUBLAS = "fused", "cublas"  # the engines as gpu_check's check records name them ("gemm")
PROVIDERS = {(ENGINE_FUSED, LN_ON_LOAD): "triton", (ENGINE_FUSED, LN_FOLDED): FOLDED_PROVIDER,
             (ENGINE_CUBLAS, LN_ON_LOAD): CUBLAS_PROVIDER}


def engines_on_cublas(op: str, shape: str, gemm_engine: Optional[str] = None,
                      token_engine: Optional[str] = None) -> tuple:
    """For each engine that changes what ``op`` runs at ``shape``, whether it is on cuBLAS (the shipped
    engines, GEMM_ENGINE and TOKEN_ENGINE, unless given). Token mixing is ResMLP's token linear at ResMLP
    shapes (a GEMM: the GEMM engine), else the Mixer MLP (the token engine)."""
    gemm = (gemm_engine or GEMM_ENGINE) == GEMM_CUBLAS
    token_mlp = (token_engine or TOKEN_ENGINE) == TOKEN_CUBLAS
    if op == "token_mixing":
        return (gemm,) if shape.startswith("resmlp") else (token_mlp,)
    if op == "block:mixer":
        return token_mlp, gemm
    if op in ("channel_mixing", "spatial_gating", "block:resmlp", "block:gmlp"):
        return (gemm,)
    return ()


def shipped(op: str, shape: str, gemm_engine: Optional[str] = None, token_engine: Optional[str] = None,
            placement: Optional[str] = None) -> Optional[tuple]:
    """(engine, LayerNorm placement) the backend runs ``op`` with at ``shape`` (with the shipped engines and
    placement, unless given): (ENGINE_CUBLAS, LN_ON_LOAD) when its engines are on cuBLAS (the placement then
    changes nothing), (ENGINE_FUSED, placement) when on the fused kernels; None for a mix, which no
    provider times."""
    flags = engines_on_cublas(op, shape, gemm_engine, token_engine)
    if flags and all(flags):
        return ENGINE_CUBLAS, LN_ON_LOAD
    if any(flags):
        return None
    return ENGINE_FUSED, (placement or LN_PLACEMENT) if op in LN_OPS else LN_ON_LOAD


def from_check(path: Path) -> Iterator[dict]:
    """bench/gpu_check.py records: "timing" ones (the triton backend as shipped against the reference; a
    triton error is a loss) and failed "check" ones (a loss for that op, mode and dtype on the run's device
    class). Only what the backend runs counts: the timing provider and the checks of the GEMM engine and
    LayerNorm placement it ships with (:func:`shipped`)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    device_class = next((r.get("device_class") for r in records if r.get("kind") == "env"), None)
    for r in records:
        if r.get("kind") == "check":
            want = shipped(r["op"], r["shape"])
            # a check of another engine or placement says nothing about what the backend runs
            if want is None or r.get("gemm", ENGINE_FUSED) != want[0] or (
                    want[0] == ENGINE_FUSED and r.get("ln", LN_ON_LOAD) != want[1]):
                continue
            yield from _check_loss("torch", r["op"], r, device_class, path)
        if r.get("kind") in ("jax_check", "jax_timing"):
            yield from _from_jax_record(r, device_class, path)
            continue
        if r.get("kind") != "timing" or "reference" not in r.get("ms", {}):
            continue
        op = f"block:{r['block']}" if r["op"] == "block" else r["op"]
        want = shipped(op, r["shape"])
        provider = PROVIDERS[want] if want is not None else None
        failure = r.get("errors", {}).get(provider)
        if not _timed_or_failed(r, provider):
            continue  # not timed as shipped (a run from before that provider existed, or after another faulted)
        yield evidence_row("torch", "triton", r["device_class"], op, r["mode"], r["dtype"], r["shape"], r["batch"],
                           r["ms"]["reference"], r["ms"].get(provider), path, failure=failure)


def _from_jax_record(r: dict, device_class: Optional[str], path: Path) -> Iterator[dict]:
    """A record of gpu_check's JAX part (bench/gpu_check_jax.py) as evidence for JAX's triton backend against
    XLA: a "jax_timing" one with the integer hints the backend ships with, or a failed "jax_check" (a loss).
    The JAX backend has no cuBLAS engine and no LayerNorm placement choice: every record is what it runs."""
    op = "block:mixer" if r["op"] == "block" else r["op"]
    if r["kind"] == "jax_check":
        yield from _check_loss("jax", op, r, device_class, path)
    elif r.get("hints") and "xla" in r["ms"] and _timed_or_failed(r, "jax-triton"):
        failure = r.get("errors", {}).get("jax-triton")
        yield evidence_row("jax", "triton", r["device_class"], op, r["mode"], r["dtype"], r["shape"], r["batch"],
                           r["ms"]["xla"], r["ms"].get("jax-triton"), path, failure=failure)


def _check_loss(framework: str, op: str, r: dict, device_class: Optional[str], path: Path) -> Iterator[dict]:
    """A correctness check of gpu_check.py that failed (not one that was not run) as a loss for ``op``."""
    if not r.get("ok") and device_class and not str(r.get("error")).startswith("not run"):
        yield evidence_row(framework, "triton", device_class, op, r["mode"], r["dtype"], r["shape"], r["batch"],
                           None, None, path, failure=r.get("error") or "outside the numerics rule")


def _timed_or_failed(r: dict, provider: str) -> bool:
    """Whether a timing record holds ``provider``'s time or its own failure (not a "not run" after another's)."""
    failure = r.get("errors", {}).get(provider)
    return provider in r["ms"] or bool(failure and not failure.startswith("not run"))


def from_h200_measurements(path: Path) -> Iterator[dict]:
    """The first H200 run (2026-11-27): one record per stage, figures under ad-hoc names."""
    for line in path.read_text().splitlines():
        r = json.loads(line)
        stage, res = r["stage"], r["result"]
        if r["env"]["gpu"] not in GPU_CLASSES:
            raise ValueError(f"gpu: expected one of {sorted(GPU_CLASSES)} in {path}, got {r['env']['gpu']!r}")
        cls = GPU_CLASSES[r["env"]["gpu"]]
        row = lambda op, mode, dtype, shape, batch, ref, fused: evidence_row(  # noqa: E731
            "torch", "triton", cls, op, mode, dtype, shape, batch, ref, fused, path)
        if stage == "channel_ops":
            yield row("channel_mixing", "forward", "bf16", "mixer_b16", 256, res["channel_reference_ms"],
                      res["channel_triton_ms"])
            yield row("channel_mixing", "training", "bf16", "mixer_b16", 256, res["channel_reference_train_ms"],
                      res["channel_triton_train_ms"])
        elif stage in ("resmlp_24_block_bf16", "gmlp_s16_block_bf16"):
            shape = stage[: -len("_block_bf16")]
            yield row(block_op(shape), "forward", "bf16", shape, 256, res["fwd_ms"]["eager"], res["fwd_ms"]["fast"])
            yield row(block_op(shape), "training", "bf16", shape, 256, res["train_ms"]["eager"],
                      res["train_ms"]["fast"])
        elif stage == "token_ops_fp32":
            yield row("token_mixing", "forward", "fp32", "mixer_b16", 64, res["token_reference_ms_b64_fp32"],
                      res["token_triton_ms_b64_fp32"])


def cpu_class_of_run(folder: Path) -> Optional[str]:
    """A CPU run's instruction-set class: a ``device_class:`` line in its env.txt, else read from its lscpu
    line (the 2026-11-23 Zen 3 run: "flags: avx2 fma, no avx512")."""
    env = folder / "env.txt"
    if not env.exists():
        return None
    text = env.read_text()
    m = re.search(r"^device_class: (\S+)", text, re.M)
    if m:
        return m.group(1)
    if re.search(r"flags: avx2 fma, no avx512", text):
        return "avx2"
    return None


def from_pytest_benchmark(path: Path) -> Iterator[dict]:
    """pytest-benchmark files: each fused provider against the reference provider of the same group."""
    data = json.loads(path.read_text())
    groups: Dict[tuple, Dict[str, float]] = {}
    infos: Dict[tuple, dict] = {}  # (key, provider) → its extra_info
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "provider" not in info or info.get("mode") in SKIPPED_MODES:
            continue
        cls = info.get("device_class") or cpu_class_of_run(path.parent)
        if cls is None:
            continue
        key = (cls, info["op"], info["config"], info["batch"], info["dtype"], info["mode"], info.get("threads"))
        groups.setdefault(key, {})[info["provider"]] = b["stats"]["median"] * 1e3
        infos[key, info["provider"]] = info
    for key, times in sorted(groups.items(), key=lambda kv: str(kv[0])):
        cls, op, config, batch, dtype, mode, _threads = key
        for provider, ms in sorted(times.items()):
            if provider not in FUSED:
                continue
            framework, backend = FUSED[provider]
            ref = times.get(REFERENCE[framework])
            if ref is None:
                continue
            name = block_op(config) if op == "block" else op
            if (framework, backend) == ("torch", "triton"):
                # counted only for the engines the backend ships with (bench/conftest.py records the run's;
                # files from before the engines existed ran the fused kernels with LayerNorm on load)
                info = infos[key, provider]
                ran = shipped(name, config, info.get("gemm_engine", ENGINE_FUSED),
                              info.get("token_engine", "flash"), info.get("ln_placement", LN_ON_LOAD))
                if ran is None or ran != shipped(name, config):
                    continue
            yield evidence_row(framework, backend, cls, name, mode, dtype, config, batch, ref, ms, path)


def evidence(results: Path = RESULTS) -> List[dict]:
    rows: List[dict] = []
    for path in sorted(results.rglob("*")):
        if path.name == "check.jsonl":
            rows += from_check(path)
        elif path.name == "measurements.jsonl":
            rows += from_h200_measurements(path)
        elif path.suffix == ".json" and (path.name == "bench.json" or path.name.startswith("cpu_bench")):
            rows += from_pytest_benchmark(path)
    return rows


def run_order(source: str) -> tuple:
    """When the run that wrote ``source`` happened, for ordering runs: the date (YYYY-MM-DD) in its folder's
    name (bench/results/2026-11-27-NVIDIA_H200, cpu-2026-11-23-epyc-zen3; none: oldest), then the name: a
    second run of a day is named after the first (2026-11-29b-...), as the runbook in bench/NOTES.md says."""
    folder = source.rsplit("/", 1)[0]
    name = folder.rsplit("/", 1)[-1]
    m = re.search(r"\d{4}-\d{2}-\d{2}", name)
    return (m.group(0) if m else "", name, folder)


def chosen(rows: List[dict]) -> List[dict]:
    """The rule, applied: keys whose every piece of evidence (blocks counted for their ops) from the newest
    run that has any is a win. A run times the kernels of its commit; an older run's figures are of kernels
    since rewritten (the 2026-11-27 H200 losses were the kernels before issues 15-17), so they no longer
    decide, though they stay in the table as evidence."""
    by_key: Dict[tuple, Dict[tuple, List[float]]] = {}
    for r in rows:
        ops = BLOCK_OPS[r["op"].split(":", 1)[1]] if r["op"].startswith("block:") else (r["op"],)
        for op in ops:
            key = (r["framework"], r["backend"], r["device_class"], op, r["mode"], r["dtype"])
            by_key.setdefault(key, {}).setdefault(run_order(r["source"]), []).append(r["speedup"])
    names = ("framework", "backend", "device_class", "op", "mode", "dtype")
    out = []
    for key, runs in sorted(by_key.items()):
        newest = max(runs)
        s = runs[newest]
        if min(s) > 1.0:
            out.append(dict(zip(names, key), min_speedup=min(s), evidence=len(s), run=newest[2]))
    return out


def build(results: Path = RESULTS) -> dict:
    rows = evidence(results)
    return {"generated_by": "python bench/wins_table.py --write (from bench/results/)", "rule": RULE,
            "chosen": chosen(rows), "evidence": rows}


def render(table: dict) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TABLE.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    table = build()
    if args.write:
        TABLE.write_text(render(table))
        print(f"wrote {TABLE.relative_to(ROOT)}: {len(table['chosen'])} chosen, {len(table['evidence'])} evidence rows")
        return 0
    print(f"rule: {table['rule']}\n\nchosen:")
    for r in table["chosen"] or [{"none": "no measured win: every automatic choice is the reference"}]:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    print("\nevidence (speedup = reference / backend):")
    for r in table["evidence"]:
        print(f"  {r['backend']:<7} {r['device_class']:<12} {r['op']:<15} {r['mode']:<8} {r['dtype']} "
              f"{r['shape']} b{r['batch']}: {r['speedup']:.3f}{' FAILED ' + r['failure'] if 'failure' in r else ''}"
              f"  ({r['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
