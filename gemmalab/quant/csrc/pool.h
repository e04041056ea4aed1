// Parallel loops of the kernels (pool.cpp): guided chunks claimed dynamically on torch's OpenMP
// team, and the caller alone while other processes hold the cores.
//
// at::parallel_for gives each thread one static slice: when another process holds a core and one
// of our threads is preempted, its slice waits for it and so does the whole step (decode fell to a
// third of its speed beside a busy job). Here any thread of the team claims the next chunk with a
// compare-and-swap (1/(2 x threads) of what is left), so a late or slow thread leaves its share to
// the others. The team's closing barrier still waits for every thread to arrive, so when the caller
// keeps waiting there (over 200 us and over half the job, twice within a few jobs),
// jobs run on the caller alone for 100 ms (doubling while the team keeps failing), with no team and
// no barrier (the caller's OpenMP team size is 1 meanwhile,
// so that torch's own small operations between the kernels' steps do not wake a worker that has no
// core either), and then the team is tried again. The
// kernels share torch's threads (a second pool would fight OpenMP's spinning workers for the cores).
// Results never depend on the chunking: each output element is computed within one chunk,
// independently of the others.
//
// GEMMALAB_POOL=static uses at::parallel_for (for comparisons); GEMMALAB_ADAPTIVE_THREADS=0 keeps
// the team whatever the straggling. Threads: torch.get_num_threads().
#pragma once
#include <cstdint>

namespace gl {

using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, void* ctx);

template <class F>
inline void pfor(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for(begin, end, grain, [](void* c, int64_t b, int64_t e) { (*static_cast<const F*>(c))(b, e); },
               const_cast<void*>(static_cast<const void*>(&f)));
}

// threads, jobs, jobs run on the team, jobs run by the caller alone in solo mode, switches to solo
// mode, whether solo mode is on now, total straggle microseconds, pool kind (0 guided, 1 static)
void pool_stats(int64_t out[8]);
void pool_reset_stats();

}  // namespace gl
