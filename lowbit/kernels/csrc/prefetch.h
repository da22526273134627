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
