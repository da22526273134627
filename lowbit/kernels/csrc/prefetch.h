// The weight stream's software prefetch, shared by the GEMVs: which cache level a line is fetched
// into and how far ahead of the loads, set at run time (lowbit/kernels/prefetch.py measures the
// choice once per CPU). Only where the bytes go changes, never a value.
//
// Why a setting: on the AVX-512 Intel host the kernels were first tuned on, a non-temporal prefetch
// 32 KiB ahead took the int8 GEMV from 26 to 33-40 GB/s; on an AMD Zen 4 (EPYC, 2.6 GHz) the same
// prefetch left it at 10.7 GB/s on one core against a 28 GB/s read probe, while prefetching into L2
// (T1) 64 KiB ahead reached 24 GB/s (the L1 fill buffers NTA/T0 use cap the misses in flight).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>

namespace lowbit {

enum PrefetchHint : int { kNta = 0, kT0 = 1, kT1 = 2 };

struct Prefetch {
  int hint = kNta;
  int64_t distance = 32768;  // bytes ahead in the stream
};

// One setting per extension module: internal linkage (a function-local static of a plain inline function is one
// object for the whole process, merged across the modules by the dynamic linker, and the int4 GEMV's setting
// differs from the int8 GEMV's: lowbit/kernels/prefetch.py).
namespace {
Prefetch& prefetch_setting() {
  static Prefetch p;
  return p;
}
}  // namespace

// Prefetch the stream's byte `distance` ahead of `at`.
inline void prefetch_stream(const void* at) {
  const Prefetch& p = prefetch_setting();
  const char* a = static_cast<const char*>(at) + p.distance;
  if (p.hint == kT1)
    _mm_prefetch(a, _MM_HINT_T1);
  else if (p.hint == kT0)
    _mm_prefetch(a, _MM_HINT_T0);
  else
    _mm_prefetch(a, _MM_HINT_NTA);
}

// Rows that lie one after another in memory and are read in lockstep (a GEMV's tile of R rows): the loads walk R
// streams rb bytes apart, but the rows are one region. Prefetching that region in address order, the line at `pos`
// once the tile has consumed `pos` bytes of it (`bytes` more in this step, all rows together), asks the DRAM for one
// sequential stream: the same lines as a prefetch per row, in another order. Measured, not assumed (Zen 2, 2 threads,
// 8 x 4096^2, beside two copies of the old build: benchmarks/results/avx2_zen2/scratch/gemv_region_prefetch_ab.py):
// the AVX2 int4 GEMV (tiles of 4 rows of 2 KiB at M = 1, 2 rows at M = 2) ran 6% faster at M = 1 and 8-9% at M = 2,
// while the fp8 and int8 weight-only GEMVs (rows of 4 KiB) ran 21-26% slower at M = 1 at every distance tried: they
// keep a prefetch per row.
inline void prefetch_region(const void* base, int64_t pos, int64_t bytes) {
  const char* b = static_cast<const char*>(base);
  for (int64_t l = (pos + 63) & ~int64_t(63); l < pos + bytes; l += 64) prefetch_stream(b + l);
}

inline void set_prefetch(int64_t hint, int64_t distance) {
  TORCH_CHECK(hint == kNta || hint == kT0 || hint == kT1, "prefetch hint must be 0 (nta), 1 (t0) or 2 (t1), got ", hint);
  TORCH_CHECK(distance >= 0 && distance <= (int64_t{1} << 20) && distance % 64 == 0,
              "prefetch distance must be a multiple of 64 bytes in [0, 1 MiB], got ", distance);
  prefetch_setting() = Prefetch{static_cast<int>(hint), distance};
}

inline std::tuple<int64_t, int64_t> get_prefetch() {
  return {prefetch_setting().hint, prefetch_setting().distance};
}

}  // namespace lowbit
