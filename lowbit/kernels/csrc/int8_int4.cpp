// Int8 dynamic activations x int4 weights ("8da4w") with integer arithmetic: the AVX-512 VNNI build of kernel "int8_int4" (avx512f, avx512bw, avx512vl, avx512_vnni; CPUs without
// them run int8_int4_avx2.cpp). Entry points, argument checks and the activation quantizer:
// int8_int4_entry.h, shared with the AVX2 build.
//
//   out[m, n] = s_x[m] * sum_g s_w[n, g] * I[m, n, g]  (+ bias[n])
//   I[m, n, g] = sum_{k in group g} (xq[m, k] - zp_x[m]) * w[n, k]      exact, int32
//
// Weight: lowbit's canonical int4 layout, read as saved (no repacking): qdata uint8 (N, K/2),
// element 2j in the low nibble of byte j, int4 two's complement in [-8, 7]; scale float32 (N, G).
//
// vpdpbusd multiplies unsigned bytes by signed bytes, four per int32 lane. The activation is the
// unsigned operand, xu = xq + 128 in [0, 255]; the weight the signed one, each nibble mapped to
// its int4 value by one vpshufb. With SW the lane's sum of weights and c = 128 + zp_x in [0, 255],
//   sum (xq - zp_x) * w = sum xu * w - c * SW
// exactly in int32 (a lane's P = sum xu * w is at most 255 * 8 * 8 per unit of 128 weights).
//
// Unit: 64 packed bytes of one weight row (128 weights). Its low nibbles (even k) make one vector,
// its high nibbles (odd k) another; int32 lane j of both covers k in [8j, 8j + 8) of the unit, so
// it lies in one group (group sizes are multiples of 32) and both products accumulate into the
// same lanes. x is permuted to match once per call (even elements of each 128, then the odd ones,
// as xu). Per unit and row of x: two vpdpbusd; then, once per group for group sizes that are
// multiples of 128 and once per unit otherwise, I = P - c * SW (vpmulld), converted to float32
// exactly (|I| < 2^24) and multiplied by the lanes' group scales (one vpermps of the <= 4 scales a
// unit touches) into a float32 accumulator; one horizontal sum per output. So each lane's integer
// sum is exact and scaled once, as in the AVX2 build; the builds differ in how the float32
// products are added (16 lanes here, 8 groups there): float32 rounding only.
//
// The weight row is unpacked once per pass over up to 8 rows of x, whose accumulators stay in
// registers; M > 8 takes several passes over the row (L1-resident after the first). From M = 9 a
// GEMM over 64-row panels packed per call takes over (below). Parallel over N;
// the weight stream is prefetched as csrc/prefetch.h is set. A K that is not a multiple of 128 ends
// in a partial unit read with a byte mask (the missing weights are 0, so they add nothing).
//
// A row of x whose scale is not finite (NaN or inf in the input) gives NaN outputs, as the float
// reference does.
//
// On a CPU with AMX tiles (csrc/amx.h), bf16 output and M >= kAmxMinM (power-of-two groups), the product runs on
// bf16 tiles instead (run_amx, below): the activation's integers xq - zp_x in [-255, 255] are exact in bf16, the
// weight is dequantized per 64-row panel to the reference's bf16 values bf16(w * s_w) (int4_panels.h, as int4
// weight-only's gemm_bf16 reads it), tdpbf16ps sums their products in float32 over all of K, and the row's s_x
// multiplies once at the end:
//   out[m, n] = bf16(s_x[m] * sum_k (xq[m, k] - zp_x[m]) * bf16(w[n, k] * s_w[n, k / gs]) + bias[n])
// The integer group sums are gone there: the weight carries the reference's bf16 rounding (2^-9 relative, the
// same values the fake-quantized reference multiplies), not the exact per-group scaling above. Why: with
// per-group scales an int8 tile's sums must leave the tiles once per group to be scaled in float32; at g32 that
// costs more than the VNNI panels here (benchmarks/results/avx512_amx_xeon/scratch/int8_int4_amx_per_group.txt),
// while the bf16 tiles take the scale inside the weight and run at int4 weight-only's speed.
#define LOWBIT_INT8_INT4_AMX  // the entry's set_amx / amx_active (this build's AMX route, below)
#include "int8_int4_entry.h"
#include "parallel.h"
#include "gemm_i8.h"
#include "gemm_bf16.h"
// int4_panels.h needs AVX-512 VBMI and BF16, which this build does not require: compiled for them here, run
// only on a CPU with AMX tiles (every one has both), as amx_route checks.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")
#include "int4_panels.h"
#pragma GCC pop_options

#include <numeric>

