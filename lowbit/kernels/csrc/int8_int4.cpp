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
// registers; M > 8 takes several passes over the row (L1-resident after the first). From M = 32 a
// GEMM over 16-row panels takes over (below). Parallel over N;
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

// ---- larger M: 16-row panels repacked per call, a VNNI GEMM micro-kernel --------------------------
//
// From kGemmMinM rows of x, each thread takes panels of 16 weight rows and repacks each panel once per
// call into an L1/L2 buffer laid out for vpdpbusd across rows: dword t of lane j holds u = w + 8 in
// [0, 15] of row n0 + j, elements 4t .. 4t + 3 (a gather of 2 packed bytes per lane, split into 4
// nibbles). The panel's group sums SU of u and its scales (transposed, 16 per group) come with it.
// Then for every 8 rows of x: per group, P = sum u * xq by one vpdpbusd per 4 elements per row (the
// row's 4 int8 values broadcast, the signed operand), and the exact group sum
//   I = P - zp_x * SU - 8 * (SX - zp_x * gs)        (SX: the row's sum of xq over the group)
// converted to float32 and added as tot = fma(I, s, tot), groups in order (the AVX2 build's formula;
// the small-M path above forms the same integers per lane instead). A panel past N is padded with
// u = 8 (w = 0) rows whose outputs are not stored.
constexpr int64_t kPanel = 16;
// From this M the panels (measured, 8 x 4096^2 bf16, 2 threads, Zen 4, ms panels / the per-lane path above:
// g32 M = 16 21.2 / 16.5, M = 32 29.7 / 30.1; against fake quantization + the AVX-512 int4 float kernels,
// panels g32 1.34x / 1.38x / 1.36x / 1.36x at M = 32 / 64 / 128 / 256, g128 1.29x / 1.57x / 1.30x at 32 /
// 64 / 256).
constexpr int64_t kGemmMinM = 32;
constexpr int64_t kGemmBlockM = 256;  // rows of x per pass over the panels (256 x 4096 int8 = 1 MiB)
constexpr int kGemmRows = 8;

struct Gemm {
  int64_t M, N, K, G, gs;
  const int8_t* x;      // (M, K) xq
  const int32_t* zp;    // (M,)
  const int32_t* corr;  // (M, G): 8 * (SX - zp * gs)
  const float* sx;      // (M,)
  const uint8_t* q;     // (N, K/2)
  const float* s;       // (N, G)
  const void* bias;
  at::ScalarType bias_t;
  void* out;
  at::ScalarType out_t;
};

struct PanelBuf {
  std::vector<int32_t> u;   // (K/4, 16) dwords of 4 u values
  std::vector<int32_t> su;  // (G, 16)
  std::vector<float> s;     // (G, 16)
};

void repack_panel(const Gemm& g, int64_t n0, PanelBuf& pb) {
  const int64_t K = g.K, T = K / 4, rows = std::min(kPanel, g.N - n0), rb = K / 2;
  pb.u.resize(T * kPanel);
  pb.su.assign(g.G * kPanel, 0);
  pb.s.assign(g.G * kPanel, 0.f);
  // lane j reads row min(j, rows - 1) (valid memory); lanes past the panel's rows are then set to u = 8
  alignas(64) int32_t idx[kPanel];
  for (int64_t j = 0; j < kPanel; ++j) idx[j] = int32_t(std::min<int64_t>(j, rows - 1) * rb);
  const __m512i vidx = _mm512_load_si512(idx);
  const __mmask16 pad = __mmask16(~((1u << rows) - 1));
  const __m512i eight = _mm512_set1_epi32(0x08080808), lo4 = _mm512_set1_epi8(0x0F);
  // dword [b0 b1 b2 b3] -> [b_i b_i b_(i+1) b_(i+1)]: the 2 packed bytes of elements 4t .. 4t + 3
  const __m512i dup0 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13));
  const __m512i dup2 = _mm512_broadcast_i32x4(_mm_setr_epi8(2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15));
  const uint8_t* base = g.q + n0 * rb;
  for (int64_t t = 0; t < T; ++t) {
    // read the dword ending at byte 2t + 1 (never past a row's end): at 2t - 2, or at 0 for t = 0
    const int64_t off = t ? 2 * t - 2 : 0;
    const __m512i raw = _mm512_i32gather_epi32(vidx, base + off, 1);
    const __m512i d = _mm512_shuffle_epi8(raw, t ? dup2 : dup0);
    const __m512i lo = _mm512_and_si512(d, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(d, 4), lo4);
    __m512i u = _mm512_xor_si512(_mm512_mask_blend_epi8(__mmask64(0xAAAAAAAAAAAAAAAAull), lo, hi), eight);
    u = _mm512_mask_mov_epi32(u, pad, eight);
    _mm512_storeu_si512(pb.u.data() + t * kPanel, u);
  }
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t tg = g.gs / 4;
  for (int64_t gi = 0; gi < g.G; ++gi) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t t = gi * tg; t < (gi + 1) * tg; ++t) acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(pb.u.data() + t * kPanel), ones);
    _mm512_storeu_si512(pb.su.data() + gi * kPanel, acc);
    for (int64_t j = 0; j < rows; ++j) pb.s[gi * kPanel + j] = g.s[(n0 + j) * g.G + gi];
  }
}

