// Int8 weight-only matmul for small M (decode), AVX2 + FMA + F16C build (no AVX-512): the same entry
// point, checks and error messages as int8_gemv.cpp, chosen at run time by lowbit/kernels/_ext.py.
//   out[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * w[n, k]
//
// One register tile for every M: R weight rows x MM rows of x (MM <= 4), one 8-lane float32
// accumulator per (row, x row); R = 4 at M <= 3 (LOWBIT_INT8_M1_ROWS at M = 1: 4 measured ahead of 8,
// 1 thread on a loaded host), 3 at M >= 4, so that the R x MM accumulators and the converted weights
// fit the 16 registers. Per 8 columns each weight row is loaded once and converted exactly (int8 ->
// int32 -> float32: vpmovsxbd + vcvtdq2ps), then FMA'd against each of the MM rows of x (float32, in
// L1). M > 4 runs the tile once per 4 rows of x while the R weight rows stay in L1: the weight is read
// from memory once per call whatever M is.
//
// Summation order (the same for every tile shape, every M and every thread count, so a row of a
// result at M > 1 equals, bit for bit, the result for that row of x alone at M = 1):
//   1. lane j of the accumulator sums the products x[m, k] * float(w[n, k]) for k = j, j + 8, ...
//      of one group, in order of k, by FMA (each product exact in float32 before its one rounding
//      in the FMA);
//   2. at the end of group g the 8 lanes are scaled and added to a running 8-lane total:
//      tot = fma(acc, s[n, g], tot), groups in order;
//   3. the 8 lanes of tot are summed by a fixed tree ((0+4, 1+5, 2+6, 3+7), then pairs), and the sum
//      is rounded once to x's dtype.
// The AVX-512 build sums the same products in another order.
//
// Fixed costs per call (SmolLM2-135M's decode layers are 108-864 KiB each): x is widened to float32
// into a thread-local buffer kept between calls (no tensor; an x over kKeepFloats uses a buffer freed
// on return), the result is written in x's dtype directly (no float32 tensor, no second pass), a
// broadcast scale is read through its strides (no copy), and a weight under kSerialBytes runs on the
// calling thread, skipping the OpenMP team's fork/join. kSerialBytes = 64 KiB, measured: SmolLM2's 420
// decode linears with cold weights (benchmarks/decode_linears.py shapes, kernel called directly, 2 threads,
// 21 interleaved rounds, quiet host) took 19.86 ms at 512 KiB, 17.74 at 128 KiB, 17.24 at 64 KiB, 17.20 at
// 0; 1 thread unchanged (22.3-23.6 ms). Below 64 KiB (no SmolLM2 layer) the fork/join is not amortized.
#include "int8_gemv_entry.h"

#ifndef LOWBIT_INT8_M1_ROWS
#define LOWBIT_INT8_M1_ROWS 4
#endif

namespace {

inline __m256 load_i8_as_f32(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int8_gemv_entry.h's tile at this build's vector width.
template <int R, int MM, bool PF>
void tile(const Args& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, gs = a.gs;
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * K;
  const float* xr = a.x + m0 * K;
  alignas(32) float tot[R][MM][8] = {};
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 acc[R][MM];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
    const int64_t kend = (g + 1) * gs;
    for (int64_t k = g * gs; k < kend; k += 8) {
      if (PF && (k & 63) == 0)
        for (int r = 0; r < R; ++r) lowbit::prefetch_stream(wr[r] + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 wv = load_i8_as_f32(wr[r] + k);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + m * K + k), wv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(a.s[(n0 + r) * a.ss0 + g * a.ss1]);
      for (int m = 0; m < MM; ++m) _mm256_store_ps(tot[r][m], _mm256_fmadd_ps(acc[r][m], sv, _mm256_load_ps(tot[r][m])));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) store_out(a, (m0 + m) * a.N + n0 + r, hsum(_mm256_load_ps(tot[r][m])));
}

bool takes_bf16(const Args&) { return false; }  // no bf16 tiles in this build: x is always widened

void run_all(const Args& a) {
  if (a.M == 1) run<LOWBIT_INT8_M1_ROWS>(a);
  else if (a.M <= 3) run<4>(a);
  else run<3>(a);
}

}  // namespace
