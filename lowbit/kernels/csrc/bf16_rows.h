// bf16_rows: the scratch tiles shared by int8 weight-only's GEMV (int8_gemv.cpp, stile: one scale per row, M >= 9)
// and int4's gemm_rows_bf16 (int4_cpu.cpp): MT rows of bf16 x against 4 rows of bf16 weights converted once into a
// scratch, both with row stride K (K % 32 == 0). One vdpbf16ps accumulator per (row of x, weight row) over all of
// K: lane l adds the k-pairs 32 i + 2 l, 32 i + 2 l + 1 in order of i. The callers reduce and scale.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lowbit::bf16_rows {

constexpr int kW = 4;  // weight rows per tile

template <int MT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void sums(
    const uint16_t* w, const uint16_t* x, int64_t K, __m512 (&acc)[MT][kW]) {
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kW; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[kW];
#pragma GCC unroll 4
    for (int r = 0; r < kW; ++r) wv[r] = _mm512_loadu_si512(w + r * K + k);
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < kW; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
}

}  // namespace lowbit::bf16_rows
