#!/usr/bin/env bash
# One script for a lent GPU: install mixer_fast there without a registry, then run a stage:
#
#     bash bench/gpu_suite.sh [STAGE] [OUT_DIR]     STAGE: check | gputests | tune | tests | bench | all (default check)
#                                                   OUT_DIR: default $OUT if set, else bench/results/<date>-<gpu>
#
# Start with `check` (bench/gpu_check.py check, about 4 minutes): the triton backend's correctness per op, dtype
# and shape, each case in its own process, compute-sanitizer on whatever faults, a CUDA-graph replay, and timings
# against eager / torch.compile / cuBLAS, as JSON lines (check.jsonl, check.log, sanitizer.txt); CHECK_ARGS
# passes options, e.g. CHECK_ARGS="--parts timings --budget 540" for a second call that only times. The fused
# GEMM also times TMA-loaded tiles on sm_90+ (never run on a GPU before): a failed case is rerun once with
# MIXER_FAST_TMA=0, and its records say how that went ("without_tma"). `--parts jax` adds the JAX triton
# backend's checks and timings against XLA (bench/gpu_check_jax.py; jax-triton from wheels/), e.g.
#     CHECK_ARGS="--parts jax,timings --only jax|block.mixer_b16 --budget 330" bash bench/gpu_suite.sh check
# `tune` (bench/tune_table.py run, TUNE_BATCHES default 256,128,64) times every fused-GEMM config at the named
# models' shapes and writes tuned.json: merge it into the shipped table with `python bench/tune_table.py write DIR`.
# `gputests` (bench/gpu_check.py tests, about 5 minutes: GPUTESTS_BUDGET seconds, default 260) runs the triton
# test files and the gpu-marked tests (tests.log). `tests` is the whole suite, `bench` the pytest-benchmark
# suites, `all` both: a device call lasts at most 10 minutes, and the whole suite takes longer, so run them in
# separate calls, and never the whole suite as a first check (DESIGN.md, "Checking on a GPU").
# Every stage ends inside its own time budget (TESTS_BUDGET / BENCH_BUDGET seconds, default 480) with
# SIGINT, so pytest still prints its summary and writes its files; tests run verbose (-v), so a run cut short
# still names every test that failed so far. BENCH_K selects benchmarks (pytest -k), e.g.
#     BENCH_K="mixer_b16 and 256" bash bench/gpu_suite.sh bench
# Files (at most 8, so that all come back from a lent machine; one stage per OUT_DIR keeps under that): env.txt,
# install.log, and check.jsonl, check.log, sanitizer.txt (check); tuned.json, timings.json, tune.log (tune); tests.log (gputests, tests); report.json,
# bench.json, bench.log, roofline.png, roofline.json (bench). Commit the folder under bench/results/; the README's
# performance table is generated from those files (python bench/results_table.py --write-readme).
set -uo pipefail
cd "$(dirname "$0")/.."

stage=${1:-check}
case "$stage" in check|gputests|tune|tests|bench|all) ;;
  *) echo "STAGE: expected check, gputests, tune, tests, bench or all, got '$stage'" >&2; exit 2 ;;
esac
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_' || echo unknown)
out=${2:-${OUT:-bench/results/$(date -u +%Y-%m-%d)-${gpu}}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The lent machines have torch, triton, jax, timm, pytest-benchmark, pytest-xdist but no registry: install
# mixer_fast alone, and from wheels carried in wheels/ what they lack: jax-triton (triton 3.6 there:
# jax-triton 0.3.1 is the newest that accepts it) and the gpu extra's nvidia-cuda-nvcc (its ptxas 13.5 is the
# one the backend then assembles with, as issue 15's check asks; without it, CUDA 13.0's in /usr/local/cuda).
# Fetched beforehand, 47 MB in all (a device call carries at most 64 MiB):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#         -d wheels jax-triton==0.3.1 "nvidia-cuda-nvcc>=13.3,<14"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
  || { echo "install failed; see $out/install.log"; exit 1; }
if ls wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index wheels/*.whl >>"$out/install.log" 2>&1 \
    || echo "wheels/ install failed" >>"$out/install.log"
fi
# torch and JAX share the GPU in one process: no JAX preallocation of 75% of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  python3 -m mixer_fast info
} >"$out/env.txt" 2>&1

status=0
if [ "$stage" = check ]; then
  # shellcheck disable=SC2086  # CHECK_ARGS is a list of options
  python3 bench/gpu_check.py check --out "$out" ${CHECK_ARGS:-} || status=1
fi
if [ "$stage" = tune ]; then
  timeout -s INT "${TUNE_BUDGET:-480}" python3 bench/tune_table.py run --out "$out" --batches "${TUNE_BATCHES:-256,128,64}" \
    >"$out/tune.log" 2>&1 || status=1
  tail -n 5 "$out/tune.log"
fi
if [ "$stage" = gputests ]; then
  python3 bench/gpu_check.py tests --out "$out" --budget "${GPUTESTS_BUDGET:-260}" --jobs "${JOBS:-12}" || status=1
fi
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  timeout -s INT "${TESTS_BUDGET:-480}" python3 -m pytest tests -v --tb=short -rfE -p no:cacheprovider \
    -n "${JOBS:-12}" --timeout 300 >"$out/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | cut -c1-220 | head -n 60
  tail -n 3 "$out/tests.log"
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  python3 -m mixer_fast report --arch sm_90a --format json >"$out/report.json" 2>>"$out/bench.log" || status=1
  timeout -s INT "${BENCH_BUDGET:-480}" python3 -m pytest bench/ --benchmark-only -q -rs -p no:cacheprovider \
    ${BENCH_K:+-k "$BENCH_K"} --benchmark-json="$out/bench.json" >>"$out/bench.log" 2>&1 || status=1
  python3 -m mixer_fast roofline --out "$out/roofline.png" >>"$out/bench.log" 2>&1 || status=1
  tail -n 30 "$out/bench.log"
fi
echo "gpu suite ($stage) finished (status $status); results in $out"
exit $status
