#!/usr/bin/env bash
# Build csrc/tests/check_main.cpp with the kernels under AddressSanitizer + UBSan and run it.
#     bash csrc/tests/sanitize.sh [BUILD_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
${CXX:-g++} -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all -fno-trapping-math -fno-math-errno -pthread \
  "$here/check_main.cpp" "$here/../gemm.cpp" "$here/../ops.cpp" "$here/../parallel.cpp" "$here/../reference.cpp" -o "$out/check_main"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 "$out/check_main"