namespace {

using lowbit::par_for;

constexpr int64_t kUnitBytes = 64;  // packed bytes per unit
constexpr int64_t kUnitK = 128;     // weights per unit
constexpr int kMaxRows = 8;         // rows of x per pass over a weight row
constexpr int kMaxPeriod = 8;       // units before a unit's group pattern repeats (lcm(gs, 128) / 128 <= 7)

struct Problem {
  int64_t M, N, K, G, gs, U;  // U units per row
  int64_t period;             // units before the lane -> group pattern repeats (group sizes 96, 160, 192, 224)
  const uint8_t* xp;          // (U, M, 128): per unit and row, xu of the even elements then of the odd ones
  const int32_t* c;           // (M,): 128 + zp_x
  const float* sx;            // (M,)
  const uint8_t* q;           // (N, K/2)
  const float* s;             // (N, G)
  const void* bias;           // (N,) or nullptr
  at::ScalarType bias_t;
  void* out;  // (M, N)
  at::ScalarType out_t;
  int32_t idx[kMaxPeriod][16];  // per unit (mod period) and lane: its group minus the unit's first group
};

// The lanes' group scales for unit u of a weight row's scales sr. GS: the group size when it is 32,
// 64, 128 or 256 (then no division at run time), 0 for the other multiples of 32.
template <int GS>
inline __m512 unit_scales(const Problem& p, const float* sr, int64_t u) {
  if (GS == 128 || GS == 256) return _mm512_set1_ps(sr[u * kUnitK / GS]);
  if (GS == 32 || GS == 64) {  // 4 or 2 groups, each on 16 / (128 / GS) consecutive lanes
    constexpr int64_t per = kUnitK / (GS ? GS : 1);
    const int64_t gb = u * per;
    const __m512 v = gb + per <= p.G ? _mm512_castps128_ps512(GS == 32 ? _mm_loadu_ps(sr + gb)
                                                                        : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sr + gb))))
                                     : _mm512_maskz_loadu_ps(__mmask16((1u << (p.G - gb)) - 1), sr + gb);
    const __m512i ix = GS == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(ix, v);
  }
  const int64_t gb = u * kUnitK / p.gs;  // 96, 160, 192, 224: a unit touches at most 2 groups
  const int64_t cnt = std::min<int64_t>(2, p.G - gb);
  const __m512 v = _mm512_maskz_loadu_ps(__mmask16((1u << cnt) - 1), sr + gb);
  return _mm512_permutexvar_ps(_mm512_loadu_si512(p.idx[u % p.period]), v);
}

// Rows [m0, m0 + R) of x against weight row n: totals[r] = sum_g s_w[n, g] * I[m0 + r, n, g].
// Per unit and row: P += xu . w (two vpdpbusd, even and odd elements), then P += c . (-SW) (a third,
// c = 128 + zp_x as the unsigned bytes, the pair sums -(w_even + w_odd) in [-14, 16] as the signed
// ones), so P = sum (xq - zp_x) * w exactly; once per flush, the float32 scaling.
template <int R, int GS>
inline void row_pass(const Problem& p, int64_t n, int64_t m0, float* totals) {
  constexpr int64_t kFlush = GS == 256 ? 2 : 1;  // units per flush: a 256-group spans two
  const uint8_t* qr = p.q + n * (p.K / 2);
  const float* sr = p.s + n * p.G;
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const __m512i tbl = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1));
  __m512 acc[R];
  __m512i P[R], cb[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    P[r] = _mm512_setzero_si512();
    cb[r] = _mm512_set1_epi8(char(p.c[m0 + r]));
  }
  const int64_t rb = p.K / 2, full = rb / kUnitBytes;
  for (int64_t u = 0; u < p.U; ++u) {
    const uint8_t* src = qr + u * kUnitBytes;
    __m512i raw;
    if (u < full) {
      if (m0 == 0) lowbit::prefetch_stream(src);  // later passes read the row from L1
      raw = _mm512_loadu_si512(src);
    } else {  // the partial last unit: 16, 32 or 48 bytes
      raw = _mm512_maskz_loadu_epi8((__mmask64(1) << (rb - u * kUnitBytes)) - 1, src);
    }
    const __m512i wl = _mm512_shuffle_epi8(tbl, _mm512_and_si512(raw, lo4));
    const __m512i wh = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4));
    const __m512i nsw = _mm512_sub_epi8(_mm512_sub_epi8(_mm512_setzero_si512(), wl), wh);
    const uint8_t* xu = p.xp + (u * p.M + m0) * kUnitK;
    for (int r = 0; r < R; ++r) {
      P[r] = _mm512_dpbusd_epi32(P[r], _mm512_loadu_si512(xu + r * kUnitK), wl);
      P[r] = _mm512_dpbusd_epi32(P[r], _mm512_loadu_si512(xu + r * kUnitK + 64), wh);
      P[r] = _mm512_dpbusd_epi32(P[r], cb[r], nsw);
    }
    if (kFlush == 1 || (u + 1) % kFlush == 0 || u + 1 == p.U) {
      const __m512 sv = unit_scales<GS>(p, sr, u);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P[r]), sv, acc[r]);
        P[r] = _mm512_setzero_si512();
      }
    }
  }
  for (int r = 0; r < R; ++r) totals[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int GS>
void rows(const Problem& p, int64_t n0, int64_t n1) {
  float totals[kMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    const float b = p.bias ? load_float(p.bias, p.bias_t, n) : 0.f;
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
      const int64_t R = std::min<int64_t>(kMaxRows, p.M - m0);
      switch (R) {
        case 1: row_pass<1, GS>(p, n, m0, totals); break;
        case 2: row_pass<2, GS>(p, n, m0, totals); break;
        case 3: row_pass<3, GS>(p, n, m0, totals); break;
        case 4: row_pass<4, GS>(p, n, m0, totals); break;
        case 5: row_pass<5, GS>(p, n, m0, totals); break;
        case 6: row_pass<6, GS>(p, n, m0, totals); break;
        case 7: row_pass<7, GS>(p, n, m0, totals); break;
        default: row_pass<8, GS>(p, n, m0, totals); break;
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t m = m0 + r;
        const float v = std::isfinite(p.sx[m]) ? p.sx[m] * totals[r] + b : std::numeric_limits<float>::quiet_NaN();
        store_float(p.out, p.out_t, m * p.N + n, v);
      }
    }
  }
}

