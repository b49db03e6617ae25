// The mixing core on the CPU: fused forward kernels and the plain loops they are tested against.
//
// Shapes: x (B, S, C) with any strides (in elements); out (B, S, C) contiguous. Weights in nn.Linear
// layout (out, in), row-major contiguous: token mixing w1 (D, S), w2 (S, D) or none (ResMLP's single
// S x S linear in w1); channel mixing w1 (D, C), w2 (C, D). Vectors contiguous, nullptr when absent.
// Every array but sample_scale (fp32) has the one storage type ``dtype``; arithmetic is fp32.
#pragma once

#include <cstdint>
#include <string>

namespace mixer_cpu {

enum class DType { f32, bf16 };

struct MixArgs {
  DType dtype = DType::f32;
  const void* x = nullptr;
  int64_t B = 0, S = 0, C = 0;
  int64_t sxb = 0, sxs = 0, sxc = 0;
  void* out = nullptr;
  const void* norm_w = nullptr;  // (C,) LayerNorm weight or ResMLP alpha
  const void* norm_b = nullptr;  // (C,)
  const void* w1 = nullptr;
  const void* b1 = nullptr;  // (D,)
  const void* w2 = nullptr;  // nullptr: ResMLP token linear
  const void* b2 = nullptr;  // (S,) token / (C,) channel
  int64_t D = 0;             // hidden width (S for the ResMLP token linear)
  const void* scale = nullptr;          // (C,) layer scale
  const float* sample_scale = nullptr;  // (B,) drop-path factor, fp32
  float eps = 1e-6f;
  bool layernorm = true;  // false: ResMLP affine
  bool gelu_tanh = false;
  int threads = 1;
};

// Fused kernels (the fastest code path the CPU supports: see isa()).
void token_mixing_forward(const MixArgs& a);
void channel_mixing_forward(const MixArgs& a);

// Plain loops, no blocking or intrinsics: the fused kernels' test oracle. Same rounding points.
void token_mixing_forward_reference(const MixArgs& a);
void channel_mixing_forward_reference(const MixArgs& a);

// The micro-kernel family chosen at run time: "avx512_bf16" (AVX-512, and AVX512-BF16 dot products for bf16
// data), "avx512", "avx2" or "portable". ``force`` (tests) pins one the CPU supports; "" restores the
// automatic choice. Returns false for an unknown or unsupported name.
std::string isa();
bool force_isa(const std::string& name);

// Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), as PyTorch's oneDNN bf16 matmuls then
// do; these kernels use AVX512-BF16 dot products (the avx512_bf16 family) but not AMX tiles.
bool native_bf16_matmul();

// Bytes of scratch (packed weights, per-thread buffers) kept between calls; free_workspace() returns them.
int64_t workspace_bytes();
void free_workspace();

}  // namespace mixer_cpu
