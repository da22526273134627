// Inner loops of the AVX2 int4 GEMV at M = 1 in L1 (1 thread), R weight rows per tile, 64 weights (32 packed
// bytes) a step: the production loop (x as two int16 planes, 8 vpmaddwd a step) against x's lo plane as int8
// multiplied by vpmaddubsw into int16 sums (4 vpmaddwd + 2 vpmaddubsw a step), and against x as three int8
// planes (6 vpmaddubsw). Build and run: g++ -O3 -mavx2 -mfma -o /tmp/i8lo int4_int8_lo_plane_l1.cpp && /tmp/i8lo
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
alignas(64) uint8_t Q[8][2048];  // 4096 nibbles per row
alignas(64) int16_t XH[4096], XL16[4096];
alignas(64) int8_t XL8[4096], XP[3][4096];
static int sink;
// production: 16 packed bytes -> int16 via vpmovzxbw, two int16 planes
template <int R> __attribute__((noinline)) void prod(int K, int reps) {
  __m256i ah[R], al[R];
  for (int r = 0; r < R; ++r) ah[r] = al[r] = _mm256_setzero_si256();
  const __m256i m4 = _mm256_set1_epi16(0x0F);
  for (int it = 0; it < reps; ++it)
    for (int k = 0; k < K; k += 32) {
      const __m256i he = _mm256_load_si256((const __m256i*)&XH[k]), ho = _mm256_load_si256((const __m256i*)&XH[k + 16]);
      const __m256i le = _mm256_load_si256((const __m256i*)&XL16[k]), lo = _mm256_load_si256((const __m256i*)&XL16[k + 16]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i*)&Q[r][k / 2]));
        const __m256i ev = _mm256_and_si256(d, m4), od = _mm256_srli_epi16(d, 4);
        ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(_mm256_madd_epi16(ev, he), _mm256_madd_epi16(od, ho)));
        al[r] = _mm256_add_epi32(al[r], _mm256_add_epi32(_mm256_madd_epi16(ev, le), _mm256_madd_epi16(od, lo)));
      }
    }
  int s = 0;
  for (int r = 0; r < R; ++r) s += _mm256_extract_epi32(ah[r], 0) + _mm256_extract_epi32(al[r], 1);
  sink += s;
}
// hi int16 (vpmaddwd on nibbles made int16 by shifts within 16-bit words) + lo int8 (vpmaddubsw, int16 sums
// widened once per BLK elements)
template <int R, int BLK> __attribute__((noinline)) void hilo8(int K, int reps) {
  __m256i ah[R], al[R];
  for (int r = 0; r < R; ++r) ah[r] = al[r] = _mm256_setzero_si256();
  const __m256i m16 = _mm256_set1_epi16(0x000F), m8 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int it = 0; it < reps; ++it)
    for (int k0 = 0; k0 < K; k0 += BLK) {
      __m256i a16[R];
      for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
      for (int k = k0; k < k0 + BLK; k += 64) {
        const __m256i* h = (const __m256i*)&XH[k];
        const __m256i h0 = _mm256_load_si256(h), h1 = _mm256_load_si256(h + 1), h2 = _mm256_load_si256(h + 2),
                      h3 = _mm256_load_si256(h + 3);
        const __m256i l0 = _mm256_load_si256((const __m256i*)&XL8[k]), l1 = _mm256_load_si256((const __m256i*)&XL8[k + 32]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_load_si256((const __m256i*)&Q[r][k / 2]);
          const __m256i s4 = _mm256_srli_epi16(d, 4), s8 = _mm256_srli_epi16(d, 8), s12 = _mm256_srli_epi16(d, 12);
          const __m256i w0 = _mm256_and_si256(d, m16), w1 = _mm256_and_si256(s4, m16), w2 = _mm256_and_si256(s8, m16);
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, h0), _mm256_madd_epi16(w1, h1));
          const __m256i q = _mm256_add_epi32(_mm256_madd_epi16(w2, h2), _mm256_madd_epi16(s12, h3));
          ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(p, q));
          const __m256i b0 = _mm256_and_si256(d, m8), b1 = _mm256_and_si256(s4, m8);
          a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(b0, l0), _mm256_maddubs_epi16(b1, l1)));
        }
      }
      for (int r = 0; r < R; ++r) al[r] = _mm256_add_epi32(al[r], _mm256_madd_epi16(a16[r], ones));
    }
  int s = 0;
  for (int r = 0; r < R; ++r) s += _mm256_extract_epi32(ah[r], 0) + _mm256_extract_epi32(al[r], 1);
  sink += s;
}
// three int8 planes, all by vpmaddubsw into int16 sums widened once per BLK elements
template <int R, int BLK, int P> __attribute__((noinline)) void planes8(int K, int reps) {
  __m256i a[R][P];
  for (int r = 0; r < R; ++r) for (int p = 0; p < P; ++p) a[r][p] = _mm256_setzero_si256();
  const __m256i m8 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int it = 0; it < reps; ++it)
    for (int k0 = 0; k0 < K; k0 += BLK) {
      __m256i a16[R][P];
      for (int r = 0; r < R; ++r) for (int p = 0; p < P; ++p) a16[r][p] = _mm256_setzero_si256();
      for (int k = k0; k < k0 + BLK; k += 64) {
        __m256i x0[P], x1[P];
        for (int p = 0; p < P; ++p) {
          x0[p] = _mm256_load_si256((const __m256i*)&XP[p][k]);
          x1[p] = _mm256_load_si256((const __m256i*)&XP[p][k + 32]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_load_si256((const __m256i*)&Q[r][k / 2]);
          const __m256i b0 = _mm256_and_si256(d, m8), b1 = _mm256_and_si256(_mm256_srli_epi16(d, 4), m8);
          for (int p = 0; p < P; ++p)
            a16[r][p] = _mm256_add_epi16(a16[r][p], _mm256_add_epi16(_mm256_maddubs_epi16(b0, x0[p]), _mm256_maddubs_epi16(b1, x1[p])));
        }
      }
      for (int r = 0; r < R; ++r) for (int p = 0; p < P; ++p) a[r][p] = _mm256_add_epi32(a[r][p], _mm256_madd_epi16(a16[r][p], ones));
    }
  int s = 0;
  for (int r = 0; r < R; ++r) for (int p = 0; p < P; ++p) s += _mm256_extract_epi32(a[r][p], p);
  sink += s;
}

