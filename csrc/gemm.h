// Packed fp32 GEMM pieces: one register-tile micro-kernel per ISA, chosen at run time, and the panel
// layouts the fused kernels pack their operands into (LayerNorm is applied while packing, epilogues
// when a tile leaves the micro-kernel).
//
//   packed A (a weight, row-major M x K): row panels of MR rows, k-major:  Ap[p][k * MR + i]  (zero rows past M)
//   packed B (activations, K x N):        column panels of NR columns:     Bp[p][k * NR + j]  (zero columns past N)
//
// kernel(K, Ap, Bp, C, ldc, accumulate) writes (accumulate: adds) the MR x NR product of K steps to C (row i
// at C + i * ldc); a K block [k0, k1) of a panel starts at Ap + slot(k0) * MR and Bp + slot(k0) * NR.
// half(...) does the same for the panel's first NR / 2 columns only, writing the others zero (accumulate:
// leaving them): for a last panel of at most NR / 2 valid columns.
//
// An ISA with kpack = 2 (AVX512-BF16 dot products, bf16 data only) packs k in pairs: each 32-bit slot of a
// panel holds the bf16 values of k = 2q (low half) and 2q + 1 (high half), slot q; an odd K ends with a zero
// high half. Its K blocks start at even k. The values are the bf16 data themselves, so nothing is rounded.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#include "mixer_cpu.h"

namespace mixer_cpu {

using MicroKernel = void (*)(int64_t K, const float* A, const float* B, float* C, int64_t ldc, bool accumulate);

// v[i][j] = GELU(v[i][j] + bias[i]) for i < rows, j < NR (rows of NR floats, contiguous), rounded to the
// storage dtype t: the epilogue of the first GEMMs, on one tile as it leaves the micro-kernel.
using TileGelu = void (*)(float* v, int64_t rows, const float* bias, bool tanh_form, DType t);

struct Isa {
  const char* name;
  int mr, nr;
  MicroKernel kernel;
  TileGelu bias_gelu;
  MicroKernel half;           // kernel on a panel's first NR / 2 columns (the portable one: the whole panel)
  // Packs MR rows of n 32-bit words (row i at src + i * ld) into a panel, dst[k * MR + i]: fp32 weights, or bf16
  // weights' k pairs; nullptr: the scalar loops.
  void (*pack)(const float* src, int64_t ld, int64_t n, float* dst) = nullptr;
  int kpack = 1;              // k values per 32-bit panel slot: 1 (fp32) or 2 (bf16 pairs)
  const Isa* bf16 = nullptr;  // the kernels for bf16 data, where they differ (nullptr: these)
  const Isa& for_dtype(DType t) const { return t == DType::bf16 && bf16 ? *bf16 : *this; }
  int64_t slot(int64_t k) const { return k / kpack; }
  int64_t slots(int64_t K) const { return (K + kpack - 1) / kpack; }
  // The kernel for a column panel with `cols` valid columns.
  MicroKernel for_columns(int64_t cols) const { return 2 * cols <= nr ? half : kernel; }
};

const Isa& current();

// A packed-B panel of K fp32 rows of NR values (bf16-representable) as kpack = 2 slots at dst: cdiv(K, 2)
// rows of NR slots, an odd K's last high halves zero. dst may be src (in place).
void pack_pairs(const float* src, int64_t K, int NR, float* dst);

// LayerNorm statistics of n values, as row_stats (two passes) but in 16 fp32 partial sums that vectorise:
// row_stats' double accumulation is a serial chain of dependent adds (3 ms of the Mixer-B/16 batch-8 token op).
void layer_norm_stats(const float* v, int64_t n, float eps, float* mean, float* rstd);

// dst[i] = (v[i] - mean) * rstd * w[i] + b[i] for i < n (bf16 values: the result rounded to bf16, as eager holds it):
// a contiguous row of LayerNorm (or the affine: mean 0, rstd 1) as it is packed.
void norm_row(const float* v, int64_t n, float mean, float rstd, const float* w, const float* b, float* dst);
void norm_row(const uint16_t* v, int64_t n, float mean, float rstd, const float* w, const float* b, float* dst);
// out[i] = x[i] + y[i] * scale[i] * ss for i < n, stored in x's dtype: a contiguous row of the residual epilogue.
void residual_row(const float* x, const float* y, const float* scale, float ss, int64_t n, float* out);
void residual_row(const uint16_t* x, const float* y, const float* scale, float ss, int64_t n, uint16_t* out);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned float buffer (one cache line; aligned vector loads in the micro-kernels), taken from a
// process-wide pool of earlier calls' buffers and given back to it: page-faulting fresh memory for the packed
// weights on every call cost more than packing them (Mixer-B/16 channel weights: 6 of 10 ms). The pool keeps
// at most 256 MiB; free_workspace() empties it.
struct Buffer {
  float* p = nullptr;
  int64_t n = 0;
  explicit Buffer(int64_t count);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

 private:
  size_t bytes_ = 0;
};

// A row-major M x K matrix of dtype t packed into MR-row panels for ``isa`` (fp32, or bf16 pairs where
// isa.kpack = 2): Buffer of cdiv(M, MR) * isa.slots(K) * MR 32-bit slots. Lazy: nothing packed ahead; each
// panel's K block is packed where it is used (panel() with a scratch of MR * isa.slots(k1 - k0) floats), for
// weights that each thread streams once a call: packing ahead wrote the whole packed copy to memory and read it
// back (Mixer-B/16 channel mixing at batch 1: 2 ms of 11).
struct PackedA {
  int64_t M, K;
  int mr;
  int64_t kslots;
  bool lazy;
  PackedA(const void* w, DType t, int64_t M, int64_t K, const Isa& isa, int threads, bool lazy = false);
  // Panel p's slots for k in [k0, k1) (k0 a slot boundary): in the packed buffer, or packed into scratch.
  const float* panel(int64_t p, int64_t k0, int64_t k1, float* scratch) const {
    if (!lazy) return buf.p + p * kslots * mr + isa.slot(k0) * mr;
    pack(p, k0, k1, scratch);
    return scratch;
  }
  int64_t panels() const { return cdiv(M, mr); }
  // Rows of panel p, k in [k0, k1), into dst (zero rows past M; an odd K's last high half zero).
  void pack(int64_t p, int64_t k0, int64_t k1, float* dst) const;

 private:
  const void* w;
  DType t;
  const Isa& isa;
  Buffer buf;
};

}  // namespace mixer_cpu