// ---- larger M: 64-row panels packed per call, a 6 x 32 VNNI tile -----------------------------------
//
// From kGemmMinM rows of x the weight is read as gemm_i8.h reads W8A8's: per call, each panel of 64 weight
// rows is packed into a per-thread buffer that stays in L2, in k-quads of 256 bytes (zmm v: rows
// 16v .. 16v + 15, lane l the 4 values u = w + 8 in [0, 15] of 4 of its row's elements: quad 2b holds the even
// elements of the 8-element block b, quad 2b + 1 its odd ones, the nibble halves of 4 packed bytes, so packing
// transposes the packed bytes and splits nibbles after; x is permuted to that order once per call, permute_x8),
// with its group sums of w and its scales transposed (64 per group). While one group of 16 rows is packed, the
// next 16 rows (or the next panel's first) are prefetched into L2 in address order, and while a panel's tiles run,
// the next panel this thread packs is prefetched into L2 (Ahead, below). A tile of 6 rows of x x 32
// columns keeps 12 int32 group sums and 12 float32 totals in registers (the best of 2-6 rows x 16-64 columns
// measured: scratch/int8_int4_gemm_vs_old.py in benchmarks/results/avx512_zen4). Per group, each int32 sum starts
// at -zp_x * SW - 8 * SX (SW: the weight row's sum of w over the group, SX: x's row's of xq), one vpmaddwd of the
// int16 pairs (SW, -8) and (-zp_x, SX) (|SX| <= 128 * 256 fits), and gains one vpdpbusd per 4
// elements (the row's 4 int8 values broadcast, the signed operand), so it ends at exactly
//   I = sum (xq - zp_x) * w;
// it is converted to float32 and added as tot = fma(I, s, tot), groups in order (the AVX2 build's formula;
// the small-M path above forms the same integers per lane instead). Rows past N in the last panel are
// packed as w = 0 and their outputs not stored.
constexpr int64_t kPanel = 64;
constexpr int64_t kQuad = kPanel * 4;  // bytes per k-quad of a panel
// From this M the panels (8 x 4096^2, bf16 x, 2 threads, Zen 4, ms per-lane path / panels, with the next panel
// prefetched during the tiles (session 24, benchmarks/results/avx512_zen4/scratch/int8_int4_gemm_min_m_session24.txt):
// g32 M = 9 8.89 / 8.39, M = 10 9.63 / 8.61, M = 11 11.03 / 9.49; g128 M = 9 8.74 / 6.92, M = 11 11.13 / 7.76; at
// M = 8 the per-lane path still wins (g32 7.65 / 9.30, g128 6.98 / 7.44). On SmolLM2's four shapes (30 layers, g32)
// at M = 9-11 the panels are as fast or faster (1536 -> 576 at M = 9 level: 94 / 98 us). It was 12 in session 23
// and 16 before (int8_int4_pack_ab.txt).
#ifndef LOWBIT_I4_GEMM_MIN_M
#define LOWBIT_I4_GEMM_MIN_M 9
#endif
constexpr int64_t kGemmMinM = LOWBIT_I4_GEMM_MIN_M;
constexpr int64_t kGemmBlockM = 256;  // rows of x per pass over the panels (256 x 4096 int8 = 1 MiB)
#ifndef LOWBIT_I4_ROWS  // -D overrides: benchmarks/results/avx512_zen4/scratch/int8_int4_gemm_vs_old.py builds variants
#define LOWBIT_I4_ROWS 6
#define LOWBIT_I4_VECS 2
#endif
constexpr int kGemmRows = LOWBIT_I4_ROWS;  // rows of x per tile
constexpr int kGemmVecs = LOWBIT_I4_VECS;  // zmm of 16 columns per tile (a divisor of 4)

struct Gemm {
  int64_t M, N, K, G, gs;
  const int8_t* x;      // (M, K) xq, each 8-element block in permute_x8's order
  const int32_t* zp;    // (M,)
  const int32_t* corr;  // (M, G): int16 pairs (-zp, SX)
  const float* sx;      // (M,)
  const uint8_t* q;     // (N, K/2)
  const float* s;       // (N, G)
  const void* bias;
  at::ScalarType bias_t;
  void* out;
  at::ScalarType out_t;
};

