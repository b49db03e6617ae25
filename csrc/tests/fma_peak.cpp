// The fp32 FMA peak of this machine's cores, the ceiling quoted for the cpu backend in bench/NOTES.md:
// 12 independent chains of 256-bit FMAs per thread (enough to cover the FMA latency on two pipes), on 1 and
// on all hardware threads. Build and run:
//     g++ -O3 -pthread csrc/tests/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

__attribute__((target("avx2,fma"))) float chains(long iters) {
  __m256 c[12];
  for (int i = 0; i < 12; ++i) c[i] = _mm256_set1_ps(0.001f * i);
  const __m256 a = _mm256_set1_ps(0.9999f), b = _mm256_set1_ps(0.0001f);
  for (long t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = _mm256_fmadd_ps(a, c[i], b);
  }
  float out[8], sum = 0;
  for (int i = 0; i < 12; ++i) {
    _mm256_storeu_ps(out, c[i]);
    sum += out[0];
  }
  return sum;
}

int main() {
  const long iters = 200000000;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned threads : {1u, hw}) {
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> pool;
      for (unsigned i = 0; i < threads; ++i) pool.emplace_back([&] { volatile float s = chains(iters); (void)s; });
      for (auto& t : pool) t.join();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, threads * iters * 12 * 16 / s / 1e9);
    }
    std::printf("%u thread%s: %.1f GFLOP/s fp32\n", threads, threads > 1 ? "s" : "", best);
    if (hw == 1) break;
  }
}
