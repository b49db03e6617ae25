// Fused CPU forward of token and channel mixing on the packed GEMM of gemm.h.
//
// Both ops are one MLP applied to columns: Y = W2 . GELU(W1 . X + b1) + b2 with the weights (row-major,
// nn.Linear layout) as the packed A operand and X a block of columns packed as B panels:
//   token mixing:   X = N(x[b]) (S x C), columns = an image's channels: the natural left-multiplication;
//   channel mixing: X = N(x)^T (C x B*S), columns = tokens: the transposed GEMM, so that the weights, not the
//                   activations, are the operand that is packed once per call.
// LayerNorm (or ResMLP's affine) is applied while packing X; bias + GELU when a tile of the first GEMM
// leaves the micro-kernel, which writes it straight into the second GEMM's packed-B layout (the hidden
// lives only in a per-task, cache-sized buffer: no transpose, no round trip through memory); bias, layer
// scale, drop path and the residual when a tile of the second GEMM leaves it. Every output is one thread's
// sum over the full K in a fixed order, so results do not depend on the thread count or task split.
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace mixer_cpu {

namespace {

std::vector<float> vec_f32(const void* p, int64_t n, float fill, DType t) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = vec_or(p, i, fill, t);
  return v;
}

// Calls f(typed pointer) with p as const float* or const uint16_t* (bf16): loops specialised on the storage
// type, with no per-element dtype branch (they vectorise).
template <class F>
void typed(const void* p, DType t, const F& f) {
  if (t == DType::f32)
    f(static_cast<const float*>(p));
  else
    f(static_cast<const uint16_t*>(p));
}

// The same for an input and an output of one storage type.
template <class F>
void typed(const void* in, void* out, DType t, const F& f) {
  if (t == DType::f32)
    f(static_cast<const float*>(in), static_cast<float*>(out));
  else
    f(static_cast<const uint16_t*>(in), static_cast<uint16_t*>(out));
}

struct Norm {
  const MixArgs& a;
  std::vector<float> w, b;
  explicit Norm(const MixArgs& args) : a(args), w(vec_f32(a.norm_w, a.C, 1, a.dtype)), b(vec_f32(a.norm_b, a.C, 0, a.dtype)) {}
  // Row (b, s) of x into v (C floats), and its statistics (identity for the affine norm).
  void row(int64_t bi, int64_t s, float* v, float* mean, float* rstd) const {
    typed(a.x, a.dtype, [&](auto x) {
      x += bi * a.sxb + s * a.sxs;
      for (int64_t c = 0; c < a.C; ++c) v[c] = get(x, c * a.sxc);
    });
    *mean = 0;
    *rstd = 1;
    if (a.layernorm) layer_norm_stats(v, a.C, a.eps, mean, rstd);
  }
  // dst[i * sd] = N(v[i * sv]) for channels c0 .. c0+n of a row with statistics (mean, rstd), rounded to the
  // storage dtype (the normalised tensor eager PyTorch would hold).
  template <class T>
  void apply(const T* v, int64_t sv, int64_t c0, int64_t n, float mean, float rstd, float* dst, int64_t sd) const {
    const float *wc = w.data() + c0, *bc = b.data() + c0;
    if (sv == 1 && sd == 1 && std::is_same<T, float>::value == (a.dtype == DType::f32)) {  // v in the storage dtype
      norm_row(v, n, mean, rstd, wc, bc, dst);
      return;
    }
    if (a.dtype == DType::f32)
      for (int64_t i = 0; i < n; ++i) dst[i * sd] = (get(v, i * sv) - mean) * rstd * wc[i] + bc[i];
    else
      for (int64_t i = 0; i < n; ++i) dst[i * sd] = round_to((get(v, i * sv) - mean) * rstd * wc[i] + bc[i], a.dtype);
  }
};

struct Epilogue {
  const MixArgs& a;
  std::vector<float> scale;
  explicit Epilogue(const MixArgs& args) : a(args), scale(vec_f32(a.scale, a.C, 1, a.dtype)) {}
  // out[b, s, c0 + i] = x[b, s, c0 + i] + y[i * sy] . scale[c0 + i] . ss[b] for i < n
  void run(int64_t bi, int64_t s, int64_t c0, int64_t n, const float* y, int64_t sy) const {
    const float ss = a.sample_scale ? a.sample_scale[bi] : 1.0f;
    const float* sc = scale.data() + c0;
    const int64_t o = (bi * a.S + s) * a.C + c0, sxc = a.sxc;
    typed(a.x, a.out, a.dtype, [&](auto x, auto out) {
      x += bi * a.sxb + s * a.sxs + c0 * sxc;
      out += o;
      if (sxc == 1 && sy == 1)
        residual_row(x, y, sc, ss, n, out);
      else
        for (int64_t i = 0; i < n; ++i) put(out, i, get(x, i * sxc) + y[i * sy] * sc[i] * ss);
    });
  }
};

// The MLP of both ops on one task's columns, X packed as n_panels B panels of K rows. With w2 == nullptr
// it is ResMLP's single linear Y = W1 . X + b1.
struct Mlp {
  // K block of the second GEMM: its B (the task's hidden, K x columns) must stay in L2 while every weight
  // panel passes by; unblocked at K = D_C = 3072 the task's hidden (768 KiB) was re-read from L3 by each
  // weight panel.
  static constexpr int64_t KC = 512;
  static constexpr int kMaxTile = 12 * 32;  // MR x NR floats of the largest tile (AVX-512)
  const Isa& isa;
  const PackedA& w1;
  const PackedA* w2;
  std::vector<float> b1, b2;
  bool tanh_form;
  DType t;

  Mlp(const Isa& i, const MixArgs& a, const PackedA& fc1, const PackedA* fc2)
      : isa(check_tile(i)), w1(fc1), w2(fc2), b1(vec_f32(a.b1, fc1.M, 0, a.dtype)),
        b2(fc2 ? vec_f32(a.b2, fc2->M, 0, a.dtype) : std::vector<float>()), tanh_form(a.gelu_tanh), t(a.dtype) {}

  static const Isa& check_tile(const Isa& i) {
    if (i.mr * i.nr > kMaxTile) throw std::logic_error("Mlp: tile larger than kMaxTile");
    return i;
  }
  const PackedA& last() const { return w2 ? *w2 : w1; }
  // Scratch floats per task of n_panels: the hidden, and the second GEMM's accumulator when K is blocked.
  int64_t hidden_floats(int64_t n_panels) const { return w2 ? w1.panels() * isa.mr * n_panels * isa.nr : 1; }
  int64_t acc_floats(int64_t n_panels) const {
    return last().panels() * isa.mr * (last().K > KC ? n_panels * isa.nr : isa.nr);
  }

  // put(row0, rows, panel, y, ld): y = rows x NR values of Y (row i at y + i * ld), bias added; the last
  // panel has last_cols valid columns (the half-width kernel runs it where they are at most NR / 2). team > 1:
  // the calling threads share this one task, each taking a range of weight panels (rows of H, then of Y),
  // with a barrier between the GEMMs; put is then called concurrently for disjoint row ranges.
  template <class Put>
  void run(const float* xp, int64_t n_panels, int64_t last_cols, float* hp, float* acc, const Put& put,
           int team = 1) const {
    const int MR = isa.mr, NR = isa.nr;
    auto kernel = [&](int64_t j) { return isa.for_columns(j == n_panels - 1 ? last_cols : NR); };
    const PackedA& a2 = last();
    // fn(p0, p1) over `panels` weight panels, split among the team.
    auto split = [&](int64_t panels, const auto& fn) {
      parallel_for(team, team, [&](int64_t t, int) { fn(panels * t / team, panels * (t + 1) / team); });
    };
    const float* in = xp;
    int64_t in_stride = w1.K * NR;
    if (w2) {
      // H = GELU(W1 . X + b1): the tile rows are rows of the packed-B panel (k = d) of the second GEMM;
      // the panel holds D rounded up to MR rows, and the padding rows are never read (K = D below), except
      // for bf16 pairs with an odd D: one padding row's half, against a zero half of W2's slot (the row holds
      // the zero weight rows' products: zero, or NaN only where this column's own inputs were not finite).
      // With bf16 pairs the tile goes through a local buffer: its MR rows become MR / 2 slot rows, which
      // another thread's tile would overlap in place.
      const int64_t D = w1.M, hstride = w1.panels() * MR * NR;
      split(w1.panels(), [&](int64_t p0, int64_t p1) {
        alignas(64) float local[kMaxTile];
        const Buffer scratch(w1.lazy ? MR * w1.kslots : 0);
        for (int64_t p = p0; p < p1; ++p) {
          const float* panel = w1.panel(p, 0, w1.K, scratch.p);
          for (int64_t j = 0; j < n_panels; ++j) {
            float* h = hp + j * hstride + isa.slot(p * MR) * NR;
            float* tile = isa.kpack == 1 ? h : local;
            kernel(j)(w1.K, panel, xp + j * in_stride, tile, NR, false);
            isa.bias_gelu(tile, std::min<int64_t>(MR, D - p * MR), b1.data() + p * MR, tanh_form, t);
            if (isa.kpack == 2) pack_pairs(tile, MR, NR, h);
          }
        }
      });
      in = hp;
      in_stride = hstride;
    }
    const float* bias = w2 ? b2.data() : b1.data();
    // Rows r0 .. r0+rows of column panel j are final: add the bias and hand them on.
    auto finish = [&](int64_t r0, int64_t rows, int64_t j, float* y, int64_t ld) {
      for (int64_t i = 0; i < rows; ++i)
        for (int jj = 0; jj < NR; ++jj) y[i * ld + jj] += bias[r0 + i];
      put(r0, rows, j, y, ld);
    };
    if (a2.K <= KC) {
      split(a2.panels(), [&](int64_t p0, int64_t p1) {
        float* tile = acc + p0 * MR * NR;  // one tile per panel: a thread's own
        const Buffer scratch(a2.lazy ? MR * a2.kslots : 0);
        for (int64_t p = p0; p < p1; ++p) {
          const float* panel = a2.panel(p, 0, a2.K, scratch.p);
          for (int64_t j = 0; j < n_panels; ++j) {
            kernel(j)(a2.K, panel, in + j * in_stride, tile, NR, false);
            finish(p * MR, std::min<int64_t>(MR, a2.M - p * MR), j, tile, NR);
          }
        }
      });
      return;
    }
    const int64_t nk = cdiv(a2.K, KC), ld = n_panels * NR;
    split(a2.panels(), [&](int64_t p0, int64_t p1) {
      // K blocks start on a slot (an even k for bf16 pairs)
      auto edge = [&](int64_t kb) { return kb == nk ? a2.K : kb * a2.K / nk / isa.kpack * isa.kpack; };
      const Buffer scratch(a2.lazy ? MR * a2.kslots : 0);
      for (int64_t kb = 0; kb < nk; ++kb) {
        const int64_t k0 = edge(kb), k1 = edge(kb + 1);
        for (int64_t p = p0; p < p1; ++p) {
          const float* panel = a2.panel(p, k0, k1, scratch.p);
          for (int64_t j = 0; j < n_panels; ++j)
            kernel(j)(k1 - k0, panel, in + j * in_stride + isa.slot(k0) * NR, acc + p * MR * ld + j * NR, ld,
                      kb > 0);
        }
      }
      // Whole columns at once: the channel-mixing epilogue then writes each token's outputs in one run
      // (per 6-value tile column it cost 5.5 ns an output, 3 % of the op).
      const int64_t r0 = p0 * MR, r1 = std::min(p1 * MR, a2.M);
      if (r1 > r0)
        for (int64_t j = 0; j < n_panels; ++j) finish(r0, r1 - r0, j, acc + r0 * ld + j * NR, ld);
    });
  }
};

// Tasks over `groups` independent sets of `panels` column panels each: consecutive panel ranges of at most
// max_panels (fewer tasks reuse each streamed weight panel over more columns), split evenly, and as many
// per group as makes the task count a multiple of the thread count (no thread idles at the end). Where that
// leaves fewer than 4 tasks a thread, the threads share each task (run_tasks) and a task may take up to
// TEAM_PANELS: each thread then streams, and packs, its weight panels once a task, not once a task of the
// smaller split (Mixer-B/16 channel mixing at batch 1, 7 panels: one task 9.6-9.8 ms, two 10.1-10.2).
struct Tasks {
  static constexpr int64_t TEAM_PANELS = 8;
  int64_t groups, panels, per_group, max_panels;
  Tasks(int64_t g, int64_t p, int64_t max_p, int threads) : groups(g), panels(p) {
    split(max_p, threads);
    if (shared(threads)) split(std::max(max_p, TEAM_PANELS), 1);
  }
  void split(int64_t max_p, int threads) {
    per_group = cdiv(panels, max_p);
    while (per_group < panels && (groups * per_group) % threads != 0) ++per_group;
    max_panels = cdiv(panels, per_group);
  }
  int64_t count() const { return groups * per_group; }
  // Whether the threads share each task (run_tasks): then each streams every weight panel once per task.
  bool shared(int threads) const { return threads > 1 && count() < 4 * threads; }
  int64_t group(int64_t task) const { return task / per_group; }
  int64_t first(int64_t task) const { return (task % per_group) * panels / per_group; }
  int64_t end(int64_t task) const { return (task % per_group + 1) * panels / per_group; }
};

struct Scratch {
  Buffer xp, hp, acc;
  Scratch(int64_t x, int64_t h, int64_t y) : xp(x), hp(h), acc(y) {}
};

// Runs every task. With at least 4 tasks a thread, each task on one thread (columns split among threads);
// with fewer, where whole tasks would leave threads idle at the end (Mixer-B/16 channel mixing at batch 1:
// 13 column panels, 4 tasks of 3-4), one task after another with all threads on each (weight rows split),
// which also streams each weight once per task instead of once per thread.
// pack(task, xp, p0, p1) writes column panels p0 .. p1 of the task's X; put(task, row0, rows, panel, y, ld).
// cols: the valid columns of a group (tasks.panels panels, the last one partly padding).
template <class Pack, class Put>
void run_tasks(const Mlp& mlp, const Tasks& tasks, int64_t cols, int threads, int64_t k_in, const Pack& pack,
               const Put& put) {
  const int NR = mlp.isa.nr;
  const int64_t np = tasks.max_panels;
  const bool team = tasks.shared(threads);
  const int workers = team ? 1 : static_cast<int>(std::min<int64_t>(threads, tasks.count()));
  std::vector<std::unique_ptr<Scratch>> bufs;
  for (int i = 0; i < workers; ++i)
    bufs.push_back(std::make_unique<Scratch>(np * k_in * NR, mlp.hidden_floats(np), mlp.acc_floats(np)));
  auto one = [&](int64_t task, Scratch& sc, int size) {
    const int64_t n_panels = tasks.end(task) - tasks.first(task);
    const int64_t last_cols = tasks.end(task) == tasks.panels ? cols - (tasks.panels - 1) * NR : NR;
    parallel_for(size, size, [&](int64_t t, int) {
      const int64_t p0 = n_panels * t / size, p1 = n_panels * (t + 1) / size;
      pack(task, sc.xp.p, p0, p1);
      if (mlp.isa.kpack == 2)
        for (int64_t p = p0; p < p1; ++p) pack_pairs(sc.xp.p + p * k_in * NR, k_in, NR, sc.xp.p + p * k_in * NR);
    });
    mlp.run(sc.xp.p, n_panels, last_cols, sc.hp.p, sc.acc.p,
            [&](int64_t r0, int64_t rows, int64_t j, const float* y, int64_t ld) { put(task, r0, rows, j, y, ld); },
            size);
  };
  if (team)
    for (int64_t task = 0; task < tasks.count(); ++task) one(task, *bufs[0], threads);
  else
    parallel_for(tasks.count(), workers, [&](int64_t task, int w) { one(task, *bufs[w], 1); });
}

}  // namespace

