// The AVX2 int4 float GEMV's inner loop at M = 1..4 in L1 (1 thread), by weight rows per tile and rows of x, with
// the production conversion, a magic-number one and none; KK = 1024 keeps 4 rows of float32 x in L1, 4096 does not.
// Build: g++ -O3 -mavx2 -mfma -DKK=1024 -o /tmp/int4mix int4_m4_mix_l1.cpp
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
alignas(64) uint8_t Q[4][4096];
alignas(64) float X[4][8192];
// VAR 0: production nib16<kIntZp> (and/sub/srli/sub/cvt/cvt); 1: magic or + subps; 2: no conversion (bitcast)
template <int VAR>
inline void nib(const uint8_t* p, __m256i zpv, __m256 zmf, __m256& ev, __m256& od) {
  const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  if (VAR == 0) {
    ev = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, _mm256_set1_epi32(0xF)), zpv));
    od = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), zpv));
  } else if (VAR == 1) {
    const __m256i mg = _mm256_set1_epi32(0x4B000000);
    ev = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(d, _mm256_set1_epi32(0xF)), mg)), zmf);
    od = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(d, 4), mg)), zmf);
  } else {
    ev = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(0xF)));
    od = _mm256_castsi256_ps(_mm256_srli_epi32(d, 4));
  }
}
template <int R, int MM, int VAR>
__attribute__((noinline)) float run(int K, int reps) {
  __m256 ae[R][MM], ao[R][MM];
  for (int r = 0; r < R; ++r) for (int m = 0; m < MM; ++m) ae[r][m] = ao[r][m] = _mm256_setzero_ps();
  const __m256i zpv = _mm256_set1_epi32(8);
  const __m256 zmf = _mm256_set1_ps(8388608.f + 8);
  for (int it = 0; it < reps; ++it) {
    for (int k = 0; k < K; k += 16) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256 ev, od;
        nib<VAR>(&Q[r][k / 2], zpv, zmf, ev, od);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) {
          ae[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(&X[m][k]), ev, ae[r][m]);
          ao[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(&X[m][k + 8]), od, ao[r][m]);
        }
      }
    }
  }
  float s = 0;
  for (int r = 0; r < R; ++r) for (int m = 0; m < MM; ++m) { alignas(32) float t[8]; _mm256_store_ps(t, _mm256_add_ps(ae[r][m], ao[r][m])); s += t[0]; }
  return s;
}
template <int R, int MM, int VAR> void bench(const char* name) {
  const int K = KK, reps = 20000 * 4096 / KK;
  run<R, MM, VAR>(K, 100);
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    auto a = std::chrono::steady_clock::now();
    volatile float s = run<R, MM, VAR>(K, reps);
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    if (sec < best) best = sec;
  }
  double bytes = double(R) * K / 2 * reps;
  printf("%-28s R=%d MM=%d  %.2f packed bytes/cycle @3.3GHz (%.2f cycles per 16 weights per row)\n", name, R, MM, bytes / best / 3.3e9,
         best * 3.3e9 / (K / 16.0 * reps * R));
}
int main() {
  memset(Q, 0x37, sizeof Q);
  for (int m = 0; m < 4; ++m) for (int k = 0; k < 8192; ++k) X[m][k] = 0.001f * k;
  bench<1, 4, 0>("production (cvt)");
  bench<1, 4, 1>("magic or+subps");
  bench<1, 4, 2>("no conversion");
  bench<2, 4, 0>("production (cvt)");
  bench<2, 4, 1>("magic or+subps");
  bench<1, 2, 0>("production (cvt)");
  bench<2, 2, 0>("production (cvt)");
  bench<2, 2, 1>("magic or+subps");
  bench<4, 1, 0>("production (cvt)");
  bench<4, 1, 1>("magic or+subps");
  bench<1, 1, 0>("production (cvt)");
}
