// The micro-kernels and the run-time choice among them. Each is compiled for its ISA with a target
// attribute, so the library builds with plain -O3 and runs on any x86-64 (and non-x86) CPU.
#include "gemm.h"

#include <atomic>

#include "common.h"
#include "mixer_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MIXER_X86 1
#endif

namespace mixer_cpu {

namespace {

// Portable: plain loops the compiler vectorises for the baseline ISA.
constexpr int P_MR = 4, P_NR = 16;
void kernel_portable(int64_t K, const float* A, const float* B, float* tile) {
  float acc[P_MR][P_NR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < P_MR; ++i) {
      const float a = A[k * P_MR + i];
      for (int j = 0; j < P_NR; ++j) acc[i][j] += a * B[k * P_NR + j];
    }
  for (int i = 0; i < P_MR; ++i)
    for (int j = 0; j < P_NR; ++j) tile[i * P_NR + j] = acc[i][j];
}

#ifdef MIXER_X86
// AVX2 + FMA: 6 x 16 tile = 12 ymm accumulators, 2 for B, 1 broadcast (15 of 16 registers).
constexpr int A2_MR = 6, A2_NR = 16;
__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t K, const float* A, const float* B, float* tile) {
  __m256 c[A2_MR][2];
  for (int i = 0; i < A2_MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(B + k * A2_NR), b1 = _mm256_load_ps(B + k * A2_NR + 8);
    for (int i = 0; i < A2_MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + k * A2_MR + i);
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
    }
  }
  for (int i = 0; i < A2_MR; ++i) {
    _mm256_storeu_ps(tile + i * A2_NR, c[i][0]);
    _mm256_storeu_ps(tile + i * A2_NR + 8, c[i][1]);
  }
}

// AVX-512: 12 x 32 tile = 24 zmm accumulators, 2 for B; A broadcast from memory into each FMA. Per k:
// 2 B loads + 12 broadcasts for 24 FMAs (12 cycles on two FMA ports).
constexpr int A5_MR = 12, A5_NR = 32;
__attribute__((target("avx512f,fma"))) void kernel_avx512(int64_t K, const float* A, const float* B, float* tile) {
  __m512 c[A5_MR][2];
  for (int i = 0; i < A5_MR; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_load_ps(B + k * A5_NR), b1 = _mm512_load_ps(B + k * A5_NR + 16);
    _mm_prefetch(reinterpret_cast<const char*>(B + (k + 8) * A5_NR), _MM_HINT_T0);
    for (int i = 0; i < A5_MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[k * A5_MR + i]);
      c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
    }
  }
  for (int i = 0; i < A5_MR; ++i) {
    _mm512_storeu_ps(tile + i * A5_NR, c[i][0]);
    _mm512_storeu_ps(tile + i * A5_NR + 16, c[i][1]);
  }
}
#endif

const Isa PORTABLE{"portable", P_MR, P_NR, kernel_portable};
#ifdef MIXER_X86
const Isa AVX2{"avx2", A2_MR, A2_NR, kernel_avx2};
const Isa AVX512{"avx512", A5_MR, A5_NR, kernel_avx512};
#endif

bool supported(const std::string& name) {
  if (name == "portable") return true;
#ifdef MIXER_X86
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
  return false;
}

const Isa* by_name(const std::string& name) {
#ifdef MIXER_X86
  if (name == "avx512") return &AVX512;
  if (name == "avx2") return &AVX2;
#endif
  if (name == "portable") return &PORTABLE;
  return nullptr;
}

const Isa* best() {
  for (const char* name : {"avx512", "avx2", "portable"})
    if (supported(name)) return by_name(name);
  return &PORTABLE;
}

std::atomic<const Isa*> chosen{nullptr};

}  // namespace

const Isa& current() {
  const Isa* isa = chosen.load();
  if (!isa) {
    isa = best();
    chosen.store(isa);
  }
  return *isa;
}

std::string isa() { return current().name; }

// The GELU form and the bias layout are hoisted out of the loops: with them as run-time flags inside,
// GCC does not vectorise (measured: scalar code, the GELU then cost half as much as the GEMM).
__attribute__((target_clones("avx512f", "avx2", "default"))) void bias_gelu(float* v, int64_t n, const float* bias,
                                                                          bool per_element, bool tanh_form) {
  const float b0 = bias[0];
  if (per_element && tanh_form)
    for (int64_t i = 0; i < n; ++i) v[i] = gelu_fast(v[i] + bias[i], true);
  else if (per_element)
    for (int64_t i = 0; i < n; ++i) v[i] = gelu_fast(v[i] + bias[i], false);
  else if (tanh_form)
    for (int64_t i = 0; i < n; ++i) v[i] = gelu_fast(v[i] + b0, true);
  else
    for (int64_t i = 0; i < n; ++i) v[i] = gelu_fast(v[i] + b0, false);
}

bool force_isa(const std::string& name) {
  if (name.empty()) {
    chosen.store(best());
    return true;
  }
  if (!by_name(name) || !supported(name)) return false;
  chosen.store(by_name(name));
  return true;
}

}  // namespace mixer_cpu