void token_mixing_forward(const MixArgs& a) {
  const Isa& isa = current().for_dtype(a.dtype);
  const int NR = isa.nr;
  const int64_t S = a.S, C = a.C;
  if (a.B == 0 || C == 0) return;
  const Tasks tasks(a.B, cdiv(C, NR), 8, a.threads);
  // Weights packed where they are used when the threads share tasks (each streams each panel once a task)
  const bool lazy = tasks.shared(a.threads);
  const PackedA w1(a.w1, a.dtype, a.w2 ? a.D : S, S, isa, a.threads, lazy);
  std::unique_ptr<PackedA> w2;
  if (a.w2) w2 = std::make_unique<PackedA>(a.w2, a.dtype, S, a.D, isa, a.threads, lazy);
  const Mlp mlp(isa, a, w1, w2.get());
  const Norm norm(a);
  const Epilogue epi(a);
  // LayerNorm statistics of every token (a row of all C channels), before the channel blocks split it.
  std::vector<float> mean(a.B * S, 0.0f), rstd(a.B * S, 1.0f);
  if (a.layernorm)
    parallel_for(cdiv(a.B * S, 32), a.threads, [&](int64_t chunk, int) {
      std::vector<float> row(C);
      for (int64_t m = chunk * 32; m < std::min(a.B * S, (chunk + 1) * 32); ++m)
        norm.row(m / S, m % S, row.data(), &mean[m], &rstd[m]);
    });

  // X = N(x[b])[:, c] for the task's channel panels p0 .. p1 as B panels (k = s), zero columns past C.
  auto pack = [&](int64_t task, float* xp, int64_t p0, int64_t p1) {
    const int64_t bi = tasks.group(task), c0 = tasks.first(task) * NR;
    typed(a.x, a.dtype, [&](auto x) {
      for (int64_t s = 0; s < S; ++s) {
        const auto row = x + bi * a.sxb + s * a.sxs + c0 * a.sxc;
        for (int64_t p = p0; p < p1; ++p) {
          float* dst = xp + p * S * NR + s * NR;
          const int64_t n = std::min<int64_t>(NR, C - c0 - p * NR);
          norm.apply(row + p * NR * a.sxc, a.sxc, c0 + p * NR, n, mean[bi * S + s], rstd[bi * S + s], dst, 1);
          for (int64_t j = n; j < NR; ++j) dst[j] = 0.0f;
        }
      }
    });
  };
  auto put = [&](int64_t task, int64_t s0, int64_t rows, int64_t j, const float* y, int64_t ld) {
    const int64_t bi = tasks.group(task), cj = (tasks.first(task) + j) * NR, cols = std::min<int64_t>(NR, C - cj);
    for (int64_t i = 0; i < rows; ++i) epi.run(bi, s0 + i, cj, cols, y + i * ld, 1);
  };
  run_tasks(mlp, tasks, C, a.threads, S, pack, put);
}