struct PanelBuf {
  std::vector<uint8_t> u;   // (32 * ceil(K / 128) quads, 64 rows, 4)
  std::vector<int32_t> su;  // (G, 64): int16 pairs (SW, -8)
  std::vector<float> s;     // (G, 64)
};

using lowbit::int4::kAndXor;  // vpternlogd: (a & b) ^ c (int4_panels.h)

// x's rows (M, K; K % 32 == 0) with every block of 8 elements reordered to its even elements, then its odd ones:
// the order of the panels' k-quads (pack_panel), so that a quad of x is still 4 consecutive bytes.
void permute_x8(const int8_t* x, int64_t M, int64_t K, int8_t* o) {
  const __m512i ctl = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
  par_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 mk = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
        _mm512_mask_storeu_epi8(o + m * K + k, mk, _mm512_shuffle_epi8(_mm512_maskz_loadu_epi8(mk, x + m * K + k), ctl));
      }
  });
}

// The packer's prefetch of the next 16 rows: into L2 (T1 measured faster than T0 on Zen 4, int8_int4_pack_ab.txt)
#ifndef LOWBIT_I4_PACK_HINT
#define LOWBIT_I4_PACK_HINT _MM_HINT_T1
#endif

// Panel n0 (up to 64 weight rows) in k-quads: 16 rows at a time, each 64-byte chunk of packed bytes (128
// elements) is transposed as 16 x 16 dwords, so dword d of every row (elements 8d .. 8d + 7 of the chunk) lies in
// one zmm; its low nibbles (the even elements) are quad 2d, its high nibbles (the odd ones) quad 2d + 1, each as
// u = w + 8 = nibble ^ 8 by one vpternlogd. x is read in that order (permute_x8). The group sums of u come from the
// same registers: byte sums of up to 8 blocks (16 quads, <= 240), then one vpdpbusd with 1s into int32 lanes.
void pack_panel(const Gemm& g, int64_t n0, PanelBuf& pb) {
  const int64_t rows = std::min(kPanel, g.N - n0), rb = g.K / 2, chunks = (rb + 63) / 64, blocks = g.K / 8, bpg = g.gs / 8;
  pb.u.resize(chunks * 32 * kQuad);
  pb.su.resize(g.G * kPanel);
  pb.s.resize(g.G * kPanel);
  const __m512i lo4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8), ones = _mm512_set1_epi8(1);
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFF80000u)), low16 = _mm512_set1_epi32(0xFFFF);
  const __m512i gs8 = _mm512_set1_epi32(int32_t(8 * g.gs));
  for (int v = 0; v < 4; ++v) {
    const int64_t live = std::min<int64_t>(16, rows - 16 * v);  // rows of this group of 16 that exist
    __m512i acc = _mm512_setzero_si512(), bsum = _mm512_setzero_si512();
    int nb = 0;         // blocks in bsum
    int64_t inb = 0;    // blocks of the current group so far
    int64_t gi = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t bytes = std::min<int64_t>(64, rb - c * 64);
      const __mmask64 mask = bytes == 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < live ? _mm512_maskz_loadu_epi8(mask, g.q + (n0 + 16 * v + i) * rb + c * 64) : _mm512_setzero_si512();
      {  // the next 16 rows (of this panel, or the next panel's first), in address order, 16 lines per chunk
        const char* nb16 = reinterpret_cast<const char*>(g.q + (n0 + 16 * v + 16) * rb);
        const int64_t off = c * 16 * 64, left = (g.N - (n0 + 16 * v + 16)) * rb;
        for (int64_t l = 0; l < 16 * 64; l += 64)
          if (off + l < left) _mm_prefetch(nb16 + off + l, LOWBIT_I4_PACK_HINT);
      }
      gemm_i8::transpose16(r);
      const int64_t here = std::min<int64_t>(16, blocks - 16 * c);
      uint8_t* cdst = pb.u.data() + 32 * c * kQuad + v * 64;
#pragma GCC unroll 16
      for (int d = 0; d < 16; ++d) {
        if (d >= here) break;
        const __m512i ua = _mm512_ternarylogic_epi32(r[d], lo4, eight, kAndXor);
        const __m512i ub = _mm512_ternarylogic_epi32(_mm512_srli_epi16(r[d], 4), lo4, eight, kAndXor);
        _mm512_storeu_si512(cdst + 2 * d * kQuad, ua);
        _mm512_storeu_si512(cdst + (2 * d + 1) * kQuad, ub);
        bsum = _mm512_add_epi8(bsum, _mm512_add_epi8(ua, ub));
        const bool end = ++inb == bpg;
        if (++nb == 8 || end) {
          acc = _mm512_dpbusd_epi32(acc, bsum, ones);
          bsum = _mm512_setzero_si512();
          nb = 0;
        }
        if (end) {  // SW = SU - 8 gs in the low int16 (|SW| <= 8 * 256), -8 in the high one
          inb = 0;
          _mm512_storeu_si512(pb.su.data() + gi * kPanel + 16 * v, _mm512_or_si512(_mm512_and_si512(_mm512_sub_epi32(acc, gs8), low16), high));
          acc = _mm512_setzero_si512();
          ++gi;
        }
      }
    }
    // The scales, transposed 16 groups x 16 rows at a time (rows past N: 0).
    for (int64_t g0 = 0; g0 < g.G; g0 += 16) {
      const int64_t cnt = std::min<int64_t>(16, g.G - g0);
      const __mmask16 gm = cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < live ? _mm512_castps_si512(_mm512_maskz_loadu_ps(gm, g.s + (n0 + 16 * v + i) * g.G + g0)) : _mm512_setzero_si512();
      gemm_i8::transpose16(r);
      for (int64_t t = 0; t < cnt; ++t) _mm512_storeu_si512(pb.s.data() + (g0 + t) * kPanel + 16 * v, r[t]);
    }
  }
}

