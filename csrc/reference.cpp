// Plain loops for the two ops, written for reading, not speed: the fused kernels' oracle (tests compare
// them on every ISA the CPU has). Rounding points are the fused kernels': the normalised input and the
// GELU output are rounded to the storage dtype, sums and epilogues are fp32, the output rounded once.
#include <vector>

#include "common.h"

namespace mixer_cpu {

namespace {

float xval(const MixArgs& a, int64_t b, int64_t s, int64_t c) {
  return load(a.x, b * a.sxb + s * a.sxs + c * a.sxc, a.dtype);
}

// N(x) of image b, rounded to the storage dtype: (S, C) row-major.
std::vector<float> normalised(const MixArgs& a, int64_t b) {
  std::vector<float> xn(a.S * a.C), row(a.C);
  for (int64_t s = 0; s < a.S; ++s) {
    for (int64_t c = 0; c < a.C; ++c) row[c] = xval(a, b, s, c);
    float mean = 0, rstd = 1;
    if (a.layernorm) row_stats(row.data(), a.C, a.eps, &mean, &rstd);
    for (int64_t c = 0; c < a.C; ++c) {
      const float v = (row[c] - mean) * rstd * vec_or(a.norm_w, c, 1, a.dtype) + vec_or(a.norm_b, c, 0, a.dtype);
      xn[s * a.C + c] = round_to(v, a.dtype);
    }
  }
  return xn;
}

void write_out(const MixArgs& a, int64_t b, int64_t s, int64_t c, float y) {
  y *= vec_or(a.scale, c, 1, a.dtype);
  if (a.sample_scale) y *= a.sample_scale[b];
  store(a.out, (b * a.S + s) * a.C + c, xval(a, b, s, c) + y, a.dtype);
}

}  // namespace

void token_mixing_forward_reference(const MixArgs& a) {
  const int64_t S = a.S, C = a.C, D = a.D;
  for (int64_t b = 0; b < a.B; ++b) {
    const std::vector<float> xn = normalised(a, b);
    if (!a.w2) {  // ResMLP: y = W1 . N(x) + b1, one S x S linear along tokens
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < C; ++c) {
          float y = vec_or(a.b1, s, 0, a.dtype);
          for (int64_t k = 0; k < S; ++k) y += load(a.w1, s * S + k, a.dtype) * xn[k * C + c];
          write_out(a, b, s, c, y);
        }
      continue;
    }
    std::vector<float> h(D * C);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < C; ++c) {
        float z = vec_or(a.b1, d, 0, a.dtype);
        for (int64_t s = 0; s < S; ++s) z += load(a.w1, d * S + s, a.dtype) * xn[s * C + c];
        h[d * C + c] = round_to(gelu(z, a.gelu_tanh), a.dtype);
      }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) {
        float y = vec_or(a.b2, s, 0, a.dtype);
        for (int64_t d = 0; d < D; ++d) y += load(a.w2, s * D + d, a.dtype) * h[d * C + c];
        write_out(a, b, s, c, y);
      }
  }
}

void channel_mixing_forward_reference(const MixArgs& a) {
  const int64_t S = a.S, C = a.C, D = a.D;
  std::vector<float> h(D);
  for (int64_t b = 0; b < a.B; ++b) {
    const std::vector<float> xn = normalised(a, b);
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t d = 0; d < D; ++d) {
        float z = vec_or(a.b1, d, 0, a.dtype);
        for (int64_t c = 0; c < C; ++c) z += xn[s * C + c] * load(a.w1, d * C + c, a.dtype);
        h[d] = round_to(gelu(z, a.gelu_tanh), a.dtype);
      }
      for (int64_t c = 0; c < C; ++c) {
        float y = vec_or(a.b2, c, 0, a.dtype);
        for (int64_t d = 0; d < D; ++d) y += h[d] * load(a.w2, c * D + d, a.dtype);
        write_out(a, b, s, c, y);
      }
    }
  }
}

}  // namespace mixer_cpu
