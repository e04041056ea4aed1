// See pool.h.
#include "pool.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>

namespace gl {
namespace {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int64_t kSoloNs = 100'000'000;  // the first solo period (see adapt)

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

class Pool {
 public:
  Pool() : static_(env_is("GEMMALAB_POOL", "static")), adaptive_(!env_is("GEMMALAB_ADAPTIVE_THREADS", "0")) {}

  void run(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, void* ctx) {
    if (end <= begin) return;
    stats_[1]++;
    if (static_) {  // at::parallel_for: one static slice per thread
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
      return;
    }
    const int64_t t0 = now_ns();
    if (solo_.load(std::memory_order_relaxed)) {
      if (t0 < solo_until_.load(std::memory_order_relaxed)) {
        stats_[3]++;
        fn(ctx, begin, end);
        return;
      }
      leave_solo();
    }
    const int nt = std::max(1, at::get_num_threads());
    const int64_t n = end - begin;
    grain = std::max<int64_t>(grain, 1);
    // guided chunks: a claim takes 1/(2 nt) of what is left, at least `grain` items and 1/(16 nt)
    // of the job (each claim is one contended cache line)
    const int64_t min_chunk = std::max(grain, (n + 16 * nt - 1) / (16 * nt));
    if (nt == 1 || n <= min_chunk || at::in_parallel_region() || omp_in_parallel()) { fn(ctx, begin, end); return; }
    // one job at a time on the team; a concurrent caller (another Python thread) runs inline
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true)) { fn(ctx, begin, end); return; }
    next_.store(0, std::memory_order_relaxed);
    int64_t t_caller = 0;
    const int64_t parts = 2 * nt;
#pragma omp parallel num_threads(nt)
    {
      for (;;) {
        int64_t s = next_.load(std::memory_order_relaxed);
        if (s >= n) break;
        const int64_t size = std::min(n - s, std::max(min_chunk, (n - s) / parts));
        if (!next_.compare_exchange_weak(s, s + size, std::memory_order_acq_rel)) continue;
        fn(ctx, begin + s, begin + s + size);
      }
      if (omp_get_thread_num() == 0) t_caller = now_ns();
    }
    const int64_t t2 = now_ns();
    busy_.store(false);
    stats_[2]++;
    stats_[6] += (t2 - t_caller) / 1000;
    // the first jobs start the team's threads (and fault in their stacks): not a sign of contention
    if (adaptive_ && ++team_jobs_ > 64) adapt(t0, t_caller, t2);
  }

  void stats(int64_t out[8]) {
    for (int i = 0; i < 8; ++i) out[i] = stats_[i];
    out[0] = solo_.load() ? saved_threads_ : std::max(1, at::get_num_threads());
    out[5] = solo_.load() ? 1 : 0;
    out[7] = static_ ? 1 : 0;
  }
  void reset_stats() { for (int i = 1; i < 7; ++i) stats_[i] = 0; }

 private:
  // The caller finished its last chunk at t1 and the team ended at t2: a wait over 200 us and over
  // half the job means a thread of the team was not running (another process holds its core; a
  // single one is also what waking an idle virtual CPU can cost). Two such jobs close together, and
  // the next jobs run on the caller alone. Solo
  // mode lasts 100 ms, doubled (up to 3.2 s) each time the team fails again within a second of
  // being tried, back to 100 ms once the team has run cleanly for a second.
  void adapt(int64_t t0, int64_t t1, int64_t t2) {
    const int64_t straggle = t2 - t1, total = t2 - t0;
    const bool bad = straggle > 200'000 && 2 * straggle > total;
    badness_ = badness_ * 0.9 + (bad ? 1.0 : 0.0);
    if (badness_ > 1.5) enter_solo(t2);
    else if (t2 - team_since_ > 1'000'000'000) solo_ns_ = kSoloNs;
  }

  // Solo mode also sets this thread's OpenMP team size to 1, so that torch's own operations (the
  // sampler's, between the kernels' steps) stop waking a worker that has no core to run on; the
  // user's thread count comes back when it ends (unless it was changed meanwhile).
  void enter_solo(int64_t t) {
    saved_threads_ = omp_get_max_threads();
    omp_set_num_threads(1);
    solo_ns_ = (t - team_since_ < 1'000'000'000) ? std::min<int64_t>(2 * solo_ns_, 32 * kSoloNs) : kSoloNs;
    solo_until_.store(t + solo_ns_);
    solo_.store(true);
    badness_ = 0.0;
    stats_[4]++;
  }
  void leave_solo() {
    if (omp_get_max_threads() == 1 && saved_threads_ > 1) omp_set_num_threads(saved_threads_);
    solo_.store(false);
    team_since_ = now_ns();
  }

  const bool static_, adaptive_;
  alignas(64) std::atomic<int64_t> next_{0};  // the next unclaimed item of the running job
  alignas(64) std::atomic<bool> busy_{false};
  std::atomic<int64_t> solo_until_{0};
  std::atomic<bool> solo_{false};
  int saved_threads_ = 1;
  int64_t solo_ns_ = kSoloNs / 2;  // the first solo period is kSoloNs
  int64_t team_since_ = 0;        // when the team was last (re)started
  int64_t team_jobs_ = 0;
  double badness_ = 0.0;
  int64_t stats_[8] = {0, 0, 0, 0, 0, 0, 0, 0};
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, void* ctx) {
  pool().run(begin, end, grain, fn, ctx);
}
void pool_stats(int64_t out[8]) { pool().stats(out); }
void pool_reset_stats() { pool().reset_stats(); }

}  // namespace gl
