// Fused CPU forward of token and channel mixing on the packed GEMM of gemm.h.
//
// Token mixing, per (image, block of channels): LayerNorm is applied while packing the image's S x Cb
// slab as the B operand of H = GELU(W1 . N(x) + b1); H leaves the micro-kernel straight into the
// packed-B layout of out = x + scale . ss . (W2 . H + b2), so the hidden (D_S x Cb) lives only in a
// task-local, cache-sized buffer and no transpose is ever made.
// Channel mixing: LayerNorm while packing the token rows as the A operand; bias + GELU in the first
// GEMM's tile store, which writes H directly in the second GEMM's packed-A layout; bias, layer scale,
// drop path and the residual in the second GEMM's tile store.
#include <algorithm>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace mixer_cpu {

namespace {

// B panels of W^T for a row-major W (N x K): Bp[p][k * NR + j] = W[p * NR + j][k].
void pack_weight_t(const void* w, DType t, int64_t N, int64_t K, int nr, float* bp, int threads) {
  const int64_t panels = cdiv(N, nr);
  parallel_for(panels, threads, [&](int64_t p, int) {
    float* dst = bp + p * K * nr;
    for (int j = 0; j < nr; ++j) {
      const int64_t n = p * nr + j;
      if (n >= N) {
        for (int64_t k = 0; k < K; ++k) dst[k * nr + j] = 0.0f;
        continue;
      }
      for (int64_t k = 0; k < K; ++k) dst[k * nr + j] = load(w, n * K + k, t);
    }
  });
}

// A panels of a row-major W (M x K): Ap[p][k * MR + i] = W[p * MR + i][k].
void pack_weight(const void* w, DType t, int64_t M, int64_t K, int mr, float* ap, int threads) {
  parallel_for(cdiv(M, mr), threads, [&](int64_t p, int) {
    float* dst = ap + p * K * mr;
    for (int i = 0; i < mr; ++i) {
      const int64_t m = p * mr + i;
      for (int64_t k = 0; k < K; ++k) dst[k * mr + i] = m < M ? load(w, m * K + k, t) : 0.0f;
    }
  });
}

struct Norm {
  const MixArgs& a;
  std::vector<float> w, b;
  explicit Norm(const MixArgs& args) : a(args), w(args.C), b(args.C) {
    for (int64_t c = 0; c < a.C; ++c) {
      w[c] = vec_or(a.norm_w, c, 1, a.dtype);
      b[c] = vec_or(a.norm_b, c, 0, a.dtype);
    }
  }
  // Row (b, s) of x into v (C floats), and its statistics (identity for the affine norm).
  void row(int64_t bi, int64_t s, float* v, float* mean, float* rstd) const {
    const int64_t base = bi * a.sxb + s * a.sxs;
    for (int64_t c = 0; c < a.C; ++c) v[c] = load(a.x, base + c * a.sxc, a.dtype);
    *mean = 0;
    *rstd = 1;
    if (a.layernorm) row_stats(v, a.C, a.eps, mean, rstd);
  }
  float apply(float v, int64_t c, float mean, float rstd) const {
    return round_to((v - mean) * rstd * w[c] + b[c], a.dtype);
  }
};

struct Epilogue {
  const MixArgs& a;
  std::vector<float> scale;
  explicit Epilogue(const MixArgs& args) : a(args), scale(args.C) {
    for (int64_t c = 0; c < a.C; ++c) scale[c] = vec_or(a.scale, c, 1, a.dtype);
  }
  // out[b, s, c] = x[b, s, c] + y . scale[c] . ss[b]
  void put(int64_t bi, int64_t s, int64_t c, float y) const {
    y *= scale[c];
    if (a.sample_scale) y *= a.sample_scale[bi];
    const float xv = load(a.x, bi * a.sxb + s * a.sxs + c * a.sxc, a.dtype);
    store(a.out, (bi * a.S + s) * a.C + c, xv + y, a.dtype);
  }
};

}  // namespace

