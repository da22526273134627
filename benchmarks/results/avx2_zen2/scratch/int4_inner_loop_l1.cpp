// The AVX2 int4 GEMV's inner loop (M = 1, group 128, int8 zero point) with its weight in L1 / L2, so only the
// instructions bind: bytes of packed int4 per cycle (3.25 GHz, see zen2_port_throughput.cpp) for
//   cur<R>:     the production loop of csrc/int4_cpu_avx2.cpp (vpmovzxbd, and / srl, sub, 2 x vcvtdq2ps, 2 FMAs
//               per 16 weights), R weight rows per pass;
//   dw<R, NA>:  benchmarks/int4_avx2_variants.py's "dword" idea, no widening: per 8 weights AND, OR (a float
//               2^E + q), SUB (2^E + zp), FMA, NA accumulators;
//   dw2<R, NA>: the same with two nibble positions per shift (fewer mask / exponent registers).
// Every variant computes the same exact products (q - zp) * x in float32.
// build and run: g++ -O3 -mavx2 -mfma -mf16c -o /tmp/ub int4_inner_loop_l1.cpp && /tmp/ub
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cstdlib>
// L1/L2-resident microbench: R rows of K int4 (canonical packing), group 128, int zp; x permuted per variant.
constexpr int K = 4096, G = K / 128;
alignas(64) uint8_t W[8][K / 2];
alignas(64) float X[K];
alignas(64) float S[8][G];
alignas(64) int8_t Z[8][G];
volatile float sink;
static inline float hsum(__m256 v) { __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); a = _mm_hadd_ps(a, a); a = _mm_hadd_ps(a, a); return _mm_cvtss_f32(a); }

template <int R> __attribute__((noinline)) void cur(float* out) {  // production style
  __m256 tot[R]; for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m256 ae[R], ao[R]; __m256i zpv[R];
    for (int r = 0; r < R; ++r) { ae[r] = ao[r] = _mm256_setzero_ps(); zpv[r] = _mm256_set1_epi32(Z[r][g]); }
    for (int k = g * 128; k < g * 128 + 128; k += 16) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(W[r] + k / 2)));
        __m256 ev = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, _mm256_set1_epi32(15)), zpv[r]));
        __m256 od = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), zpv[r]));
        ae[r] = _mm256_fmadd_ps(_mm256_loadu_ps(X + k), ev, ae[r]);
        ao[r] = _mm256_fmadd_ps(_mm256_loadu_ps(X + k + 8), od, ao[r]);
      }
    }
    for (int r = 0; r < R; ++r) tot[r] = _mm256_fmadd_ps(_mm256_add_ps(ae[r], ao[r]), _mm256_set1_ps(S[r][g]), tot[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(tot[r]);
}

// dword: per 64 elements, d = 8 dwords; j<4 from d, j>=4 from d>>16; per j: and(mask_j) | or(exp_j) -> sub c_j -> fma
template <int R, int NA> __attribute__((noinline)) void dw(float* out) {
  const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0), m2 = _mm256_set1_epi32(0xF00), m3 = _mm256_set1_epi32(0xF000);
  const __m256i o0 = _mm256_set1_epi32(0x4B000000), o1 = _mm256_set1_epi32(0x49000000), o2 = _mm256_set1_epi32(0x47000000), o3 = _mm256_set1_epi32(0x45000000);
  __m256 tot[R]; for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m256 a[R][NA]; __m256 c[R][4];
    for (int r = 0; r < R; ++r) { for (int i = 0; i < NA; ++i) a[r][i] = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) c[r][j] = _mm256_set1_ps(float(1 << (23 - 4 * j)) + Z[r][g]); }
    for (int k = g * 128; k < g * 128 + 128; k += 64) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_load_si256((const __m256i*)(W[r] + k / 2));
        const __m256i h = _mm256_srli_epi32(d, 16);
        const __m256i ms[4] = {m0, m1, m2, m3}, os[4] = {o0, o1, o2, o3};
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(j < 4 ? d : h, ms[j & 3]), os[j & 3])), c[r][j & 3]);
          a[r][j % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(X + k + 8 * j), f, a[r][j % NA]);
        }
      }
    }
    for (int r = 0; r < R; ++r) { __m256 t = a[r][0]; for (int i = 1; i < NA; ++i) t = _mm256_add_ps(t, a[r][i]);
      tot[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(S[r][g]), tot[r]); }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(tot[r]);
}
// dword with 2 positions per shift: d, d>>8, d>>16, d>>24; masks 0xF/0xF0 only
template <int R, int NA> __attribute__((noinline)) void dw2(float* out) {
  const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0);
  const __m256i o0 = _mm256_set1_epi32(0x4B000000), o1 = _mm256_set1_epi32(0x49000000);
  __m256 tot[R]; for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m256 a[R][NA]; __m256 c[R][2];
    for (int r = 0; r < R; ++r) { for (int i = 0; i < NA; ++i) a[r][i] = _mm256_setzero_ps();
      c[r][0] = _mm256_set1_ps(float(1 << 23) + Z[r][g]); c[r][1] = _mm256_set1_ps(float(1 << 19) + Z[r][g]); }
    for (int k = g * 128; k < g * 128 + 128; k += 64) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_load_si256((const __m256i*)(W[r] + k / 2));
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m256i u = s == 0 ? d : _mm256_srli_epi32(d, 8 * s);
          __m256 f0 = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(u, m0), o0)), c[r][0]);
          __m256 f1 = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(u, m1), o1)), c[r][1]);
          a[r][(2 * s) % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(X + k + 16 * s), f0, a[r][(2 * s) % NA]);
          a[r][(2 * s + 1) % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(X + k + 16 * s + 8), f1, a[r][(2 * s + 1) % NA]);
        }
      }
    }
    for (int r = 0; r < R; ++r) { __m256 t = a[r][0]; for (int i = 1; i < NA; ++i) t = _mm256_add_ps(t, a[r][i]);
      tot[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(S[r][g]), tot[r]); }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(tot[r]);
}
template <class F> void bench(const char* name, int R, F f) {
  float out[8]; long it = 200000 / R; 
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < it; ++i) { f(out); sink = out[0]; }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  double bytes = double(it) * R * K / 2;
  printf("%-14s %.2f GB/s  %.2f B/cycle@3.25\n", name, bytes / best / 1e9, bytes / best / 3.25e9);
}
int main() {
  srand(1); for (int r = 0; r < 8; ++r) { for (int i = 0; i < K / 2; ++i) W[r][i] = rand(); for (int g = 0; g < G; ++g) { S[r][g] = 0.01f; Z[r][g] = rand() % 16 - 8; } }
  for (int i = 0; i < K; ++i) X[i] = (rand() % 1000) / 1000.f;
  bench("cur R4", 4, cur<4>); bench("cur R2", 2, cur<2>); bench("cur R1", 1, cur<1>);
  bench("dw R1 NA4", 1, dw<1, 4>); bench("dw R1 NA8", 1, dw<1, 8>); bench("dw R2 NA2", 2, dw<2, 2>); bench("dw R2 NA4", 2, dw<2, 4>); bench("dw R4 NA2", 4, dw<4, 2>);
  bench("dw2 R1 NA4", 1, dw2<1, 4>); bench("dw2 R2 NA2", 2, dw2<2, 2>); bench("dw2 R2 NA4", 2, dw2<2, 4>); bench("dw2 R4 NA2", 4, dw2<4, 2>);
}
