// Float32 register tiles for the AVX2 builds' small-M paths (M = 5..64): 4 weight rows already made
// float32 (a scratch the caller fills: int4 dequantized exactly, float8 converted exactly) against
// every row of x. Shared by int4_cpu_avx2.cpp (gemm_small_bf16) and fp8_cpu_avx2.cpp (the tiled path).
//
// Why: a 4 x 1 tile (4 weight rows, one row of x at a time) loads a weight vector for every FMA, and
// with K = 4096 the 4 rows (64 KiB of float32) sit in L2: the loads, not the FMAs, bound it (float8 at
// M = 16 ran at 0.46 of the float32 peak, int4's 2 x 4 tile at 0.64). Here a 4 x 3 register tile (12
// accumulators) takes 3 x loads and 4 weight loads per 12 FMAs, and K is walked in blocks of kKBlock
// floats so that the weight block (8 KiB) stays in L1 while every row of x passes over it.
//
// Summation order: lane j of (m, r) sums x[m, k] * w[r, k] for k = j, j + 8, ... in order of k by FMA
// (the lanes are parked in `acc` between K blocks, exactly), then the 8 lanes are summed by a fixed tree.
// It does not depend on M or on which tile a row of x falls in: a row's result is the same at any M.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lowbit::tile_f32 {

constexpr int kRows = 4;          // weight rows per call
constexpr int64_t kKBlock = 512;  // floats of K per block (4 weight rows: 8 KiB)

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB rows of x (x, row stride ldx) x the 4 weight rows (w, row stride ldw) over k in [k0, k1) (multiples of 8),
// continuing the lanes parked in acc[MB][4][8].
template <int MB>
inline void block(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t k0, int64_t k1, float* acc) {
  __m256 a[MB][kRows];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) a[m][r] = _mm256_loadu_ps(acc + (m * kRows + r) * 8);
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * ldw + k);
      for (int m = 0; m < MB; ++m) a[m][r] = _mm256_fmadd_ps(xv[m], wv, a[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) _mm256_storeu_ps(acc + (m * kRows + r) * 8, a[m][r]);
}

// res[m * 4 + r] = sum_{k < Kr} x[m, k] * w[r, k] for m < M (Kr a multiple of 8). acc: M * 4 * 8 floats of scratch.
inline void rows4(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t Kr, float* acc, float* res) {
  std::fill(acc, acc + M * kRows * 8, 0.f);
  for (int64_t k0 = 0; k0 < Kr; k0 += kKBlock) {
    const int64_t k1 = std::min(Kr, k0 + kKBlock);
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) block<3>(w, ldw, x + m * ldx, ldx, k0, k1, acc + m * kRows * 8);
    if (M - m == 2) block<2>(w, ldw, x + m * ldx, ldx, k0, k1, acc + m * kRows * 8);
    else if (M - m == 1) block<1>(w, ldw, x + m * ldx, ldx, k0, k1, acc + m * kRows * 8);
  }
  for (int64_t i = 0; i < M * kRows; ++i) res[i] = hsum8(_mm256_loadu_ps(acc + i * 8));
}

}  // namespace lowbit::tile_f32
