// Int8 weight-only matmul for small M (decode), AVX-512 F/BW build (the AVX2 + FMA + F16C one is
// int8_gemv_avx2.cpp; lowbit/kernels/_ext.py picks one at run time). Entry point, checks and the
// widening of x: int8_gemv_entry.h, shared by both builds.
//   out[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * w[n, k]
//
// The AVX2 build's register tiles at 16 lanes: R weight rows x MM rows of x (MM <= 4), one 16-lane
// float32 accumulator and one 16-lane running total per (row, x row), both in registers (32 zmm):
// R = 4 at M <= 3, 3 at M >= 4. Per 16 columns each weight row is loaded once and converted exactly
// (vpmovsxbd + vcvtdq2ps), then FMA'd against each of the MM rows of x (float32, in L1). M > 4 runs
// the tile once per 4 rows of x while the R weight rows stay in L1: the weight is read from memory
// once per call whatever M is (the first version of this build made a pass over the weight per row
// of x, so M > 1 went to torch's _weight_int8pack_mm: 0.40 of DRAM at M = 4 on an AVX-512 Zen 4).
//
// Summation order (the same for every tile shape, every M and every thread count, so a row of a
// result at M > 1 equals, bit for bit, the result for that row of x alone at M = 1):
//   1. lane j of the accumulator sums x[m, k] * float(w[n, k]) for k = j, j + 16, ... of one group, in
//      order of k, by FMA;
//   2. at the end of group g: tot = fma(acc, s[n, g], tot), groups in order;
//   3. the 16 lanes of tot are summed by _mm512_reduce_add_ps (a fixed tree), rounded once to x's dtype.
// The AVX2 build sums the same products in another order (8 lanes).
#include "int8_gemv_entry.h"

namespace {

inline __m512 load_i8_as_f32(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// int8_gemv_entry.h's tile at this build's vector width.
template <int R, int MM, bool PF>
void tile(const Args& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, gs = a.gs;
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * K;
  const float* xr = a.x + m0 * K;
  __m512 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[R][MM];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t kend = (g + 1) * gs;
    for (int64_t k = g * gs; k < kend; k += 16) {
      if (PF && (k & 63) == 0)
        for (int r = 0; r < R; ++r) lowbit::prefetch_stream(wr[r] + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 wv = load_i8_as_f32(wr[r] + k);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + k), wv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(a.s[(n0 + r) * a.ss0 + g * a.ss1]);
      for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) store_out(a, (m0 + m) * a.N + n0 + r, _mm512_reduce_add_ps(tot[r][m]));
}

void run_all(const Args& a) {
  if (a.M <= 3) run<4>(a);
  else run<3>(a);
}

}  // namespace
