// The micro-kernels and the run-time choice among them. Each is compiled for its ISA with a target
// attribute, so the library builds with plain -O3 and runs on any x86-64 (and non-x86) CPU.
#include "gemm.h"

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common.h"
#include "mixer_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MIXER_X86 1
// The AVX512-BF16 intrinsics (__m512bh, _mm512_dpbf16_ps) arrived in GCC 10 and clang 9; older compilers
// build the other families only.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define MIXER_BF16_DOT 1
#endif
#endif

namespace mixer_cpu {

namespace {

// The tile GELU with NR a constant and the GELU form and dtype hoisted out of the loops, so that each ISA's
// copy is straight-line vector code: with the column count a run-time value the loop's peeling and remainder
// code, run for every 16-value row, made the token-mixing GELU cost half as much as its GEMM.
template <int NR>
__attribute__((always_inline)) inline void bias_gelu_tile(float* v, int64_t rows, const float* bias, bool tanh_form,
                                                          DType t) {
  if (tanh_form)
    for (int64_t i = 0; i < rows; ++i)
      for (int j = 0; j < NR; ++j) v[i * NR + j] = gelu_fast(v[i * NR + j] + bias[i], true);
  else
    for (int64_t i = 0; i < rows; ++i)
      for (int j = 0; j < NR; ++j) v[i * NR + j] = gelu_fast(v[i * NR + j] + bias[i], false);
  if (t != DType::f32)
    for (int64_t i = 0; i < rows * NR; ++i) v[i] = round_to(v[i], t);
}

// Portable: plain loops the compiler vectorises for the baseline ISA.
constexpr int P_MR = 4, P_NR = 16;
void kernel_portable(int64_t K, const float* A, const float* B, float* C, int64_t ldc, bool accumulate) {
  float acc[P_MR][P_NR];
  for (int i = 0; i < P_MR; ++i)
    for (int j = 0; j < P_NR; ++j) acc[i][j] = accumulate ? C[i * ldc + j] : 0.0f;
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < P_MR; ++i) {
      const float a = A[k * P_MR + i];
      for (int j = 0; j < P_NR; ++j) acc[i][j] += a * B[k * P_NR + j];
    }
  for (int i = 0; i < P_MR; ++i)
    for (int j = 0; j < P_NR; ++j) C[i * ldc + j] = acc[i][j];
}

void gelu_portable(float* v, int64_t rows, const float* bias, bool tanh_form, DType t) {
  bias_gelu_tile<P_NR>(v, rows, bias, tanh_form, t);
}

#ifdef MIXER_X86
// The register tile shared by the AVX2 and AVX-512 kernels: MR rows x 2 vectors (NR = 2 * VW floats), the
// accumulators in named variables. Written as arrays of vectors, GCC 12 kept them in registers but also
// stored all of them to the stack at every k step (objdump), which ran the AVX2 kernel at a third of peak.
// Per k: 2 aligned B loads, MR broadcasts of A, 2 * MR FMAs. ISA(V), ISA(VFMA), ... name the vector primitives
// of the ISA that ISA(name) selects around each kernel.
// HALF (a compile-time constant of each kernel, here and in the AVX512-BF16 one): the same tile on a panel's
// first VW columns only, for a last panel of at most NR / 2 valid columns (Mixer-B/16's 196 tokens at batch 1
// are 6 full panels and one of 4): half the FMAs; the tile's other columns are written zero (accumulate: left
// as they are), so that the epilogues see finite values there.
#define MF_DECL(r)                                                                    \
  ISA(V) c##r##a = acc ? ISA(VLOADU)(C + r * ldc) : ISA(VZERO),                       \
         c##r##b = !HALF && acc ? ISA(VLOADU)(C + r * ldc + ISA(VW)) : ISA(VZERO);
#define MF_STEP(r)                                                                    \
  {                                                                                   \
    const ISA(V) a = ISA(VSET1)(A[k * MR + r]);                                       \
    c##r##a = ISA(VFMA)(a, b0, c##r##a);                                              \
    if (!HALF) c##r##b = ISA(VFMA)(a, b1, c##r##b);                                   \
  }
#define MF_STORE(r)                                                                   \
  ISA(VSTOREU)(C + r * ldc, c##r##a);                                                 \
  if (!HALF || !acc) ISA(VSTOREU)(C + r * ldc + ISA(VW), c##r##b);
#define MF_BODY(ROWS)                                                                 \
  ROWS(MF_DECL)                                                                       \
  _Pragma("GCC unroll 2") for (int64_t k = 0; k < K; ++k) {                           \
    const ISA(V) b0 = ISA(VLOAD)(B + k * 2 * ISA(VW));                                \
    const ISA(V) b1 = HALF ? ISA(VZERO) : ISA(VLOAD)(B + k * 2 * ISA(VW) + ISA(VW));  \
    ROWS(MF_STEP)                                                                     \
  }                                                                                   \
  ROWS(MF_STORE)
#define MF_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MF_ROWS12(X) MF_ROWS6(X) X(6) X(7) X(8) X(9) X(10) X(11)

// The vector primitives of each ISA; ISA(name) selects one set around each kernel.
#define AVX2_V __m256
#define AVX2_VW 8
#define AVX2_VZERO _mm256_setzero_ps()
#define AVX2_VLOAD _mm256_load_ps
#define AVX2_VLOADU _mm256_loadu_ps
#define AVX2_VSTOREU _mm256_storeu_ps
#define AVX2_VSET1 _mm256_set1_ps
#define AVX2_VFMA _mm256_fmadd_ps
#define AVX512_V __m512
#define AVX512_VW 16
#define AVX512_VZERO _mm512_setzero_ps()
#define AVX512_VLOAD _mm512_load_ps
#define AVX512_VLOADU _mm512_loadu_ps
#define AVX512_VSTOREU _mm512_storeu_ps
#define AVX512_VSET1 _mm512_set1_ps
#define AVX512_VFMA _mm512_fmadd_ps

// AVX2 + FMA: 6 x 16 tile = 12 ymm accumulators, 2 for B, 1 broadcast (15 of 16 registers).
#define ISA(name) AVX2_##name
constexpr int A2_MR = 6, A2_NR = 16;
template <bool HALF>
__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t K, const float* A, const float* B, float* C, int64_t ldc,
                                                        bool acc) {
  constexpr int MR = A2_MR;
  MF_BODY(MF_ROWS6)
}
#undef ISA

__attribute__((target("avx2,fma"))) void gelu_avx2(float* v, int64_t rows, const float* bias, bool tanh_form, DType t) {
  bias_gelu_tile<A2_NR>(v, rows, bias, tanh_form, t);
}

// AVX-512: 12 x 32 tile = 24 zmm accumulators, 2 for B, 1 broadcast (27 of 32 registers).
#define ISA(name) AVX512_##name
constexpr int A5_MR = 12, A5_NR = 32;
template <bool HALF>
__attribute__((target("avx512f,fma"))) void kernel_avx512(int64_t K, const float* A, const float* B, float* C,
                                                          int64_t ldc, bool acc) {
  constexpr int MR = A5_MR;
  MF_BODY(MF_ROWS12)
}
#undef ISA

// The exact (erf) GELU of gelu_fast in intrinsics: the reciprocal by VRCP14PS and one Newton step (~2^-23
// relative) instead of a division, 2^n by VSCALEFPS, GELU(z) = (z + |z| erf|z/sqrt2|) / 2 with no select, and
// bf16 rounding (round to nearest even, NaN kept quiet) in the same pass. The compiler's vectorisation of
// gelu_fast took ~40 cycles a vector (perf: 12 % of the bf16 token op at Mixer-B/16 batch 8).
__attribute__((target("avx512f,fma"))) inline __m512 gelu_erf_avx512(__m512 z) {
  // |z| / sqrt2 clamped at 1e4 (erf is 1 there): an infinite d would make the Newton step NaN; a NaN z gives
  // 1e4 here (MINPS returns its second operand) and stays NaN through the last line.
  const __m512 az = _mm512_abs_ps(z);
  const __m512 ax = _mm512_min_ps(_mm512_mul_ps(az, _mm512_set1_ps(0.7071067811865476f)), _mm512_set1_ps(1e4f));
  const __m512 d = _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(d);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
  __m512 poly = _mm512_fmadd_ps(t, _mm512_set1_ps(1.061405429f), _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  // exp(-ax^2) as exp_neg: clamped at -87, n = round(v log2 e), r = v - n ln2, degree-6 polynomial, times 2^n
  const __m512 v = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.6931471805599453f), v);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 720), r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, _mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(_mm512_fmadd_ps(az, erf_abs, z), _mm512_set1_ps(0.5f));
}

