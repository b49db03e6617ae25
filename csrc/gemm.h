// Packed fp32 GEMM pieces: one register-tile micro-kernel per ISA, chosen at run time, and the panel
// layouts the fused kernels pack their operands into (transforms such as LayerNorm are applied while
// packing, epilogues when a tile leaves the registers).
//
//   packed A: row panels of MR rows, k-major:    Ap[panel][k * MR + i]   (zero rows past M)
//   packed B: column panels of NR cols, k-major: Bp[panel][k * NR + j]   (zero cols past N)
//
// kernel(K, Ap_panel, Bp_panel, tile) writes the MR x NR product over the full K into ``tile``
// (row-major, NR floats a row). K is not blocked: the largest K here (D_C = 4096 at Mixer-L) keeps an
// A panel (MR x K) and a B panel (K x NR) within L2.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

namespace mixer_cpu {

using MicroKernel = void (*)(int64_t K, const float* A, const float* B, float* tile);

struct Isa {
  const char* name;
  int mr, nr;
  MicroKernel kernel;
};

const Isa& current();

// v[i] = GELU(v[i] + bias) in place for n values, bias[i] (per_element) or bias[0]: the epilogue of the
// first GEMMs, compiled for AVX-512, AVX2 and the baseline (chosen by the loader).
void bias_gelu(float* v, int64_t n, const float* bias, bool per_element, bool tanh_form);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned float buffer (one cache line; aligned vector loads in the micro-kernels).
struct Buffer {
  float* p = nullptr;
  int64_t n = 0;
  explicit Buffer(int64_t count) : n(count) {
    const size_t bytes = ((static_cast<size_t>(count > 0 ? count : 1) * sizeof(float) + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

}  // namespace mixer_cpu
