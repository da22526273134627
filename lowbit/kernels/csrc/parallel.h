// Shared by lowbit's C++ kernels: a parallel-for on torch's own OpenMP thread pool.
//
// at::parallel_for is serial in a torch extension: ATen's OpenMP backend is header-only and
// extensions are built without -fopenmp (building with it would load a second OpenMP runtime
// beside the libgomp bundled with torch). par_for calls that bundled libgomp directly, so it uses
// the same threads torch.set_num_threads controls. The symbols are weak: when they are absent
// the loop runs serially.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
int omp_get_num_threads() __attribute__((weak));
}

namespace lowbit {

// f(b, e) over [begin, end) split into at most get_num_threads() contiguous chunks of >= grain.
template <typename F>
void par_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (nt <= 1 || !GOMP_parallel || !omp_get_thread_num || !omp_get_num_threads || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  struct Ctx {
    const F* f;
    int64_t begin, end;
  } ctx{&f, begin, end};
  GOMP_parallel(
      [](void* p) {
        // chunks from the team's actual size: the runtime may give fewer threads than asked for
        const Ctx* c = static_cast<const Ctx*>(p);
        const int64_t team = omp_get_num_threads(), chunk = (c->end - c->begin + team - 1) / team;
        const int64_t b = c->begin + int64_t(omp_get_thread_num()) * chunk;
        if (b < c->end) (*c->f)(b, std::min(c->end, b + chunk));
      },
      &ctx, unsigned(nt), 0);
}

}  // namespace lowbit
