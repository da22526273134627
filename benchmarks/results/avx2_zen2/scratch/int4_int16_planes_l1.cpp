// Inner loops of the AVX2 int4 GEMV in L1 (1 thread): nibbles times bf16 x held as one or two int16 planes by
// vpmaddwd, M = 1, R weight rows per tile. Build and run: g++ -O3 -mavx2 -mfma -o /tmp/i16 int4_int16_planes_l1.cpp && /tmp/i16
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
// int4 x int16 fixed-point x via vpmaddwd, M=1, R rows, weights and x in L1, 1 thread.
// SPLIT=1: x as one int16 plane; SPLIT=2: x as hi + lo int16 planes (exact for a 2^22 range).
alignas(64) uint8_t Q[8][2048];   // 4096 nibbles per row
alignas(64) int16_t X[2][4096];
template <int R, int SPLIT>
__attribute__((noinline)) int run(int K, int reps) {
  __m256i acc[R][SPLIT];
  for (int r = 0; r < R; ++r) for (int s = 0; s < SPLIT; ++s) acc[r][s] = _mm256_setzero_si256();
  const __m256i lo4 = _mm256_set1_epi16(0x0F), zp = _mm256_set1_epi16(8);
  for (int it = 0; it < reps; ++it) {
    for (int k = 0; k < K; k += 32) {  // 32 weights = 16 bytes per row
      __m256i xe[SPLIT], xo[SPLIT];
      for (int s = 0; s < SPLIT; ++s) {
        xe[s] = _mm256_load_si256((const __m256i*)&X[s][k]);
        xo[s] = _mm256_load_si256((const __m256i*)&X[s][k + 16]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i*)&Q[r][k / 2]));
        const __m256i e = _mm256_sub_epi16(_mm256_and_si256(d, lo4), zp);
        const __m256i o = _mm256_sub_epi16(_mm256_srli_epi16(d, 4), zp);
        for (int s = 0; s < SPLIT; ++s) {
          acc[r][s] = _mm256_add_epi32(acc[r][s], _mm256_madd_epi16(e, xe[s]));
          acc[r][s] = _mm256_add_epi32(acc[r][s], _mm256_madd_epi16(o, xo[s]));
        }
      }
    }
  }
  int s = 0;
  for (int r = 0; r < R; ++r) for (int t = 0; t < SPLIT; ++t) s += _mm256_extract_epi32(acc[r][t], 0);
  return s;
}
template <int R, int SPLIT> void bench() {
  const int K = 4096, reps = 20000;
  run<R, SPLIT>(K, 100);
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    auto a = std::chrono::steady_clock::now();
    volatile int s = run<R, SPLIT>(K, reps);
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    if (sec < best) best = sec;
  }
  double bytes = double(R) * K / 2 * reps;
  printf("int16 x, %d plane(s), R=%d: %.2f packed bytes/cycle @3.3GHz\n", SPLIT, R, bytes / best / 3.3e9);
}
int main() {
  memset(Q, 0x37, sizeof Q);
  for (int k = 0; k < 4096; ++k) { X[0][k] = k % 1000; X[1][k] = k % 77; }
  bench<4, 1>(); bench<2, 1>(); bench<6, 1>(); bench<4, 2>(); bench<2, 2>(); bench<3, 2>();
}
