// Why int8 weight-only at M = 4 stays near 2.5 bytes a cycle (1 thread, weights and x in L1): the production tile
// (3 weight rows x 4 rows of x, vpmovsxbd + vcvtdq2ps + 12 FMAs per 8 columns) against the same loop without the
// conversion, with float weights, and with a magic-number conversion. Build: g++ -O3 -mavx2 -mfma -o /tmp/mix int8_m4_mix_l1.cpp
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
// Inner loops of an int8 weight x float32 x GEMV at M=4, weights and x in L1, 1 thread.
alignas(64) int8_t W[8][2048];
alignas(64) float X[4][2048];
template <int R, int MM, int VAR>
__attribute__((noinline)) float run(int K, int reps) {
  __m256 acc[R][MM];
  for (int r = 0; r < R; ++r) for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int it = 0; it < reps; ++it) {
    for (int k = 0; k < K; k += 8) {
      __m256 xv[MM];
      for (int m = 0; m < MM; ++m) xv[m] = _mm256_loadu_ps(&X[m][k]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m256 wv;
        if (VAR == 0) wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)&W[r][k])));
        else if (VAR == 1) wv = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)&W[r][k])));  // no cvt
        else if (VAR == 2) wv = _mm256_loadu_ps((const float*)&W[r][k * 4 % 2048]);  // float weights, no conversion
        else {  // magic: bytes pre-biased u = w + 128 -> float 2^23 + u via or, then sub
          __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)&W[r][k]));
          wv = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(u, _mm256_set1_epi32(0x4B000000))), _mm256_set1_ps(8388736.f));
        }
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_fmadd_ps(xv[m], wv, acc[r][m]);
      }
    }
  }
  float s = 0;
  for (int r = 0; r < R; ++r) for (int m = 0; m < MM; ++m) { alignas(32) float t[8]; _mm256_store_ps(t, acc[r][m]); s += t[0]; }
  return s;
}
template <int R, int MM, int VAR> void bench(const char* name) {
  const int K = 2048, reps = 20000;
  run<R, MM, VAR>(K, 100);
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    auto a = std::chrono::steady_clock::now();
    volatile float s = run<R, MM, VAR>(K, reps);
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    if (sec < best) best = sec;
  }
  double bytes = double(R) * K * reps;
  printf("%-34s R=%d MM=%d  %.2f weight bytes/cycle @3.3GHz (%.2f cycles per 8 k per tile)\n", name, R, MM, bytes / best / 3.3e9,
         best * 3.3e9 / (K / 8.0 * reps));
}
int main() {
  memset(W, 3, sizeof W);
  for (int m = 0; m < 4; ++m) for (int k = 0; k < 2048; ++k) X[m][k] = 0.001f * k;
  bench<3, 4, 0>("pmovsx+cvt (production)");
  bench<3, 4, 1>("pmovsx only (no cvt)");
  bench<3, 4, 2>("float weights (no conversion)");
  bench<3, 4, 3>("pmovzx+or+sub (pre-biased bytes)");
  bench<2, 4, 0>("pmovsx+cvt");
  bench<2, 4, 3>("pmovzx+or+sub");
  bench<4, 2, 0>("pmovsx+cvt");
  bench<4, 2, 3>("pmovzx+or+sub");
  bench<6, 2, 0>("pmovsx+cvt");
  bench<6, 2, 3>("pmovzx+or+sub");
  bench<4, 1, 0>("pmovsx+cvt");
  bench<4, 1, 3>("pmovzx+or+sub");
}
