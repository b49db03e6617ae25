#!/usr/bin/env bash
# One command for a lent GPU: install mixer_fast there without a registry, run the compiled-kernel tests,
# the static report, the benchmarks and the roofline, and write everything into one folder:
#
#     bash bench/gpu_suite.sh [OUT_DIR]        (default: $OUT if set, else bench/results/<date>-<gpu>)
#
# At most 8 files, so that all of them come back from a lent machine: env.txt, tests.log, report.json,
# bench.json, bench.log, roofline.png, roofline.json. Commit the folder under bench/results/; the README's
# performance table is generated from those files (python bench/results_table.py --write-readme).
set -uo pipefail
cd "$(dirname "$0")/.."

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_' || echo unknown)
out=${1:-${OUT:-bench/results/$(date -u +%Y-%m-%d)-${gpu}}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The lent machines have torch, triton, jax, timm, pytest-benchmark but no registry: install mixer_fast
# alone, and jax-triton (not installed there) from wheels carried in wheels/, fetched beforehand with
#     pip download --no-deps -d wheels jax-triton==0.3.1 absl-py
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/tests.log" 2>&1 \
  || { echo "install failed; see $out/tests.log"; exit 1; }
if ! python3 -c "import jax_triton" >/dev/null 2>&1 && ls wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index wheels/*.whl >>"$out/tests.log" 2>&1 || echo "jax-triton install failed" >>"$out/tests.log"
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
python3 -m pytest tests -q -p no:cacheprovider >>"$out/tests.log" 2>&1 || status=1
python3 -m mixer_fast report --arch sm_90a --format json >"$out/report.json" 2>>"$out/tests.log" || status=1
python3 -m pytest bench/ --benchmark-only -q -rs --benchmark-json="$out/bench.json" >"$out/bench.log" 2>&1 || status=1
python3 -m mixer_fast roofline --out "$out/roofline.png" >>"$out/bench.log" 2>&1 || status=1
echo "gpu suite finished (status $status); results in $out"
exit $status