// The next item's panel (its packed weight rows and its scales: two contiguous ranges), prefetched into L2 while
// this panel's tiles run, `per` 64-byte lines per step(), one step per group of a tile, so that packing it reads
// L2 instead of waiting on DRAM: the packer alone streamed ~15 GB/s on 2 threads (8 x 4096^2 g32, M = 16), well
// below the host's DRAM rate, and the tiles before it left the memory idle. Measured in
// benchmarks/results/avx512_zen4/scratch/int8_int4_ahead_ab.txt. W8A8's gemm_i8 packer (256 KiB int8 panels) was
// measured slower with the same prefetch (M = 16 11.6 -> 13.0 ms), so it has none.
struct Ahead {
  const char* at[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  int range = 2;    // the range step() reads (2: done, or never armed)
  int64_t per = 0;  // lines per step
  // the ranges [a, a + abytes) and [b, b + bbytes), spread over `steps` calls of step()
  void arm(const void* a, int64_t abytes, const void* b, int64_t bbytes, int64_t steps) {
    at[0] = static_cast<const char*>(a), end[0] = at[0] + abytes;
    at[1] = static_cast<const char*>(b), end[1] = at[1] + bbytes;
    range = 0;
    per = ((abytes + 63) / 64 + (bbytes + 63) / 64 + steps - 1) / std::max<int64_t>(1, steps);
  }
  inline void step() {
    for (int64_t n = 0; n < per && range < 2; ++n) {
      if (at[range] >= end[range]) {
        ++range;
        continue;
      }
      _mm_prefetch(at[range], LOWBIT_I4_PACK_HINT);
      at[range] += 64;
    }
  }
};

// Named registers (gemm_i8.h: gcc 12 spills arrays of vpdpbusd accumulators): p<i><j> and t<i><j> are row i of
// the tile, zmm j of its columns; the ones past the tile's R x NV are never used (if constexpr).
#define LB_ON(i, j) if constexpr (R > i && NV > j)
#define LB_DECL(i, j) __m512i p##i##j; __m512 t##i##j;
#define LB_ZERO(i, j) LB_ON(i, j) t##i##j = _mm512_setzero_ps();
#define LB_START(i, j) LB_ON(i, j) p##i##j = _mm512_madd_epi16(su##j, cr##i);
#define LB_ROWQ(i) const __m512i cr##i = _mm512_set1_epi32(R > i ? g.corr[(m0 + (R > i ? i : 0)) * g.G + gi] : 0);
#define LB_X(i) const __m512i x##i = R > i ? _mm512_set1_epi32(gemm_i8::load4(xr + (R > i ? i : 0) * g.K + 4 * t)) : _mm512_setzero_si512();
#define LB_DOT(i, j) LB_ON(i, j) gemm_i8::dpbusd(p##i##j, w##j, x##i);
#define LB_SCALE(i, j) LB_ON(i, j) t##i##j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p##i##j), s##j, t##i##j);
#define LB_STORE(i, j) LB_ON(i, j) _mm512_store_ps(buf + 16 * j, t##i##j);
#define LB_STORE_ROW(i)                                          \
  if constexpr (R > i) {                                         \
    LB_STORE(i, 0) LB_STORE(i, 1) LB_STORE(i, 2) LB_STORE(i, 3) \
    store_row(m0 + i);                                           \
  }

// Rows [m0, m0 + R) of x against columns [16 * v0, 16 * (v0 + NV)) of the panel at n0:
// out = sx * tot + bias (NaN where sx is not finite).
template <int R, int NV>
void panel_tile(const Gemm& g, const PanelBuf& pb, int64_t n0, int v0, int64_t m0, Ahead& ah) {
  static_assert(R >= 1 && R <= 6 && NV >= 1 && NV <= 4, "panel_tile: up to 6 rows x 4 vectors");
  const int64_t tg = g.gs / 4, cols = std::min<int64_t>(16 * NV, g.N - n0 - 16 * v0);
  const int8_t* xr = g.x + m0 * g.K;
  LB_DECL(0, 0) LB_DECL(0, 1) LB_DECL(0, 2) LB_DECL(0, 3) LB_DECL(1, 0) LB_DECL(1, 1) LB_DECL(1, 2) LB_DECL(1, 3) LB_DECL(2, 0) LB_DECL(2, 1) LB_DECL(2, 2) LB_DECL(2, 3) LB_DECL(3, 0) LB_DECL(3, 1) LB_DECL(3, 2) LB_DECL(3, 3) LB_DECL(4, 0) LB_DECL(4, 1) LB_DECL(4, 2) LB_DECL(4, 3) LB_DECL(5, 0) LB_DECL(5, 1) LB_DECL(5, 2) LB_DECL(5, 3)
  LB_ZERO(0, 0) LB_ZERO(0, 1) LB_ZERO(0, 2) LB_ZERO(0, 3) LB_ZERO(1, 0) LB_ZERO(1, 1) LB_ZERO(1, 2) LB_ZERO(1, 3) LB_ZERO(2, 0) LB_ZERO(2, 1) LB_ZERO(2, 2) LB_ZERO(2, 3) LB_ZERO(3, 0) LB_ZERO(3, 1) LB_ZERO(3, 2) LB_ZERO(3, 3) LB_ZERO(4, 0) LB_ZERO(4, 1) LB_ZERO(4, 2) LB_ZERO(4, 3) LB_ZERO(5, 0) LB_ZERO(5, 1) LB_ZERO(5, 2) LB_ZERO(5, 3)
  for (int64_t gi = 0; gi < g.G; ++gi) {
    ah.step();
    {
      const int32_t* su = pb.su.data() + gi * kPanel + 16 * v0;
      const __m512i su0 = _mm512_loadu_si512(su), su1 = NV > 1 ? _mm512_loadu_si512(su + 16) : su0;
      const __m512i su2 = NV > 2 ? _mm512_loadu_si512(su + 32) : su0, su3 = NV > 3 ? _mm512_loadu_si512(su + 48) : su0;
      LB_ROWQ(0) LB_ROWQ(1) LB_ROWQ(2) LB_ROWQ(3) LB_ROWQ(4) LB_ROWQ(5)
      LB_START(0, 0) LB_START(0, 1) LB_START(0, 2) LB_START(0, 3) LB_START(1, 0) LB_START(1, 1) LB_START(1, 2) LB_START(1, 3) LB_START(2, 0) LB_START(2, 1) LB_START(2, 2) LB_START(2, 3) LB_START(3, 0) LB_START(3, 1) LB_START(3, 2) LB_START(3, 3) LB_START(4, 0) LB_START(4, 1) LB_START(4, 2) LB_START(4, 3) LB_START(5, 0) LB_START(5, 1) LB_START(5, 2) LB_START(5, 3)
    }
    for (int64_t t = gi * tg; t < (gi + 1) * tg; ++t) {
      const uint8_t* w = pb.u.data() + t * kQuad + 64 * v0;
      const __m512i w0 = _mm512_loadu_si512(w), w1 = NV > 1 ? _mm512_loadu_si512(w + 64) : w0;
      const __m512i w2 = NV > 2 ? _mm512_loadu_si512(w + 128) : w0, w3 = NV > 3 ? _mm512_loadu_si512(w + 192) : w0;
      LB_X(0) LB_X(1) LB_X(2) LB_X(3) LB_X(4) LB_X(5)
      LB_DOT(0, 0) LB_DOT(0, 1) LB_DOT(0, 2) LB_DOT(0, 3) LB_DOT(1, 0) LB_DOT(1, 1) LB_DOT(1, 2) LB_DOT(1, 3) LB_DOT(2, 0) LB_DOT(2, 1) LB_DOT(2, 2) LB_DOT(2, 3) LB_DOT(3, 0) LB_DOT(3, 1) LB_DOT(3, 2) LB_DOT(3, 3) LB_DOT(4, 0) LB_DOT(4, 1) LB_DOT(4, 2) LB_DOT(4, 3) LB_DOT(5, 0) LB_DOT(5, 1) LB_DOT(5, 2) LB_DOT(5, 3)
    }
    const float* sc = pb.s.data() + gi * kPanel + 16 * v0;
    const __m512 s0 = _mm512_loadu_ps(sc), s1 = NV > 1 ? _mm512_loadu_ps(sc + 16) : s0;
    const __m512 s2 = NV > 2 ? _mm512_loadu_ps(sc + 32) : s0, s3 = NV > 3 ? _mm512_loadu_ps(sc + 48) : s0;
    LB_SCALE(0, 0) LB_SCALE(0, 1) LB_SCALE(0, 2) LB_SCALE(0, 3) LB_SCALE(1, 0) LB_SCALE(1, 1) LB_SCALE(1, 2) LB_SCALE(1, 3) LB_SCALE(2, 0) LB_SCALE(2, 1) LB_SCALE(2, 2) LB_SCALE(2, 3) LB_SCALE(3, 0) LB_SCALE(3, 1) LB_SCALE(3, 2) LB_SCALE(3, 3) LB_SCALE(4, 0) LB_SCALE(4, 1) LB_SCALE(4, 2) LB_SCALE(4, 3) LB_SCALE(5, 0) LB_SCALE(5, 1) LB_SCALE(5, 2) LB_SCALE(5, 3)
  }
  alignas(64) float buf[kPanel];
  auto store_row = [&](int64_t m) {
    const bool finite = std::isfinite(g.sx[m]);
    for (int64_t j = 0; j < cols; ++j) {
      const float b = g.bias ? load_float(g.bias, g.bias_t, n0 + 16 * v0 + j) : 0.f;
      store_float(g.out, g.out_t, m * g.N + n0 + 16 * v0 + j, finite ? g.sx[m] * buf[j] + b : std::numeric_limits<float>::quiet_NaN());
    }
  };
  LB_STORE_ROW(0) LB_STORE_ROW(1) LB_STORE_ROW(2) LB_STORE_ROW(3) LB_STORE_ROW(4) LB_STORE_ROW(5)
}
#undef LB_ON
#undef LB_DECL
#undef LB_ZERO
#undef LB_START
#undef LB_ROWQ
#undef LB_X
#undef LB_DOT
#undef LB_SCALE
#undef LB_STORE
#undef LB_STORE_ROW

// Every panel against rows [mb, me) of x: items (panel, run of tiles) shared out as gemm_i8's are.
template <int R>
void tile_upto(int64_t r, const Gemm& g, const PanelBuf& pb, int64_t n0, int v0, int64_t m0, Ahead& ah) {
  if constexpr (R > 1) {
    if (r < R) return tile_upto<R - 1>(r, g, pb, n0, v0, m0, ah);
  }
  panel_tile<R, kGemmVecs>(g, pb, n0, v0, m0, ah);
}

void run_gemm_block(const Gemm& g, int64_t mb, int64_t me) {
  const int64_t panels = (g.N + kPanel - 1) / kPanel, tiles = (me - mb + kGemmRows - 1) / kGemmRows;
  const int64_t splits = gemm_i8::m_splits(panels, tiles, 2.0), per = (tiles + splits - 1) / splits;
  par_for(0, panels * splits, 1, [&](int64_t b, int64_t e) {
    thread_local PanelBuf pb;
    for (int64_t item = b; item < e; ++item) {
      const int64_t n0 = item / splits * kPanel, t0 = item % splits * per, t1 = std::min(tiles, t0 + per);
      if (t0 >= t1) continue;
      pack_panel(g, n0, pb);
      const int nv = int(std::min<int64_t>(4, (g.N - n0 + 15) / 16));  // vectors of the panel that hold columns
      Ahead ah;
      if (item + 1 < e && (item + 1) / splits * kPanel != n0) {  // the next item packs another panel
        const int64_t n1 = (item + 1) / splits * kPanel, r1 = std::min(kPanel, g.N - n1);
        ah.arm(g.q + n1 * (g.K / 2), r1 * (g.K / 2), g.s + n1 * g.G, r1 * g.G * 4, (t1 - t0) * ((nv + kGemmVecs - 1) / kGemmVecs) * g.G);
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = mb + t * kGemmRows;
        for (int v0 = 0; v0 < nv; v0 += kGemmVecs) tile_upto<kGemmRows>(std::min<int64_t>(kGemmRows, me - m0), g, pb, n0, v0, m0, ah);
      }
    }
  });
}

// Blocks of kGemmBlockM rows of x, each over every panel (packed again per block: a few percent of a
// block's products), so the rows of x a panel reads stay in L2.
void run_gemm(const Gemm& g) {
  for (int64_t mb = 0; mb < g.M; mb += kGemmBlockM) run_gemm_block(g, mb, std::min(g.M, mb + kGemmBlockM));
}

// ---- AMX: bf16 tiles over the activation's integers (header comment) ------------------------------------------

// From this M on the tiles (one 4096^2 layer, g32, bf16, 2 threads, 2-core Xeon guest with AMX:
// benchmarks/results/avx512_amx_xeon/scratch/int8_int4_amx_bf16_route.txt).
constexpr int64_t kAmxMinM = 32;

bool amx_route(int64_t M, int64_t gs, at::ScalarType out_t) {
  static const bool isa = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
  return out_t == at::kBFloat16 && M >= kAmxMinM && (gs & (gs - 1)) == 0 && isa && lowbit::amx::usable_bf16();
}

#define LOWBIT_I4_AMX_ISA __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))

// Row m of xq (K values, K % 32 == 0) as bf16 xq - zp: exact, |v| <= 255.
LOWBIT_I4_AMX_ISA void integers_bf16(const int8_t* xr, int32_t zp, int64_t K, uint16_t* o) {
  const __m512i z = _mm512_set1_epi32(zp);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512i v = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + k))), z);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_cvtepi32_ps(v)));
  }
}

