// Shared by the panel GEMMs (gemm_i8.h: int8 x int8, gemm_bf16.h: bf16 x a quantized weight made bf16
// per call): the 16 x 16 transpose of 32-bit words that packs 16 weight rows into k-groups, and the split
// of work into (panel, run of row tiles) items.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lowbit {

// 16 x 16 transpose of 32-bit words: r[i] lane j -> r[j] lane i (AVX-512 F only).
__attribute__((target("avx512f"))) inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // per group g of 4 rows: u[4g + e], 128-bit lane j = rows 4g..4g+3 of column 4j + e
  for (int g = 0; g < 4; ++g) {
    const __m512i* tg = t + 4 * g;
    u[4 * g + 0] = _mm512_unpacklo_epi64(tg[0], tg[2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(tg[0], tg[2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(tg[1], tg[3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(tg[1], tg[3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i a = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), b = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88), d = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_i32x4(a, c, 0x88);       // column e
    r[8 + e] = _mm512_shuffle_i32x4(a, c, 0xDD);   // column 8 + e
    r[4 + e] = _mm512_shuffle_i32x4(b, d, 0x88);   // column 4 + e
    r[12 + e] = _mm512_shuffle_i32x4(b, d, 0xDD);  // column 12 + e
  }
}

// Work is split into items (panel, run of m-tiles), given in equal contiguous shares to torch's threads.
// A panel split along M into s runs is packed s times, so s is the one of 1..8 with the least work on
// the busiest thread: ceil(panels * s / threads) items of tiles / s + pack tiles each (`pack`: a
// packing's cost in tiles). SmolLM2's 576-wide layers: 9 panels, s = 2 on 2 threads, where whole panels
// left one thread idle for 1/9 of the call.
inline int64_t m_splits(int64_t panels, int64_t tiles, double pack) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  int64_t splits = 1;
  double best = 0;
  for (int64_t s = 1; s <= std::min<int64_t>(8, tiles); ++s) {
    const double busiest = double((panels * s + nt - 1) / nt) * (double(tiles) / double(s) + pack);
    if (s == 1 || busiest < best * 0.98) best = busiest, splits = s;
  }
  return splits;
}

}  // namespace lowbit