void token_mixing_forward(const MixArgs& a) {
  const Isa& isa = current();
  const int MR = isa.mr, NR = isa.nr;
  const int64_t S = a.S, C = a.C, D = a.w2 ? a.D : a.S;
  if (a.B == 0 || C == 0) return;
  // Channel blocks: a multiple of NR; enough tasks for the threads even at batch 1.
  int64_t cb = NR * std::max<int64_t>(1, std::min<int64_t>(4, cdiv(C, NR)));
  while (cb > NR && a.B * cdiv(C, cb) < 2 * a.threads) cb -= NR;
  const int64_t n_cblocks = cdiv(C, cb), panels = cb / NR;
  Buffer w1p(cdiv(D, MR) * S * MR);
  pack_weight(a.w1, a.dtype, D, S, MR, w1p.p, a.threads);
  std::unique_ptr<Buffer> w2p;
  if (a.w2) {
    w2p = std::make_unique<Buffer>(cdiv(S, MR) * D * MR);
    pack_weight(a.w2, a.dtype, S, D, MR, w2p->p, a.threads);
  }
  const Norm norm(a);
  const Epilogue epi(a);
  // LayerNorm statistics of every token (a row of all C channels), before the channel blocks split it.
  std::vector<float> mean(a.B * S, 0.0f), rstd(a.B * S, 1.0f);
  if (a.layernorm)
    parallel_for(a.B, a.threads, [&](int64_t bi, int) {
      std::vector<float> row(C);
      for (int64_t s = 0; s < S; ++s) norm.row(bi, s, row.data(), &mean[bi * S + s], &rstd[bi * S + s]);
    });
  std::vector<float> b1(D), b2(S);
  for (int64_t d = 0; d < D; ++d) b1[d] = vec_or(a.b1, d, 0, a.dtype);
  for (int64_t s = 0; s < S; ++s) b2[s] = vec_or(a.b2, s, 0, a.dtype);

  parallel_for(a.B * n_cblocks, a.threads, [&](int64_t task, int) {
    const int64_t bi = task / n_cblocks, c0 = (task % n_cblocks) * cb;
    const int64_t nc = std::min(cb, C - c0);
    Buffer xp(panels * S * NR), hp(a.w2 ? panels * D * NR : 1), tile(MR * NR);
    // B operand N(x)[b][:, c0:c0+cb], packed with the norm applied.
    for (int64_t s = 0; s < S; ++s) {
      const int64_t base = bi * a.sxb + s * a.sxs;
      for (int64_t j = 0; j < panels * NR; ++j) {
        float v = 0.0f;
        if (j < nc) {
          const int64_t c = c0 + j;
          v = norm.apply(load(a.x, base + c * a.sxc, a.dtype), c, mean[bi * S + s], rstd[bi * S + s]);
        }
        xp.p[(j / NR) * S * NR + s * NR + j % NR] = v;
      }
    }
    const float* second_b = xp.p;  // ResMLP: the single linear reads N(x) directly
    int64_t k2 = S;
    if (a.w2) {
      // H = GELU(W1 . N(x) + b1), stored as the packed B operand (k = d) of the second GEMM.
      for (int64_t p = 0; p < panels; ++p)
        for (int64_t i0 = 0; i0 < D; i0 += MR) {
          isa.kernel(S, w1p.p + (i0 / MR) * S * MR, xp.p + p * S * NR, tile.p);
          const int64_t mr = std::min<int64_t>(MR, D - i0);
          float* dst = hp.p + p * D * NR;
          for (int64_t i = 0; i < mr; ++i) {
            float* row = dst + (i0 + i) * NR;  // the tile's rows are already the packed-B rows (k = d)
            std::memcpy(row, tile.p + i * NR, NR * sizeof(float));
            bias_gelu(row, NR, &b1[i0 + i], false, a.gelu_tanh);
            if (a.dtype != DType::f32)
              for (int j = 0; j < NR; ++j) row[j] = round_to(row[j], a.dtype);
          }
        }
      second_b = hp.p;
      k2 = D;
    }
    const float* a2 = a.w2 ? w2p->p : w1p.p;
    const std::vector<float>& bias = a.w2 ? b2 : b1;
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t i0 = 0; i0 < S; i0 += MR) {
        isa.kernel(k2, a2 + (i0 / MR) * k2 * MR, second_b + p * k2 * NR, tile.p);
        const int64_t mr = std::min<int64_t>(MR, S - i0);
        const int64_t jn = std::min<int64_t>(NR, nc - p * NR);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < jn; ++j) epi.put(bi, i0 + i, c0 + p * NR + j, tile.p[i * NR + j] + bias[i0 + i]);
      }
  });
}