LOWBIT_I4_AMX_ISA void run_amx(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
             const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, Scratch& ws) {
  ws.xb.resize(size_t(M * K));
  uint16_t* xb = ws.xb.data();
  par_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) integers_bf16(x + m * K, zp[m], K, xb + m * K);
  });
  ws.sx_amx.resize(size_t(M));
  for (int64_t m = 0; m < M; ++m)  // a row whose scale is not finite gives NaN, as the paths above
    ws.sx_amx[m] = std::isfinite(sxp[m]) ? sxp[m] : std::numeric_limits<float>::quiet_NaN();
  const float* bp = nullptr;
  if (bias) {
    ws.bias_f32.resize(size_t(N));
    for (int64_t n = 0; n < N; ++n) ws.bias_f32[n] = load_float(bias, bias_t, n);
    bp = ws.bias_f32.data();
  }
  lowbit::int4::W4 w{q, s, nullptr, nullptr, N, K, G, K / G, K / 2, 0};
  while ((int64_t(1) << w.lg) < w.gs) ++w.lg;
  gemm_bf16::gemm(xb, K, M, N, K, lowbit::int4::Int4Panels{&w}, bp, static_cast<uint16_t*>(out), nullptr,
                  ws.sx_amx.data());
}
#undef LOWBIT_I4_AMX_ISA

