// parallel_for on a persistent pool of worker threads that spin briefly before sleeping. Spawning and
// joining std::threads on every call, and then waking sleeping workers through a condition variable, each
// cost 45-60 us per parallel section here (a KVM guest: a wake-up is an inter-processor interrupt through
// the hypervisor), 0.15 ms of a 0.4 ms ResMLP-12 token op at batch 1. Workers now poll for the next job
// for up to SPIN after their last one, as OpenMP runtimes do, and sleep only after that.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MIXER_PAUSE() _mm_pause()
#else
#define MIXER_PAUSE() std::this_thread::yield()
#endif

namespace mixer_cpu {

namespace {

constexpr auto SPIN = std::chrono::microseconds(200);

thread_local bool in_worker = false;

// Polls ready() for up to SPIN; true if it became true.
template <class Ready>
bool spin(const Ready& ready) {
  const auto until = std::chrono::steady_clock::now() + SPIN;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      MIXER_PAUSE();
    }
    if (std::chrono::steady_clock::now() > until) return false;
  }
}

class Pool {
 public:
  void run(int64_t n_tasks, int n, const std::function<void(int64_t, int)>& fn) {
    std::lock_guard<std::mutex> one_job(job_mutex_);  // one job at a time; callers queue here
    grow(n - 1);
    fn_ = &fn;
    n_tasks_ = n_tasks;
    error_ = nullptr;
    pending_.store(n - 1, std::memory_order_relaxed);
    {
      // The job word carries the generation and the worker count together, so that a worker never pairs
      // one job's generation with another's count. Published under mutex_ for workers asleep on wake_.
      std::lock_guard<std::mutex> lock(mutex_);
      job_.store(((job_.load(std::memory_order_relaxed) >> 16) + 1) << 16 | static_cast<uint64_t>(n),
                 std::memory_order_release);
    }
    wake_.notify_all();
    std::exception_ptr mine;
    try {
      range(0, n);
    } catch (...) {
      mine = std::current_exception();
    }
    auto done = [&] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin(done)) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, done);
    }
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void range(int w, int n) {
    const int64_t lo = n_tasks_ * w / n, hi = n_tasks_ * (w + 1) / n;
    for (int64_t t = lo; t < hi; ++t) (*fn_)(t, w);
  }

  // Called under job_mutex_, before the job is published: a new worker waits for the next job.
  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < workers) {
      const int w = static_cast<int>(threads_.size()) + 1;
      const uint64_t now = job_.load(std::memory_order_relaxed);
      threads_.emplace_back([this, w, now] { loop(w, now); });
      threads_.back().detach();  // the pool lives until the process ends
    }
  }

  void loop(int w, uint64_t seen) {
    in_worker = true;
    for (;;) {
      uint64_t job = seen;
      auto ready = [&] { return (job = job_.load(std::memory_order_acquire)) != seen; };
      if (!spin(ready)) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, ready);
      }
      seen = job;
      const int n = static_cast<int>(job & 0xffff);
      if (w >= n) continue;  // not needed for this job
      std::exception_ptr err;
      try {
        range(w, n);
      } catch (...) {
        err = std::current_exception();
      }
      if (err) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = err;
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caller may be between its check and its sleep
        done_.notify_all();
      }
    }
  }

  std::mutex job_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<uint64_t> job_{0};  // generation << 16 | worker count
  std::atomic<int> pending_{0};
  std::exception_ptr error_;
};

// Never destroyed (its threads are detached and run until exit). A forked child has none of the parent's
// threads: it gets a fresh pool, and the parent's is abandoned without being touched.
Pool* pool = nullptr;
std::once_flag pool_once;

Pool& the_pool() {
  std::call_once(pool_once, [] {
    pool = new Pool;
    pthread_atfork(nullptr, nullptr, [] { pool = new Pool; });
  });
  return *pool;
}

}  // namespace

void parallel_for(int64_t n_tasks, int threads, const std::function<void(int64_t, int)>& fn) {
  // At most 65535 workers: the job word keeps the count in 16 bits.
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, n_tasks, 0xffff})));
  if (n <= 1 || in_worker) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  the_pool().run(n_tasks, n, fn);
}

}  // namespace mixer_cpu
