// Element access, GELU and a thread helper shared by the fused kernels and the reference loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#include "mixer_cpu.h"

namespace mixer_cpu {

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch's fp32 -> bf16 conversion; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float load(const void* p, int64_t i, DType t) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

inline void store(void* p, int64_t i, float v, DType t) {
  if (t == DType::f32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

// The value a tensor of dtype t would hold: eager PyTorch rounds every op's result to its dtype.
inline float round_to(float v, DType t) { return t == DType::f32 ? v : bf16_to_f32(f32_to_bf16(v)); }

inline float vec_or(const void* p, int64_t i, float fill, DType t) { return p ? load(p, i, t) : fill; }

// Typed element access for loops specialised on the storage type (float, or uint16_t holding bf16).
inline float get(const float* p, int64_t i) { return p[i]; }
inline float get(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void put(float* p, int64_t i, float v) { p[i] = v; }
inline void put(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

inline float gelu(float z, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    return 0.5f * z * (1.0f + std::tanh(u));
  }
  return 0.5f * z * (1.0f + std::erf(z * 0.7071067811865476f));
}

// exp(v) for v <= 0 without libm: 2^n . p(r), r = v - n ln2 in [-ln2/2, ln2/2], a degree-6 polynomial
// (relative error ~2e-7); branch-free, so loops of it vectorise. Underflows to 0 below -87.
inline float exp_neg(float v) {
  v = v < -87.0f ? -87.0f : v;
  // Round to nearest by the 1.5 * 2^23 trick (|v log2 e| < 2^22): roundf would be a libm call.
  const float n = (v * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
  const float r = v - n * 0.6931471805599453f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

// GELU for the fused kernels' epilogues: erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7),
// tanh through exp; no libm calls, so the array loop below vectorises (std::erf per element cost more
// than the GEMM around it: 4.8 M calls per Mixer-B/16 channel MLP at batch 8).
inline float gelu_fast(float z, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    const float e = exp_neg(-2.0f * (u < 0 ? -u : u));  // tanh|u| = (1 - e) / (1 + e)
    const float th = (1.0f - e) / (1.0f + e);
    return 0.5f * z * (1.0f + (u < 0 ? -th : th));
  }
  const float ax = (z < 0 ? -z : z) * 0.7071067811865476f;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erf_abs = 1.0f - poly * exp_neg(-ax * ax);
  return 0.5f * z * (1.0f + (z < 0 ? -erf_abs : erf_abs));
}

// LayerNorm statistics of n values (two passes: E[x^2] - E[x]^2 loses digits when |mean| >> std).
inline void row_stats(const float* v, int64_t n, float eps, float* mean, float* rstd) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  const float m = static_cast<float>(s / n);
  double q = 0;
  for (int64_t i = 0; i < n; ++i) q += static_cast<double>(v[i] - m) * (v[i] - m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(static_cast<float>(q / n) + eps);
}

// fn(task, worker) for task in [0, n_tasks) on up to ``threads`` threads (the caller's thread is worker 0,
// the others come from a persistent pool); worker w runs the contiguous range [n_tasks * w / n,
// n_tasks * (w + 1) / n), so a task's worker is fixed by (n_tasks, threads). An exception thrown by fn is
// rethrown here. Calls from a pool worker run serially (no nested parallelism).
void parallel_for(int64_t n_tasks, int threads, const std::function<void(int64_t, int)>& fn);

}  // namespace mixer_cpu