// hilo8 with the production kernel's per-block epilogue (lanes to float32, the zero point's share by FMA, the
// group's scale, a float32 total per row) and optionally its weight prefetch (PF) every 128 elements
alignas(64) float SHF[4096 / 64 * 8], SLF[4096 / 64 * 8], SC[8][64];
template <int R, int BLK, bool PF> __attribute__((noinline)) void hilo8_epi(int K, int reps) {
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  const __m256i m16 = _mm256_set1_epi16(0x000F), m8 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256 inv = _mm256_set1_ps(1.f / 128);
  for (int it = 0; it < reps; ++it)
    for (int k0 = 0, j = 0; k0 < K; k0 += BLK, ++j) {
      __m256i ah[R], a16[R];
      for (int r = 0; r < R; ++r) ah[r] = a16[r] = _mm256_setzero_si256();
      for (int k = k0; k < k0 + BLK; k += 64) {
        if (PF && (k & 127) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)&Q[r][k / 2] + 1024, _MM_HINT_T1);
        const __m256i* h = (const __m256i*)&XH[k];
        const __m256i h0 = _mm256_load_si256(h), h1 = _mm256_load_si256(h + 1), h2 = _mm256_load_si256(h + 2),
                      h3 = _mm256_load_si256(h + 3);
        const __m256i l0 = _mm256_load_si256((const __m256i*)&XL8[k]), l1 = _mm256_load_si256((const __m256i*)&XL8[k + 32]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_load_si256((const __m256i*)&Q[r][k / 2]);
          const __m256i s4 = _mm256_srli_epi16(d, 4), s8 = _mm256_srli_epi16(d, 8), s12 = _mm256_srli_epi16(d, 12);
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(d, m16), h0), _mm256_madd_epi16(_mm256_and_si256(s4, m16), h1));
          const __m256i q = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(s8, m16), h2), _mm256_madd_epi16(s12, h3));
          ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(p, q));
          a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(d, m8), l0),
                                                             _mm256_maddubs_epi16(_mm256_and_si256(s4, m8), l1)));
        }
      }
      const __m256 sh = _mm256_load_ps(&SHF[j * 8]), sl = _mm256_load_ps(&SLF[j * 8]);
      for (int r = 0; r < R; ++r) {
        const __m256 zv = _mm256_set1_ps(float(int8_t(Q[r][j])));
        __m256 v = _mm256_fnmadd_ps(zv, sh, _mm256_cvtepi32_ps(ah[r]));
        v = _mm256_fmadd_ps(_mm256_fnmadd_ps(zv, sl, _mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r], ones))), inv, v);
        tot[r] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(&SC[r][j]), tot[r]);
      }
    }
  float s = 0;
  for (int r = 0; r < R; ++r) s += _mm256_cvtss_f32(tot[r]);
  sink += int(s);
}
// x's planes loaded per row (an empty asm keeps them from being hoisted into registers)
template <int R, int BLK, bool PF> __attribute__((noinline)) void hilo8_epi_mem(int K, int reps) {
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  const __m256i m16 = _mm256_set1_epi16(0x000F), m8 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256 inv = _mm256_set1_ps(1.f / 128);
  for (int it = 0; it < reps; ++it)
    for (int k0 = 0, j = 0; k0 < K; k0 += BLK, ++j) {
      __m256i ah[R], a16[R];
      for (int r = 0; r < R; ++r) ah[r] = a16[r] = _mm256_setzero_si256();
      for (int k = k0; k < k0 + BLK; k += 64) {
        if (PF && (k & 127) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)&Q[r][k / 2] + 1024, _MM_HINT_T1);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int16_t* hx = &XH[k];
          const int8_t* lx = &XL8[k];
          asm("" : "+r"(hx), "+r"(lx));
          const __m256i* h = (const __m256i*)hx;
          const __m256i h0 = _mm256_load_si256(h), h1 = _mm256_load_si256(h + 1), h2 = _mm256_load_si256(h + 2),
                        h3 = _mm256_load_si256(h + 3);
          const __m256i l0 = _mm256_load_si256((const __m256i*)lx), l1 = _mm256_load_si256((const __m256i*)lx + 1);
          const __m256i d = _mm256_load_si256((const __m256i*)&Q[r][k / 2]);
          const __m256i s4 = _mm256_srli_epi16(d, 4), s8 = _mm256_srli_epi16(d, 8), s12 = _mm256_srli_epi16(d, 12);
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(d, m16), h0), _mm256_madd_epi16(_mm256_and_si256(s4, m16), h1));
          const __m256i q = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(s8, m16), h2), _mm256_madd_epi16(s12, h3));
          ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(p, q));
          a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(d, m8), l0),
                                                             _mm256_maddubs_epi16(_mm256_and_si256(s4, m8), l1)));
        }
      }
      const __m256 sh = _mm256_load_ps(&SHF[j * 8]), sl = _mm256_load_ps(&SLF[j * 8]);
      for (int r = 0; r < R; ++r) {
        const __m256 zv = _mm256_set1_ps(float(int8_t(Q[r][j])));
        __m256 v = _mm256_fnmadd_ps(zv, sh, _mm256_cvtepi32_ps(ah[r]));
        v = _mm256_fmadd_ps(_mm256_fnmadd_ps(zv, sl, _mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r], ones))), inv, v);
        tot[r] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(&SC[r][j]), tot[r]);
      }
    }
  float s = 0;
  for (int r = 0; r < R; ++r) s += _mm256_cvtss_f32(tot[r]);
  sink += int(s);
}

