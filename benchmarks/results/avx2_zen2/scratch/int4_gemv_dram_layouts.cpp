// The AVX2 int4 GEMV at M = 1 fed from DRAM (2 threads, 8 x 4096 x 4096 int4 = 64 MiB, g128 blocks with the
// production epilogue): where the time goes. Compute: none (loads only), the production loop (two int16 planes),
// hi int16 + lo int8 (vpmaddubsw). Layout: canonical rows (R = 4 row streams per tile) or the tile's rows
// interleaved per 32 packed bytes (one stream). Prefetch: none, or T1 / NTA at a distance.
// Build and run: g++ -O3 -mavx2 -mfma -pthread -o /tmp/idram int4_gemv_dram_layouts.cpp && /tmp/idram
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
constexpr int K = 4096, N = 8 * 4096, R = 4, BLK = 128, RB = K / 2;
uint8_t* W;  // N * RB bytes
alignas(64) int16_t XH[K], XL16[K];
alignas(64) int8_t XL8[K];
alignas(64) int32_t SH[K / BLK * 8], SL[K / BLK * 8];
float S[N / R * R * (K / BLK)];
float OUT[N];
enum Comp { NONE, PROD, HILO8 };
enum Lay { ROWS, INTER };
struct Pf { int hint; int dist; };
template <int C, int L>
void rows(int64_t t0, int64_t t1, Pf pf) {
  const __m256i m16 = _mm256_set1_epi16(0x0F), m8 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * R;
    alignas(32) float tot[R][8] = {};
    for (int j = 0; j < K / BLK; ++j) {
      __m256i ah[R], al[R], a16[R];
      for (int r = 0; r < R; ++r) ah[r] = al[r] = a16[r] = _mm256_setzero_si256();
      for (int k = j * BLK; k < (j + 1) * BLK; k += 64) {  // 32 packed bytes per row a step
        const uint8_t* p[R];
        for (int r = 0; r < R; ++r)
          p[r] = L == ROWS ? W + (n0 + r) * RB + k / 2 : W + n0 * RB + (int64_t)(k / 2) * R + 32 * r;
        if (pf.hint >= 0 && (k & 127) == 0) {
          if (L == ROWS) {
            for (int r = 0; r < R; ++r)
              pf.hint == 2 ? _mm_prefetch((const char*)p[r] + pf.dist, _MM_HINT_T1) : _mm_prefetch((const char*)p[r] + pf.dist, _MM_HINT_NTA);
          } else {
            for (int r = 0; r < R; ++r)  // the tile's stream: 2 lines per row-step of 64 elements
              pf.hint == 2 ? _mm_prefetch((const char*)p[0] + pf.dist + 64 * r, _MM_HINT_T1) : _mm_prefetch((const char*)p[0] + pf.dist + 64 * r, _MM_HINT_NTA);
          }
        }
        if (C == NONE) {
          for (int r = 0; r < R; ++r) ah[r] = _mm256_or_si256(ah[r], _mm256_loadu_si256((const __m256i*)p[r]));
        } else if (C == PROD) {
          for (int half = 0; half < 2; ++half) {
            const int kk = k + 32 * half;
            const __m256i he = _mm256_load_si256((const __m256i*)&XH[kk]), ho = _mm256_load_si256((const __m256i*)&XH[kk + 16]);
            const __m256i le = _mm256_load_si256((const __m256i*)&XL16[kk]), lo = _mm256_load_si256((const __m256i*)&XL16[kk + 16]);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
              const __m256i d = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(p[r] + 16 * half)));
              const __m256i ev = _mm256_and_si256(d, m16), od = _mm256_srli_epi16(d, 4);
              ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(_mm256_madd_epi16(ev, he), _mm256_madd_epi16(od, ho)));
              al[r] = _mm256_add_epi32(al[r], _mm256_add_epi32(_mm256_madd_epi16(ev, le), _mm256_madd_epi16(od, lo)));
            }
          }
        } else {
          const __m256i* h = (const __m256i*)&XH[k];
          const __m256i h0 = _mm256_load_si256(h), h1 = _mm256_load_si256(h + 1), h2 = _mm256_load_si256(h + 2), h3 = _mm256_load_si256(h + 3);
          const __m256i l0 = _mm256_load_si256((const __m256i*)&XL8[k]), l1 = _mm256_load_si256((const __m256i*)&XL8[k + 32]);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const __m256i d = _mm256_loadu_si256((const __m256i*)p[r]);
            const __m256i s4 = _mm256_srli_epi16(d, 4), s8 = _mm256_srli_epi16(d, 8), s12 = _mm256_srli_epi16(d, 12);
            const __m256i w0 = _mm256_and_si256(d, m16), w1 = _mm256_and_si256(s4, m16), w2 = _mm256_and_si256(s8, m16);
            const __m256i pp = _mm256_add_epi32(_mm256_madd_epi16(w0, h0), _mm256_madd_epi16(w1, h1));
            const __m256i qq = _mm256_add_epi32(_mm256_madd_epi16(w2, h2), _mm256_madd_epi16(s12, h3));
            ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(pp, qq));
            const __m256i b0 = _mm256_and_si256(d, m8), b1 = _mm256_and_si256(s4, m8);
            a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(b0, l0), _mm256_maddubs_epi16(b1, l1)));
          }
        }
      }
      const __m256i sh = _mm256_load_si256((const __m256i*)&SH[j * 8]), sl = _mm256_load_si256((const __m256i*)&SL[j * 8]);
      for (int r = 0; r < R; ++r) {
        if (C == HILO8) al[r] = _mm256_madd_epi16(a16[r], ones);
        const __m256i zv = _mm256_set1_epi32(8);
        __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(ah[r], _mm256_mullo_epi32(zv, sh)));
        v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(al[r], _mm256_mullo_epi32(zv, sl))), _mm256_set1_ps(1.f / 32768), v);
        _mm256_store_ps(tot[r], _mm256_fmadd_ps(v, _mm256_set1_ps(S[(n0 + r) * (K / BLK) + j]), _mm256_load_ps(tot[r])));
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = 0; for (int i = 0; i < 8; ++i) s += tot[r][i];
      OUT[n0 + r] = s;
    }
  }
}
template <int C, int L>
double run(int threads, Pf pf) {
  std::vector<std::thread> th;
  auto a = std::chrono::steady_clock::now();
  const int64_t tiles = N / R;
  for (int i = 0; i < threads; ++i)
    th.emplace_back([=] { rows<C, L>(tiles * i / threads, tiles * (i + 1) / threads, pf); });
  for (auto& t : th) t.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}