void channel_mixing_forward(const MixArgs& a) {
  const Isa& isa = current();
  const int MR = isa.mr, NR = isa.nr;
  const int64_t S = a.S, C = a.C, D = a.D, M = a.B * a.S;
  if (M == 0 || C == 0) return;
  const int64_t a_panels = cdiv(M, MR);
  Buffer w1p(cdiv(D, NR) * C * NR), w2p(cdiv(C, NR) * D * NR);
  pack_weight_t(a.w1, a.dtype, D, C, NR, w1p.p, a.threads);
  pack_weight_t(a.w2, a.dtype, C, D, NR, w2p.p, a.threads);
  std::vector<float> b1(D), b2(C);
  for (int64_t d = 0; d < D; ++d) b1[d] = vec_or(a.b1, d, 0, a.dtype);
  for (int64_t c = 0; c < C; ++c) b2[c] = vec_or(a.b2, c, 0, a.dtype);
  const Norm norm(a);
  const Epilogue epi(a);

  // A operand: the token rows with the norm applied, in MR-row panels.
  Buffer xp(a_panels * C * MR);
  parallel_for(a_panels, a.threads, [&](int64_t p, int) {
    std::vector<float> row(C);
    float* dst = xp.p + p * C * MR;
    for (int i = 0; i < MR; ++i) {
      const int64_t m = p * MR + i;
      if (m >= M) {
        for (int64_t c = 0; c < C; ++c) dst[c * MR + i] = 0.0f;
        continue;
      }
      float mean, rstd;
      norm.row(m / S, m % S, row.data(), &mean, &rstd);
      for (int64_t c = 0; c < C; ++c) dst[c * MR + i] = norm.apply(row[c], c, mean, rstd);
    }
  });

  // Column panels of B in groups that stay in L2 while every A panel passes by.
  auto group_of = [&](int64_t K) { return std::max<int64_t>(1, (768 * 1024) / (K * NR * 4)); };
  // H = GELU(N(x) . W1^T + b1), written in the packed-A layout (k = d) of the second GEMM.
  Buffer hp(a_panels * D * MR);
  const int64_t n1 = cdiv(D, NR), g1 = group_of(C);
  parallel_for(cdiv(n1, g1), a.threads, [&](int64_t g, int) {
    Buffer tile(MR * NR);
    for (int64_t ap = 0; ap < a_panels; ++ap)
      for (int64_t p = g * g1; p < std::min(n1, (g + 1) * g1); ++p) {
        isa.kernel(C, xp.p + ap * C * MR, w1p.p + p * C * NR, tile.p);
        float* dst = hp.p + ap * D * MR;
        const int64_t jn = std::min<int64_t>(NR, D - p * NR);
        for (int i = 0; i < MR; ++i) {
          float* row = tile.p + i * NR;
          bias_gelu(row, jn, &b1[p * NR], true, a.gelu_tanh);
          for (int64_t j = 0; j < jn; ++j) dst[(p * NR + j) * MR + i] = round_to(row[j], a.dtype);
        }
      }
  });
  // out = x + scale . ss . (H . W2^T + b2)
  const int64_t n2 = cdiv(C, NR), g2 = group_of(D);
  parallel_for(cdiv(n2, g2), a.threads, [&](int64_t g, int) {
    Buffer tile(MR * NR);
    for (int64_t ap = 0; ap < a_panels; ++ap)
      for (int64_t p = g * g2; p < std::min(n2, (g + 1) * g2); ++p) {
        isa.kernel(D, hp.p + ap * D * MR, w2p.p + p * D * NR, tile.p);
        const int64_t mr = std::min<int64_t>(MR, M - ap * MR), jn = std::min<int64_t>(NR, C - p * NR);
        for (int64_t i = 0; i < mr; ++i) {
          const int64_t m = ap * MR + i;
          for (int64_t j = 0; j < jn; ++j) epi.put(m / S, m % S, p * NR + j, tile.p[i * NR + j] + b2[p * NR + j]);
        }
      }
  });
}

}  // namespace mixer_cpu