// fp32 -> bf16 -> fp32 as f32_to_bf16 rounds (nearest even; a NaN stays a quiet NaN).
__attribute__((target("avx512f"))) inline __m512 round_bf16_avx512(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
  return _mm512_castsi512_ps(_mm512_and_si512(out, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

__attribute__((target("avx512f,fma"))) void gelu_avx512(float* v, int64_t rows, const float* bias, bool tanh_form,
                                                        DType t) {
  if (tanh_form) {
    bias_gelu_tile<A5_NR>(v, rows, bias, tanh_form, t);
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 b = _mm512_set1_ps(bias[i]);
    for (int h = 0; h < A5_NR; h += 16) {
      __m512 g = gelu_erf_avx512(_mm512_add_ps(_mm512_loadu_ps(v + i * A5_NR + h), b));
      if (t != DType::f32) g = round_bf16_avx512(g);
      _mm512_storeu_ps(v + i * A5_NR + h, g);
    }
  }
}

// Packs 12 rows of 32-bit words (row i at src + i * ld) into a panel, dst[k * 12 + i] for k < n: fp32 weights,
// and bf16 weights as k pairs (a pair is the word at w[i, 2q]): 16 k at a time, the 12 x 16 block transposed in
// registers (4 stages of in-lane and lane shuffles) and stored as 16 runs of 12, instead of a load and a store
// a word. Measured at Mixer-B/16 channel mixing, batch 1: 0.1-0.5 ms of the ~2 ms that packing ahead cost;
// the rest was memory traffic (the packed copy written out and read back), which packing where used removes.
static_assert(A5_MR == 12, "pack12_avx512 packs the AVX-512 tile's 12-row panels");
__attribute__((target("avx512f"))) void pack12_avx512(const float* src, int64_t ld, int64_t n, float* dst) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const float* s = src + k;
    // rows 4g .. 4g+3 -> v[g][c]: 128-bit lane L holds column 4L + c of those rows
    __m512 v[3][4];
    for (int g = 0; g < 3; ++g) {
      const __m512 r0 = _mm512_loadu_ps(s + (4 * g) * ld), r1 = _mm512_loadu_ps(s + (4 * g + 1) * ld);
      const __m512 r2 = _mm512_loadu_ps(s + (4 * g + 2) * ld), r3 = _mm512_loadu_ps(s + (4 * g + 3) * ld);
      const __m512 lo01 = _mm512_unpacklo_ps(r0, r1), hi01 = _mm512_unpackhi_ps(r0, r1);
      const __m512 lo23 = _mm512_unpacklo_ps(r2, r3), hi23 = _mm512_unpackhi_ps(r2, r3);
      v[g][0] = _mm512_shuffle_ps(lo01, lo23, 0x44);
      v[g][1] = _mm512_shuffle_ps(lo01, lo23, 0xEE);
      v[g][2] = _mm512_shuffle_ps(hi01, hi23, 0x44);
      v[g][3] = _mm512_shuffle_ps(hi01, hi23, 0xEE);
    }
    // column 4L + c = lane L of v[0][c], v[1][c], v[2][c] (a fourth group would fill lanes 12-15: not stored)
    for (int c = 0; c < 4; ++c) {
      const __m512 x0 = _mm512_shuffle_f32x4(v[0][c], v[1][c], 0x88), x1 = _mm512_shuffle_f32x4(v[0][c], v[1][c], 0xDD);
      const __m512 x2 = _mm512_shuffle_f32x4(v[2][c], v[2][c], 0x88), x3 = _mm512_shuffle_f32x4(v[2][c], v[2][c], 0xDD);
      float* d = dst + (k + c) * 12;
      _mm512_mask_storeu_ps(d, 0x0FFF, _mm512_shuffle_f32x4(x0, x2, 0x88));           // column c
      _mm512_mask_storeu_ps(d + 4 * 12, 0x0FFF, _mm512_shuffle_f32x4(x1, x3, 0x88));  // column 4 + c
      _mm512_mask_storeu_ps(d + 8 * 12, 0x0FFF, _mm512_shuffle_f32x4(x0, x2, 0xDD));  // column 8 + c
      _mm512_mask_storeu_ps(d + 12 * 12, 0x0FFF, _mm512_shuffle_f32x4(x1, x3, 0xDD)); // column 12 + c
    }
  }
  for (; k < n; ++k)  // the words as they are (bf16 rows are only 2-byte aligned)
    for (int i = 0; i < 12; ++i) std::memcpy(dst + k * 12 + i, src + i * ld + k, sizeof(float));
}

#ifdef MIXER_BF16_DOT
// AVX512-BF16, bf16 data: the AVX-512 tile (12 x 32, 24 accumulators), each step a k pair. VDPBF16PS adds two
// exact bf16 products to an fp32 lane, twice the multiply-adds of an fp32 FMA in the same issue slot (measured
// on this Zen 4 EPYC: 234 against 117 GFLOP/s a core), so the product is fp32-accumulated as before, in pairs.
// Operands with bf16 denormals count as zero (the instruction's DAZ): below 1e-38, past any tolerance here.
#define MF16_DECL(r) __m512 c##r##a = acc ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps(), \
                            c##r##b = !HALF && acc ? _mm512_loadu_ps(C + r * ldc + 16) : _mm512_setzero_ps();
#define MF16_STEP(r)                                                                            \
  {                                                                                             \
    const __m512bh a = (__m512bh)_mm512_set1_epi32(slot_bits(A + q * A5_MR + r));              \
    c##r##a = _mm512_dpbf16_ps(c##r##a, a, b0);                                                  \
    if (!HALF) c##r##b = _mm512_dpbf16_ps(c##r##b, a, b1);                                       \
  }
#define MF16_STORE(r)                        \
  _mm512_storeu_ps(C + r * ldc, c##r##a);    \
  if (!HALF || !acc) _mm512_storeu_ps(C + r * ldc + 16, c##r##b);
// A panel slot's two bf16 halves as one 32-bit word (never read as a float).
inline uint32_t slot_bits(const float* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <bool HALF>
__attribute__((target("avx512f,avx512bf16,fma"))) void kernel_avx512_bf16(int64_t K, const float* A, const float* B,
                                                                          float* C, int64_t ldc, bool acc) {
  MF_ROWS12(MF16_DECL)
  const int64_t pairs = (K + 1) / 2;
  _Pragma("GCC unroll 2") for (int64_t q = 0; q < pairs; ++q) {
    // The slots' bits as they are (integer loads: no float operation touches the packed pairs).
    const __m512bh b0 = (__m512bh)_mm512_load_si512(B + q * A5_NR);
    const __m512bh b1 = HALF ? b0 : (__m512bh)_mm512_load_si512(B + q * A5_NR + 16);  // HALF: unused
    MF_ROWS12(MF16_STEP)
  }
  MF_ROWS12(MF16_STORE)
}
#endif  // MIXER_BF16_DOT
#endif

const Isa PORTABLE{"portable", P_MR, P_NR, kernel_portable, gelu_portable, kernel_portable};
#ifdef MIXER_X86
const Isa AVX2{"avx2", A2_MR, A2_NR, kernel_avx2<false>, gelu_avx2, kernel_avx2<true>};
const Isa AVX512{"avx512", A5_MR, A5_NR, kernel_avx512<false>, gelu_avx512, kernel_avx512<true>, pack12_avx512};
// The avx512_bf16 family: AVX-512 for fp32 data, dot products in k pairs for bf16 (the pairs need an even MR:
// a first-GEMM tile's rows are whole pairs of the second GEMM's k).
#ifdef MIXER_BF16_DOT
static_assert(A5_MR % 2 == 0, "bf16 pairs need an even MR");
const Isa AVX512_BF16_PAIRS{"avx512_bf16", A5_MR, A5_NR, kernel_avx512_bf16<false>, gelu_avx512,
                            kernel_avx512_bf16<true>, pack12_avx512, 2};
const Isa AVX512_BF16{"avx512_bf16", A5_MR, A5_NR, kernel_avx512<false>, gelu_avx512, kernel_avx512<true>,
                      pack12_avx512, 1, &AVX512_BF16_PAIRS};
#endif
#endif

bool supported(const std::string& name) {
  if (name == "portable") return true;
#ifdef MIXER_X86
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#ifdef MIXER_BF16_DOT
  if (name == "avx512_bf16") return supported("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
#endif
  return false;
}

const Isa* by_name(const std::string& name) {
#ifdef MIXER_X86
#ifdef MIXER_BF16_DOT
  if (name == "avx512_bf16") return &AVX512_BF16;
#endif
  if (name == "avx512") return &AVX512;
  if (name == "avx2") return &AVX2;
#endif
  if (name == "portable") return &PORTABLE;
  return nullptr;
}

const Isa* best() {
  for (const char* name : {"avx512_bf16", "avx512", "avx2", "portable"})
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

bool native_bf16_matmul() {
#ifdef MIXER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
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

namespace {

std::mutex pool_mutex;
std::multimap<size_t, void*> pool;  // free blocks by size
size_t pool_bytes = 0;
constexpr size_t POOL_LIMIT = size_t(256) << 20;

}  // namespace

Buffer::Buffer(int64_t count) : n(count) {
  bytes_ = ((static_cast<size_t>(count > 0 ? count : 1) * sizeof(float) + 63) / 64) * 64;
  {
    // The smallest pooled block that fits, if it is not more than twice the request.
    std::lock_guard<std::mutex> lock(pool_mutex);
    auto it = pool.lower_bound(bytes_);
    if (it != pool.end() && it->first <= 2 * bytes_) {
      bytes_ = it->first;
      p = static_cast<float*>(it->second);
      pool_bytes -= it->first;
      pool.erase(it);
      return;
    }
  }
  p = static_cast<float*>(std::aligned_alloc(64, bytes_));
  if (!p) throw std::bad_alloc();
}

Buffer::~Buffer() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (pool_bytes + bytes_ > POOL_LIMIT) {
    std::free(p);
    return;
  }
  pool.emplace(bytes_, p);
  pool_bytes += bytes_;
}

int64_t workspace_bytes() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  return static_cast<int64_t>(pool_bytes);
}

void free_workspace() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  for (auto& [size, block] : pool) std::free(block);
  pool.clear();
  pool_bytes = 0;
}

namespace {

// Rows [0, rows) x k [0, n) of a weight (row i at w + i * ld) as one MR-row panel, k outer so that the stores are
// sequential (measured 1.3 ms for a 3072 x 768 fp32 weight, against 3.6 ms row by row with stride-MR stores);
// zero rows past `rows`.
template <int MR, class T>
void pack_panel(const T* w, int64_t ld, int64_t rows, int64_t n, float* dst) {
  if (rows == MR) {
    for (int64_t k = 0; k < n; ++k)
      for (int i = 0; i < MR; ++i) dst[k * MR + i] = get(w, i * ld + k);
    return;
  }
  for (int64_t k = 0; k < n; ++k)
    for (int i = 0; i < MR; ++i) dst[k * MR + i] = i < rows ? get(w, i * ld + k) : 0.0f;
}

template <class T>
void pack_panel(int mr, const T* w, int64_t ld, int64_t rows, int64_t n, float* dst) {
  switch (mr) {
    case 4: return pack_panel<4>(w, ld, rows, n, dst);
    case 6: return pack_panel<6>(w, ld, rows, n, dst);
    case 12: return pack_panel<12>(w, ld, rows, n, dst);
    default: throw std::logic_error("pack_panel: unsupported MR " + std::to_string(mr));
  }
}

}  // namespace

// Row loops of the token-mixing pack and epilogue, compiled per ISA: ops.cpp is built for the baseline ISA
// (SSE2), where they were 5 % each of the bf16 token op at Mixer-B/16 batch 8 (perf).
template <class T>
inline void norm_row_impl(const T* v, int64_t n, float mean, float rstd, const float* w, const float* b, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (get(v, i) - mean) * rstd * w[i] + b[i];
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void norm_row(const float* v, int64_t n, float mean,
                                                                          float rstd, const float* w,
                                                                          const float* b, float* dst) {
  norm_row_impl(v, n, mean, rstd, w, b, dst);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void norm_row(const uint16_t* v, int64_t n, float mean,
                                                                          float rstd, const float* w,
                                                                          const float* b, float* dst) {
  norm_row_impl(v, n, mean, rstd, w, b, dst);
  for (int64_t i = 0; i < n; ++i) dst[i] = round_to(dst[i], DType::bf16);
}

template <class T>
inline void residual_row_impl(const T* x, const float* y, const float* scale, float ss, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) put(out, i, get(x, i) + y[i] * scale[i] * ss);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void residual_row(const float* x, const float* y,
                                                                              const float* scale, float ss,
                                                                              int64_t n, float* out) {
  residual_row_impl(x, y, scale, ss, n, out);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void residual_row(const uint16_t* x, const float* y,
                                                                              const float* scale, float ss,
                                                                              int64_t n, uint16_t* out) {
  residual_row_impl(x, y, scale, ss, n, out);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void layer_norm_stats(const float* v, int64_t n,
                                                                                 float eps, float* mean,
                                                                                 float* rstd) {
  constexpr int L = 16;
  float part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) part[j] += v[i + j];
  double total = 0;
  for (int j = 0; j < L; ++j) total += part[j];
  for (; i < n; ++i) total += v[i];
  const float m = static_cast<float>(total / n);
  float sq[L] = {};
  for (i = 0; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) sq[j] += (v[i + j] - m) * (v[i + j] - m);
  double q = 0;
  for (int j = 0; j < L; ++j) q += sq[j];
  for (; i < n; ++i) q += static_cast<double>(v[i] - m) * (v[i] - m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(static_cast<float>(q / n) + eps);
}

void pack_pairs(const float* src, int64_t K, int NR, float* dst) {
  for (int64_t q = 0; q < (K + 1) / 2; ++q) {
    const float* lo = src + 2 * q * NR;
    const float* hi = 2 * q + 1 < K ? lo + NR : nullptr;
    // In place (dst == src), slot row q overwrites row q <= 2q: element j only after it and its partner are
    // read, and rows of later pairs are past it.
    for (int j = 0; j < NR; ++j) {
      uint32_t a, b = 0;
      std::memcpy(&a, lo + j, sizeof(a));
      if (hi) std::memcpy(&b, hi + j, sizeof(b));
      const uint32_t v = (a >> 16) | (b & 0xffff0000u);
      std::memcpy(dst + q * NR + j, &v, sizeof(v));
    }
  }
}

PackedA::PackedA(const void* w_, DType t_, int64_t M_, int64_t K_, const Isa& isa_, int threads, bool lazy_)
    : M(M_), K(K_), mr(isa_.mr), kslots(isa_.slots(K_)), lazy(lazy_), w(w_), t(t_), isa(isa_),
      buf(lazy_ ? 0 : cdiv(M_, isa_.mr) * isa_.slots(K_) * isa_.mr) {
  if (isa.kpack == 2 && t != DType::bf16) throw std::logic_error("PackedA: bf16 pairs of non-bf16 data");
  if (!lazy) parallel_for(panels(), threads, [&](int64_t p, int) { pack(p, 0, K, buf.p + p * kslots * mr); });
}

void PackedA::pack(int64_t p, int64_t k0, int64_t k1, float* dst) const {
  const int64_t rows = std::min<int64_t>(mr, M - p * mr), n = k1 - k0;
  if (t == DType::f32) {
    const float* src = static_cast<const float*>(w) + p * mr * K + k0;
    if (isa.pack && rows == mr)
      isa.pack(src, K, n, dst);
    else
      pack_panel(mr, src, K, rows, n, dst);
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(w) + p * mr * K + k0;
  if (isa.kpack == 1) {
    pack_panel(mr, src, K, rows, n, dst);
    return;
  }
  // Slot (q, i) = the raw bf16 bits of w[i, k0 + 2q] (low) and w[i, k0 + 2q + 1] (high), zero past M and K: on
  // a little-endian CPU the 32-bit word at w[i, k0 + 2q], so with K even (k0 is) a 32-bit word transpose.
  if (isa.pack && rows == mr && K % 2 == 0) {  // every kpack = 2 family has pack; below: partial panels, odd K
    isa.pack(reinterpret_cast<const float*>(src), K / 2, n / 2, dst);
    return;
  }
  for (int64_t q = 0; q < isa.slots(n); ++q)
    for (int i = 0; i < mr; ++i) {
      uint32_t v = 0;
      if (i < rows && 2 * q + 1 < n) {
        std::memcpy(&v, src + i * K + 2 * q, sizeof(v));
      } else if (i < rows) {
        v = src[i * K + 2 * q];
      }
      std::memcpy(dst + q * mr + i, &v, sizeof(v));
    }
}

}  // namespace mixer_cpu