template <int R>
void panel_rows(const Gemm& g, const PanelBuf& pb, int64_t n0, int64_t m0) {
  const int64_t K = g.K, tg = g.gs / 4, rows = std::min(kPanel, g.N - n0);
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  const int8_t* xr = g.x + m0 * K;
  for (int64_t gi = 0; gi < g.G; ++gi) {
    __m512i P[R];
    for (int r = 0; r < R; ++r) P[r] = _mm512_setzero_si512();
    for (int64_t t = gi * tg; t < (gi + 1) * tg; ++t) {
      const __m512i wv = _mm512_loadu_si512(pb.u.data() + t * kPanel);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t xv;
        std::memcpy(&xv, xr + r * K + 4 * t, 4);
        P[r] = _mm512_dpbusd_epi32(P[r], wv, _mm512_set1_epi32(xv));
      }
    }
    const __m512i su = _mm512_loadu_si512(pb.su.data() + gi * kPanel);
    const __m512 sv = _mm512_loadu_ps(pb.s.data() + gi * kPanel);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const __m512i I = _mm512_sub_epi32(_mm512_sub_epi32(P[r], _mm512_mullo_epi32(_mm512_set1_epi32(g.zp[m]), su)),
                                         _mm512_set1_epi32(g.corr[m * g.G + gi]));
      tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I), sv, tot[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    alignas(64) float t16[kPanel];
    _mm512_store_ps(t16, tot[r]);
    for (int64_t j = 0; j < rows; ++j) {
      const float b = g.bias ? load_float(g.bias, g.bias_t, n0 + j) : 0.f;
      const float v = std::isfinite(g.sx[m]) ? g.sx[m] * t16[j] + b : std::numeric_limits<float>::quiet_NaN();
      store_float(g.out, g.out_t, m * g.N + n0 + j, v);
    }
  }
}

// Every panel against rows [mb, me) of x.
void run_gemm_block(const Gemm& g, int64_t mb, int64_t me) {
  const int64_t panels = (g.N + kPanel - 1) / kPanel;
  par_for(0, panels, 1, [&](int64_t b, int64_t e) {
    PanelBuf pb;
    for (int64_t pi = b; pi < e; ++pi) {
      const int64_t n0 = pi * kPanel;
      repack_panel(g, n0, pb);
      for (int64_t m0 = mb; m0 < me; m0 += kGemmRows) {
        switch (std::min<int64_t>(kGemmRows, me - m0)) {
          case 1: panel_rows<1>(g, pb, n0, m0); break;
          case 2: panel_rows<2>(g, pb, n0, m0); break;
          case 3: panel_rows<3>(g, pb, n0, m0); break;
          case 4: panel_rows<4>(g, pb, n0, m0); break;
          case 5: panel_rows<5>(g, pb, n0, m0); break;
          case 6: panel_rows<6>(g, pb, n0, m0); break;
          case 7: panel_rows<7>(g, pb, n0, m0); break;
          default: panel_rows<8>(g, pb, n0, m0); break;
        }
      }
    }
  });
}

// Blocks of kGemmBlockM rows of x, each over every panel (repacked again per block: a few percent of
// a block's products), so the rows of x a panel reads stay in L2.
void run_gemm(const Gemm& g) {
  for (int64_t mb = 0; mb < g.M; mb += kGemmBlockM) run_gemm_block(g, mb, std::min(g.M, mb + kGemmBlockM));
}

// The contract: int8_int4_entry.h.
void run_kernel(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
                const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
                Scratch& ws) {
  if (M == 0 || N == 0) return;
  const int64_t gs = K / G, U = (K + kUnitK - 1) / kUnitK;
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
          corr[m * G + gi] = 8 * (_mm512_reduce_add_epi32(acc) - zp[m] * int32_t(gs));
        }
    });
    run_gemm(Gemm{M, N, K, G, gs, x, zp, ws.sxc.data(), sxp, q, s, bias, bias_t, out, out_t});
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