// as hilo8_epi, but the blocks' integer lane sums go to a buffer and the epilogue runs over all blocks of the tile
// after its loops (no conversion chain inside the multiply loop)
alignas(64) int32_t BUFH[8][4096 / 64][8], BUFL[8][4096 / 64][8];
template <int R, int BLK> __attribute__((noinline)) void hilo8_defer(int K, int reps) {
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  const __m256i m16 = _mm256_set1_epi16(0x000F), m8 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256 inv = _mm256_set1_ps(1.f / 128);
  const int nb = K / BLK;
  for (int it = 0; it < reps; ++it) {
    for (int k0 = 0, j = 0; k0 < K; k0 += BLK, ++j) {
      __m256i ah[R], a16[R];
      for (int r = 0; r < R; ++r) ah[r] = a16[r] = _mm256_setzero_si256();
      for (int k = k0; k < k0 + BLK; k += 64) {
        const __m256i* h = (const __m256i*)&XH[k];
        const __m256i h0 = _mm256_load_si256(h), h1 = _mm256_load_si256(h + 1), h2 = _mm256_load_si256(h + 2),
                      h3 = _mm256_load_si256(h + 3);
        const __m256i l0 = _mm256_load_si256((const __m256i*)&XL8[k]), l1 = _mm256_load_si256((const __m256i*)&XL8[k + 32]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_load_si256((const __m256i*)&Q[r][k / 2]);
          const __m256i s4 = _mm256_srli_epi16(d, 4), s8 = _mm256_srli_epi16(d, 8), s12 = _mm256_srli_epi16(d, 12);
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(d, m16), h0), _mm256_madd_epi16(_mm256_and_si256(s4, m16), h1));
          const __m256i q = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(s8, m16), h2), _mm256_madd_epi16(s12, h3));
          ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(p, q));
          a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(d, m8), l0),
                                                             _mm256_maddubs_epi16(_mm256_and_si256(s4, m8), l1)));
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_store_si256((__m256i*)BUFH[r][j], ah[r]);
        _mm256_store_si256((__m256i*)BUFL[r][j], a16[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < nb; ++j) {
        const __m256 sh = _mm256_load_ps(&SHF[j * 8]), sl = _mm256_load_ps(&SLF[j * 8]);
        const __m256 zv = _mm256_set1_ps(float(int8_t(Q[r][j])));
        __m256 v = _mm256_fnmadd_ps(zv, sh, _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i*)BUFH[r][j])));
        v = _mm256_fmadd_ps(_mm256_fnmadd_ps(zv, sl, _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_load_si256((const __m256i*)BUFL[r][j]), ones))), inv, v);
        tot[r] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(&SC[r][j]), tot[r]);
      }
  }
  float s = 0;
  for (int r = 0; r < R; ++r) s += _mm256_cvtss_f32(tot[r]);
  sink += int(s);
}
template <class F> void bench(const char* name, int R, F f) {
  const int K = 4096, reps = 20000;
  f(K, 100);
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    auto a = std::chrono::steady_clock::now();
    f(K, reps);
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    if (sec < best) best = sec;
  }
  printf("%-34s R=%d: %.2f packed bytes/cycle @3.3GHz\n", name, R, double(R) * K / 2 * reps / best / 3.3e9);
}
int main() {
  memset(Q, 0x37, sizeof Q);
  for (int k = 0; k < 4096; ++k) {
    XH[k] = k % 1000; XL16[k] = k % 77; XL8[k] = k % 61 - 30;
    for (int p = 0; p < 3; ++p) XP[p][k] = (k * (p + 3)) % 101 - 50;
  }
  bench("production: 2 int16 planes", 4, prod<4>);
  bench("production: 2 int16 planes", 2, prod<2>);
  bench("hi int16 + lo int8, blk 128", 4, hilo8<4, 128>);
  bench("hi int16 + lo int8, blk 128", 2, hilo8<2, 128>);
  bench("hi int16 + lo int8, blk 128", 3, hilo8<3, 128>);
  bench("hi int16 + lo int8, blk 256", 4, hilo8<4, 256>);
  bench("hilo8 + epilogue, blk 128", 4, hilo8_epi<4, 128, false>);
  bench("hilo8 + epilogue, blk 128", 2, hilo8_epi<2, 128, false>);
  bench("hilo8 + epilogue + prefetch, blk 128", 4, hilo8_epi<4, 128, true>);
  bench("hilo8 + epilogue, blk 256", 4, hilo8_epi<4, 256, false>);
  bench("hilo8 + epilogue, x per row, blk 128", 4, hilo8_epi_mem<4, 128, false>);
  bench("hilo8 + epilogue, x per row, blk 128", 3, hilo8_epi_mem<3, 128, false>);
  bench("hilo8 + epilogue, x per row, blk 128", 2, hilo8_epi_mem<2, 128, false>);
  bench("hilo8 + epilogue, x per row, blk 128", 1, hilo8_epi_mem<1, 128, false>);
  bench("hilo8 + deferred epilogue, blk 128", 4, hilo8_defer<4, 128>);
  bench("hilo8 + deferred epilogue, blk 128", 2, hilo8_defer<2, 128>);
  bench("hilo8 + deferred epilogue, blk 256", 4, hilo8_defer<4, 256>);
  bench("3 int8 planes, blk 128", 4, planes8<4, 128, 3>);
  bench("3 int8 planes, blk 128", 2, planes8<2, 128, 3>);
  bench("3 int8 planes, blk 256", 2, planes8<2, 256, 3>);
  bench("2 int8 planes, blk 128", 4, planes8<4, 128, 2>);
  printf("%d\n", sink & 1);
}
