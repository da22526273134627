// Shared by the AVX-512 kernels that multiply bf16 x with vdpbf16ps (fp8_cpu.cpp, int4_cpu.cpp):
// vdpbf16ps ignores MXCSR and always reads bf16 subnormal inputs as zero and flushes subnormal
// products and partial sums. Callers scale each row of their bf16 copy of x by an exact power of two
// 2^j first (scale_rows_bf16), so that a row of subnormal or tiny values becomes normal, and multiply
// the row's results by post = 2^-j (in double, one rounding to float32). j = 0 (post = 1) leaves the
// row and its results bit for bit as they were; for j > 0 every float32 step is the unscaled one times
// 2^j, exactly, as long as nothing overflows (the caller's `top` keeps the sums in range).
// Needs AVX-512 F/BW + BF16: include only from the AVX-512 builds.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mxcsr.h"

namespace lowbit {

// Bits of the largest finite |value| among the bf16 values row[0 .. K) (0 when there is none).
inline int max_finite_bits(const uint16_t* row, int64_t K) {
  const __m512i mag = _mm512_set1_epi16(0x7FFF), inf = _mm512_set1_epi16(0x7F80);
  __m512i vmax = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi16(mask, row + k), mag);
    vmax = _mm512_mask_max_epu16(vmax, _mm512_cmplt_epu16_mask(a, inf), vmax, a);  // finite only
  }
  alignas(64) uint16_t lanes[32];
  _mm512_store_si512(lanes, vmax);
  return *std::max_element(lanes, lanes + 32);
}

// Scales rows of bf16 values (M rows of Kp elements, Kp % 32 == 0, row stride ld) in place by 2^j,
// j = top - ilogb(max finite |x| of the row), clamped to [0, 127] (0 for a row without a finite nonzero
// value); post[m] = 2^-j. The row's largest value becomes 2^top .. 2^(top + 1) (unless clamped), a
// subnormal one included. Exact: a bf16 value times 2^j is a bf16 value, except elements still
// subnormal after scaling (far below the row's maximum), which vcvtne2ps2bf16 flushes as vdpbf16ps
// would have; infinities and NaNs stay as they are.
inline void scale_rows_bf16(uint16_t* x, int64_t M, int64_t Kp, int64_t ld, int top, double* post) {
  NoDenormalsAreZero daz_off;
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* row = x + m * ld;
    const int amax = max_finite_bits(row, Kp);  // bits of the largest finite |x|
    int e = 0;
    if (amax >> 7) e = (amax >> 7) - 127;                                        // normal
    else if (amax) e = (31 - __builtin_clz(static_cast<unsigned>(amax))) - 133;  // subnormal: m 2^-133
    const int j = amax ? std::max(0, std::min(127, top - e)) : 0;
    post[m] = std::ldexp(1.0, -j);
    if (j == 0) continue;
    const __m512 p2j = _mm512_set1_ps(std::ldexp(1.f, j));
    for (int64_t k = 0; k < Kp; k += 32) {
      const __m512i v = _mm512_loadu_si512(row + k);
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
      // exact products (or inf / NaN as they were); vcvtne2ps2bf16: b's elements first
      const __m512bh r = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, p2j), _mm512_mul_ps(lo, p2j));
      _mm512_storeu_si512(row + k, (__m512i)r);
    }
  }
}

// v * post in double, rounded once to float32: v for post = 1, and with post = 2^-j the unscaled
// value, a subnormal one included (2^-j itself may be a float32 subnormal: kept in double).
inline float unscale(float v, double post) { return static_cast<float>(static_cast<double>(v) * post); }

}  // namespace lowbit