struct Case { const char* name; double (*f)(int, Pf); Pf pf; std::vector<double> t; };
int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 7;
  W = (uint8_t*)aligned_alloc(64, (size_t)N * RB);
  for (size_t i = 0; i < (size_t)N * RB; ++i) W[i] = uint8_t(i * 2654435761u >> 24);
  for (int k = 0; k < K; ++k) { XH[k] = k % 1000; XL16[k] = k % 77; XL8[k] = k % 61 - 30; }
  for (auto& s : S) s = 1.f;
  Pf none{-1, 0}, t1_64k{2, 65536}, t1_16k{2, 16384}, nta_32k{0, 32768}, t1_4k{2, 4096};
  std::vector<Case> cs = {
      {"loads only, rows, no prefetch", run<NONE, ROWS>, none},
      {"loads only, rows, t1 64K", run<NONE, ROWS>, t1_64k},
      {"loads only, inter, no prefetch", run<NONE, INTER>, none},
      {"loads only, inter, t1 16K", run<NONE, INTER>, t1_16k},
      {"prod, rows, t1 64K", run<PROD, ROWS>, t1_64k},
      {"prod, rows, t1 16K", run<PROD, ROWS>, t1_16k},
      {"prod, rows, no prefetch", run<PROD, ROWS>, none},
      {"prod, inter, no prefetch", run<PROD, INTER>, none},
      {"prod, inter, t1 4K", run<PROD, INTER>, t1_4k},
      {"prod, inter, t1 16K", run<PROD, INTER>, t1_16k},
      {"prod, inter, nta 32K", run<PROD, INTER>, nta_32k},
      {"hilo8, rows, t1 64K", run<HILO8, ROWS>, t1_64k},
      {"hilo8, rows, t1 16K", run<HILO8, ROWS>, t1_16k},
      {"hilo8, inter, no prefetch", run<HILO8, INTER>, none},
      {"hilo8, inter, t1 16K", run<HILO8, INTER>, t1_16k},
  };
  for (int rd = 0; rd < rounds; ++rd)
    for (auto& c : cs) c.t.push_back(c.f(threads, c.pf));
  const double bytes = (double)N * RB;
  for (auto& c : cs) {
    std::sort(c.t.begin(), c.t.end());
    const double med = c.t[c.t.size() / 2];
    printf("%-34s %6.2f ms  %5.1f GB/s\n", c.name, med * 1e3, bytes / med / 1e9);
  }
}
