// The C++ kernels against their plain-loop oracle, without Python: every ISA the CPU has, both dtypes,
// both ops, Mixer and ResMLP, awkward shapes (D = 1100: a K-blocked second GEMM; B = 12 and B * S = 800: enough
// tasks that 3 threads take whole tasks, the others share tasks and pack the weights where they use them; B * S = 300:
// two shared tasks, the last panel half-width on AVX-512), strided input, 1 and 3 threads. Built and run under
// AddressSanitizer and UBSan by csrc/tests/sanitize.sh (which tests/test_cpu.py calls). Exit status 0: all agree.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../common.h"
#include "../mixer_cpu.h"

using namespace mixer_cpu;

namespace {

struct Case {
  int64_t B, S, C, D;
  bool token, resmlp;
  DType t;
  int threads;
};

std::vector<uint16_t> as_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = f32_to_bf16(v[i]);
  return o;
}

int run(const Case& k, std::mt19937& rng) {
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto rnd = [&](int64_t n, float std) {
    std::vector<float> v(n);
    for (auto& e : v) e = n01(rng) * std;
    return v;
  };
  const int64_t n_in = k.token ? k.S : k.C, D = k.token && k.resmlp ? k.S : k.D;
  // x is stored with a padded channel stride (C + 3) to exercise strided input.
  const int64_t sc = k.C + 3;
  auto x = rnd(k.B * k.S * sc, 1.0f), nw = rnd(k.C, 0.3f), nb = rnd(k.C, 0.3f), w1 = rnd(D * n_in, 0.2f),
       b1 = rnd(D, 0.3f), w2 = rnd(n_in * D, 0.2f), b2 = rnd(n_in, 0.3f), scale = rnd(k.C, 1.0f);
  std::vector<float> ss = {0.0f, 1.5f, 2.0f, 0.5f};
  ss.resize(std::max<int64_t>(k.B, 4), 1.0f);
  std::vector<uint16_t> xh = as_bf16(x), nwh = as_bf16(nw), nbh = as_bf16(nb), w1h = as_bf16(w1), b1h = as_bf16(b1),
                        w2h = as_bf16(w2), b2h = as_bf16(b2), sch = as_bf16(scale);
  const bool h = k.t == DType::bf16;
  std::vector<float> out32(k.B * k.S * k.C), ref32(out32.size());
  std::vector<uint16_t> out16(out32.size()), ref16(out32.size());
  MixArgs a;
  a.dtype = k.t;
  a.x = h ? static_cast<const void*>(xh.data()) : x.data();
  a.B = k.B, a.S = k.S, a.C = k.C, a.sxb = k.S * sc, a.sxs = sc, a.sxc = 1;
  a.norm_w = h ? static_cast<const void*>(nwh.data()) : nw.data();
  a.norm_b = h ? static_cast<const void*>(nbh.data()) : nb.data();
  a.w1 = h ? static_cast<const void*>(w1h.data()) : w1.data();
  a.b1 = h ? static_cast<const void*>(b1h.data()) : b1.data();
  const bool one_linear = k.token && k.resmlp;
  a.w2 = one_linear ? nullptr : (h ? static_cast<const void*>(w2h.data()) : w2.data());
  a.b2 = one_linear ? nullptr : (h ? static_cast<const void*>(b2h.data()) : b2.data());
  a.D = D;
  a.layernorm = !k.resmlp;
  a.gelu_tanh = k.token;
  a.threads = k.threads;
  if (k.resmlp) {
    a.scale = h ? static_cast<const void*>(sch.data()) : scale.data();
    a.sample_scale = ss.data();
  }
  a.out = h ? static_cast<void*>(out16.data()) : out32.data();
  k.token ? token_mixing_forward(a) : channel_mixing_forward(a);
  a.out = h ? static_cast<void*>(ref16.data()) : ref32.data();
  k.token ? token_mixing_forward_reference(a) : channel_mixing_forward_reference(a);
  double worst = 0, peak = 0;
  for (size_t i = 0; i < out32.size(); ++i) {
    const float o = h ? bf16_to_f32(out16[i]) : out32[i], r = h ? bf16_to_f32(ref16[i]) : ref32[i];
    if (!std::isfinite(o)) return 1;
    worst = std::max(worst, static_cast<double>(std::fabs(o - r)));
    peak = std::max(peak, static_cast<double>(std::fabs(r)));
  }
  // fp32: summation order and the GELU approximation (<= 1.5e-7 absolute in erf); bf16: one rounding step.
  const double tol = (h ? 1.6e-2 : 2e-5) * std::max(1.0, peak);
  if (worst > tol) {
    std::printf("FAIL %s %s %s B%ld S%ld C%ld D%ld threads %d: max |fused - oracle| = %g > %g\n", isa().c_str(),
                k.token ? "token" : "channel", k.resmlp ? "resmlp" : "mixer", static_cast<long>(k.B),
                static_cast<long>(k.S), static_cast<long>(k.C), static_cast<long>(D), k.threads, worst, tol);
    return 1;
  }
  return 0;
}

// The thread pool: every task exactly once on any thread count, two callers at once, an exception from a
// task rethrown to the caller, and a forked child (which has none of the parent's threads) still served.
int check_parallel_for() {
  int failures = 0;
  for (int it = 0; it < 500; ++it) {
    std::vector<std::atomic<int>> hits(it % 13);
    parallel_for(static_cast<int64_t>(hits.size()), 1 + it % 5, [&](int64_t t, int) { ++hits[t]; });
    for (auto& h : hits) failures += h != 1;
  }
  std::atomic<int64_t> sum{0};
  auto many = [&](int threads) {
    for (int i = 0; i < 200; ++i) parallel_for(8, threads, [&](int64_t t, int) { sum += t; });
  };
  std::thread a(many, 2), b(many, 3);
  a.join();
  b.join();
  failures += sum != 2 * 200 * 28;
  try {
    parallel_for(10, 3, [](int64_t t, int) {
      if (t == 7) throw std::runtime_error("task 7");
    });
    ++failures;
  } catch (const std::runtime_error&) {
  }
  const pid_t pid = fork();
  if (pid == 0) {
    std::atomic<int64_t> s{0};
    parallel_for(100, 3, [&](int64_t t, int) { s += t; });
    _exit(s == 4950 ? 0 : 1);
  }
  int status = 0;
  failures += waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0;
  if (failures) std::printf("FAIL parallel_for: %d checks failed\n", failures);
  return failures;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  int failures = check_parallel_for(), cases = 1;
  for (const char* name : {"portable", "avx2", "avx512", "avx512_bf16"}) {
    if (!force_isa(name)) continue;
    for (DType t : {DType::f32, DType::bf16})
      for (bool token : {true, false})
        for (bool resmlp : {false, true})
          for (const Case& shape : {Case{2, 13, 37, 29}, Case{1, 49, 64, 20}, Case{3, 7, 5, 3}, Case{2, 5, 40, 1100},
                                     Case{12, 9, 24, 20}, Case{4, 200, 24, 16}, Case{1, 300, 16, 600}})
            for (int threads : {1, 3}) {
              Case k = shape;
              k.token = token, k.resmlp = resmlp, k.t = t, k.threads = threads;
              failures += run(k, rng);
              ++cases;
            }
  }
  // The pool keeps the buffers of earlier calls; emptying it leaves nothing for LeakSanitizer to find.
  if (workspace_bytes() <= 0) {
    std::printf("FAIL the workspace pool kept nothing between calls\n");
    ++failures;
  }
  free_workspace();
  if (workspace_bytes() != 0) ++failures;
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
