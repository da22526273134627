#include <immintrin.h>
#include <chrono>
#include <cstdio>
template <class F> double bench(F f) {
  __m512i a[8]; for (int i = 0; i < 8; ++i) a[i] = _mm512_set1_epi32(i * 7 + 1);
  __m512i t = _mm512_set1_epi16(3), u = _mm512_set1_epi16(5);
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 10000000; ++it) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) { a[i] = f(a[i], t, u); __asm__ volatile("" : "+v"(a[i])); }
    }
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / 8e7;
    if (ns < best) best = ns;
  }
  return best;
}
int main() {
  printf("ternlog %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_ternarylogic_epi32(a, t, u, 0x6A); }));
  printf("vpermw  %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_permutexvar_epi16(a, t); }));
  printf("vpermt2w %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_permutex2var_epi16(t, a, u); }));
  printf("vpermb  %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_permutexvar_epi8(a, t); }));
  printf("vpshufb %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_shuffle_epi8(t, a); }));
  printf("srliw   %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_srli_epi16(a, 4); }));
  printf("vpmultishiftqb %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return _mm512_multishift_epi64_epi8(t, a); }));
  printf("dpbf16 %.3f ns/op\n", bench([](__m512i a, __m512i t, __m512i u) { return (__m512i)_mm512_dpbf16_ps((__m512)a, (__m512bh)t, (__m512bh)u); }));
}
