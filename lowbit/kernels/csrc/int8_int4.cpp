// Int8 dynamic activations x int4 weights ("8da4w") with integer arithmetic, for small M: the
// AVX-512 VNNI build of kernel "int8_int4" (avx512f, avx512bw, avx512vl, avx512_vnni; CPUs without
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
// registers; M > 8 takes several passes over the row (L1-resident after the first). Parallel over N;
// the weight stream is prefetched as csrc/prefetch.h is set. A K that is not a multiple of 128 ends
// in a partial unit read with a byte mask (the missing weights are 0, so they add nothing).
//
// A row of x whose scale is not finite (NaN or inf in the input) gives NaN outputs, as the float
// reference does.
#include "int8_int4_entry.h"
#include "parallel.h"

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

// The contract: int8_int4_entry.h.
void run_kernel(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
                const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
                Scratch& ws) {
  if (M == 0 || N == 0) return;
  const int64_t gs = K / G, U = (K + kUnitK - 1) / kUnitK;
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