// The contract: int8_int4_entry.h.
void run_kernel(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
                const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
                Scratch& ws) {
  if (M == 0 || N == 0) return;
  const int64_t gs = K / G, U = (K + kUnitK - 1) / kUnitK;
  if (amx_route(M, gs, out_t)) {
    run_amx(x, sxp, zp, M, K, q, N, s, G, bias, bias_t, out, ws);
    return;
  }
  if (M >= kGemmMinM) {
    ws.sxc.resize(M * G);
    int32_t* corr = ws.sxc.data();
    par_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) {
      const __m512i ones = _mm512_set1_epi8(1);
      for (int64_t m = b; m < e; ++m)
        for (int64_t gi = 0; gi < G; ++gi) {  // SX by vpdpbusd of 1s with the group's xq (gs % 32 == 0)
          const int8_t* xg = x + m * K + gi * gs;
          __m512i acc = _mm512_setzero_si512();
          for (int64_t k = 0; k < gs; k += 32)
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + k))));
          const uint32_t sx = uint32_t(_mm512_reduce_add_epi32(acc)) & 0xFFFFu, nzp = uint32_t(-zp[m]) & 0xFFFFu;
          corr[m * G + gi] = int32_t(nzp | (sx << 16));  // int16 pairs (-zp, SX): SX in [-128 * 256, 127 * 256]
        }
    });
    ws.xp.resize(M * K);
    permute_x8(x, M, K, ws.xp.data());
    run_gemm(Gemm{M, N, K, G, gs, ws.xp.data(), zp, ws.sxc.data(), sxp, q, s, bias, bias_t, out, out_t});
    return;
  }
  // x as xu = xq + 128 (bit pattern xq ^ 0x80), per unit the even elements then the odd ones, laid
  // out by unit, then row (the rows one unit reads are contiguous); zero elements past K.
  ws.xp.resize(U * M * kUnitK);
  uint8_t* xp = reinterpret_cast<uint8_t*>(ws.xp.data());
  const __m512i bias8 = _mm512_set1_epi8(char(0x80));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = x + m * K;
    for (int64_t u = 0; u < U; ++u) {
      alignas(64) int8_t buf[kUnitK];
      const int64_t len = std::min(kUnitK, K - u * kUnitK);
      std::memset(buf, 0, sizeof(buf));
      std::memcpy(buf, xr + u * kUnitK, len);
      const __m512i a = _mm512_load_si512(buf), b = _mm512_load_si512(buf + 64);
      const __m256i ea = _mm512_cvtepi16_epi8(a), eb = _mm512_cvtepi16_epi8(b);  // low bytes: even elements
      const __m256i oa = _mm512_cvtepi16_epi8(_mm512_srli_epi16(a, 8)), ob = _mm512_cvtepi16_epi8(_mm512_srli_epi16(b, 8));
      uint8_t* dst = xp + (u * M + m) * kUnitK;
      _mm512_storeu_si512(dst, _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(ea), eb, 1), bias8));
      _mm512_storeu_si512(dst + 64, _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(oa), ob, 1), bias8));
    }
  }
  ws.sxc.resize(M);
  for (int64_t m = 0; m < M; ++m) ws.sxc[m] = 128 + zp[m];
  Problem p{M, N, K, G, gs, U, 1, xp, ws.sxc.data(), sxp, q, s, bias, bias_t, out, out_t, {}};
  if (gs % kUnitK != 0 && gs != 32 && gs != 64) {
    p.period = gs / std::gcd(gs, kUnitK);
    TORCH_CHECK(p.period <= kMaxPeriod, "int8_int4: group size ", gs, " has a lane pattern longer than ", kMaxPeriod, " units");
    for (int64_t u = 0; u < p.period; ++u)
      for (int64_t j = 0; j < 16; ++j) p.idx[u][j] = int32_t((u * kUnitK + 8 * j) / gs - u * kUnitK / gs);
  }
  par_for(0, N, 16, [&](int64_t b, int64_t e) {
    switch (gs) {
      case 32: rows<32>(p, b, e); break;
      case 64: rows<64>(p, b, e); break;
      case 128: rows<128>(p, b, e); break;
      case 256: rows<256>(p, b, e); break;
      default: rows<0>(p, b, e); break;
    }
  });
}

}  // namespace