void channel_mixing_forward(const MixArgs& a) {
  const Isa& isa = current().for_dtype(a.dtype);
  const int NR = isa.nr;
  const int64_t S = a.S, C = a.C, M = a.B * a.S;
  if (M == 0 || C == 0) return;
  const Tasks tasks(1, cdiv(M, NR), 4, a.threads);
  const bool lazy = tasks.shared(a.threads);  // as in token_mixing_forward
  const PackedA w1(a.w1, a.dtype, a.D, C, isa, a.threads, lazy), w2(a.w2, a.dtype, C, a.D, isa, a.threads, lazy);
  const Mlp mlp(isa, a, w1, &w2);
  const Norm norm(a);
  const Epilogue epi(a);

  // X = N(x)^T for the task's token panels p0 .. p1 as B panels (k = c), zero columns past M.
  auto pack = [&](int64_t task, float* xp, int64_t p0, int64_t p1) {
    const int64_t m0 = tasks.first(task) * NR;
    std::vector<float> row(C);
    for (int64_t j = p0 * NR; j < p1 * NR; ++j) {
      float* dst = xp + (j / NR) * C * NR + j % NR;
      if (m0 + j >= M) {
        for (int64_t c = 0; c < C; ++c) dst[c * NR] = 0.0f;
        continue;
      }
      float mean, rstd;
      norm.row((m0 + j) / S, (m0 + j) % S, row.data(), &mean, &rstd);
      norm.apply(row.data(), 1, 0, C, mean, rstd, dst, NR);
    }
  };
  auto put = [&](int64_t task, int64_t c0, int64_t rows, int64_t j, const float* y, int64_t ld) {
    const int64_t mj = (tasks.first(task) + j) * NR, cols = std::min<int64_t>(NR, M - mj);
    for (int64_t jj = 0; jj < cols; ++jj) epi.run((mj + jj) / S, (mj + jj) % S, c0, rows, y + jj, ld);
  };
  run_tasks(mlp, tasks, M, a.threads, C, pack, put);
}

}  // namespace mixer_cpu
