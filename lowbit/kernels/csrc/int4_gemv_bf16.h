// The int4 weight-only GEMV for bf16 x (int4_cpu.cpp's gemv_bf16 and gemv_bf16_act), its copy of x and the
// helpers the file's other bf16 paths share (scaled_copy, store_out, and NibbleLut, gemm_small_bf16's bf16
// q - zp tables): nibbles become bf16 16 + q in a shift and a ternary-logic op, vdpbf16ps against x permuted
// once per call, a per-lane group scale, the 16 + zp offset removed per row from per-group sums of x
// (int4_cpu.cpp's header comment). AVX-512 F/BW/VL + BF16 (+ VBMI through int4_panels.h); included by
// int4_cpu.cpp only.
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_scale.h"
#include "int4_panels.h"
#include "parallel.h"
#include "prefetch.h"

namespace lowbit::int4 {

// Rows of bf16 x are scaled so that their largest value is 2^kScaleTop .. 2^(kScaleTop + 1) (j >= 0:
// only rows below that are scaled): as large as ordinary activations, no larger, since the group scale
// multiplies the scaled sums in float32 (a larger 2^j could overflow where the unscaled sum would not),
// and large enough that the GEMV's products with 16 + q (>= 2^4) and their sums are far from subnormal.
constexpr int kScaleTop = 0;

// x's rows (M, K), row stride ldx, K % 32 == 0, copied and scaled (lowbit::scale_rows_bf16): the copy,
// rows of K, and post[m] = 2^-j.
inline std::vector<uint16_t> scaled_copy(const c10::BFloat16* x, int64_t M, int64_t K, int64_t ldx, std::vector<double>& post) {
  std::vector<uint16_t> xs(M * K);
  for (int64_t m = 0; m < M; ++m) std::memcpy(xs.data() + m * K, x + m * ldx, K * sizeof(uint16_t));
  post.assign(M, 1.0);
  lowbit::scale_rows_bf16(xs.data(), M, K, K, kScaleTop, post.data());
  return xs;
}

inline void store_out(void* out, at::ScalarType t, int64_t i, float v) {
  if (t == at::kBFloat16) static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v);
  else if (t == at::kHalf) static_cast<c10::Half*>(out)[i] = c10::Half(v);
  else static_cast<float*>(out)[i] = v;
}

// ---- GEMV, bf16 x ------------------------------------------------------------------------------

// Per call: x (each row scaled by 2^j, scaled_copy) permuted per 128-element chunk so that word i of
// vector j (j = 0..3) is element 4i + j (the order the 64 packed bytes unpack to with 16-bit shifts),
// zero padded to whole chunks; per-group sums of the scaled x; 2^-j per row.
struct XPerm {
  std::vector<uint16_t> xq;  // (M, C * 128)
  std::vector<float> sx;     // (M, G)
  std::vector<double> post;  // (M)
  int64_t C;
};

inline XPerm permute_x(const c10::BFloat16* x, int64_t M, int64_t K, int64_t ldx, int64_t G, int64_t gs) {
  XPerm p;
  p.C = (K + 127) / 128;
  p.xq.assign(M * p.C * 128, 0);
  p.sx.assign(M * G, 0.f);
  const std::vector<uint16_t> xs = scaled_copy(x, M, K, ldx, p.post);
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = xs.data() + m * K;
    uint16_t* d = p.xq.data() + m * p.C * 128;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = k / 128, e = k % 128;
      d[c * 128 + (e % 4) * 32 + e / 4] = xr[k];
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      p.sx[m * G + g] = _mm512_reduce_add_ps(acc);
    }
  }
  return p;
}

// ---- nibbles to bf16 (q - zp) through a table ----------------------------------------------------
//
// A word of an unpacked vector holds a nibble in its low 4 bits (the next nibble's bits above it, unless
// masked); vpermw / vpermt2w look it up in a table of bf16 (q - zp) values: exact (|q - zp| <= 143 < 2^8),
// so every product x * (q - zp) is exact in float32 and nothing is removed after the sums (an offset of
// 128 + q removed as s (128 + zp) sum(x) left an absolute error of ~2^-24 * 128 * s * sum|x| in every
// output). gemm_small_bf16 uses it; the GEMV does not: on Zen 4 a lookup (1 a cycle) costs twice a
// ternary-logic op (2 a cycle) and the GEMV ran 1.06-1.52x slower with it (README, "Int4's bf16 GEMM at
// small M multiplies by q - zp"). Tables: index zp + 128 for an int8 zero point,
// kLutSym for two's complement nibbles (bf16(q) of the nibble's q), kLutQ for bf16(nibble) (a float zero
// point, removed once per group after the sums as before). 32 words each, words 16..31 equal to 0..15, so
// that a one-table lookup ignores bit 4 of the index.
constexpr int kLutSym = 256, kLutQ = 257;

struct NibbleLut {
  alignas(64) uint16_t t[258][32];
  NibbleLut() {
    for (int z = 0; z < 258; ++z)
      for (int i = 0; i < 32; ++i) {
        const int q = i & 15;
        const float v = z == kLutSym ? float((q ^ 8) - 8) : z == kLutQ ? float(q) : float(q - (z - 128));
        t[z][i] = c10::BFloat16(v).x;
      }
  }
};

inline const NibbleLut& nibble_lut() {
  static const NibbleLut lut;
  return lut;
}

// How a chunk of 128 elements (a vector's word w is in the chunk's group w / (gs / 4)) finds its tables:
// kOne: one group per chunk, or one table for every group (symmetric, float zero point); kTwo: two groups
// (gs = 64, int8 zero points), the index's bit 4 picks the half; kFour: four (gs = 32), vpermt2w's bits 4-5.
enum LutMode { kOne = 0, kTwo = 1, kFour = 2 };

inline LutMode lut_mode(const W4& w) {
  if (!w.zp || w.gs >= 128) return kOne;
  return w.gs == 64 ? kTwo : kFour;
}

inline int lut_index(const W4& w, int64_t n, int64_t g) {
  return w.zp ? int(w.zp[n * w.G + g]) + 128 : w.zf ? kLutQ : kLutSym;
}

// Bits the index gets above the nibble: the group's half (kTwo) or quarter (kFour) of the table.
template <int LM>
inline __m512i lut_group_bits() {
  alignas(64) uint16_t b[32];
  for (int i = 0; i < 32; ++i) b[i] = LM == kTwo ? uint16_t((i / 16) * 16) : LM == kFour ? uint16_t((i / 8) * 16) : 0;
  return _mm512_load_si512(b);
}

// Row n's tables for chunk c (groups past the last reuse it: those weights face zero padding of x).
template <int LM>
struct LutTables {
  __m512i a, b;
  LutTables(const W4& w, int64_t n, int64_t c) {
    const NibbleLut& l = nibble_lut();
    if constexpr (LM == kOne) {
      a = _mm512_load_si512(l.t[lut_index(w, n, w.zp ? (c * 128) >> w.lg : 0)]);
      b = a;
    } else {
      constexpr int ng = LM == kTwo ? 2 : 4;
      int idx[4];
      for (int i = 0; i < ng; ++i) idx[i] = lut_index(w, n, std::min<int64_t>(c * ng + i, w.G - 1));
      const auto pair = [&](int i, int j) {
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256(reinterpret_cast<const __m256i*>(l.t[i]))),
                                  _mm256_load_si256(reinterpret_cast<const __m256i*>(l.t[j])), 1);
      };
      a = pair(idx[0], idx[1]);
      b = LM == kFour ? pair(idx[2], idx[3]) : a;
    }
  }
  // nib: words whose low 4 bits are the nibbles (bits above: the next nibbles, masked here where they matter)
  inline __m512i lookup(__m512i nib, __m512i m0f, __m512i gbits) const {
    if constexpr (LM == kOne) return _mm512_permutexvar_epi16(nib, a);
    const __m512i idx = _mm512_ternarylogic_epi32(nib, m0f, gbits, kAndOr);
    if constexpr (LM == kTwo) return _mm512_permutexvar_epi16(idx, a);
    return _mm512_permutex2var_epi16(a, idx, b);
  }
};

constexpr int64_t kScaleAheadRows = 16;

// The scales and zero points are separate streams the weight prefetch does not cover; with small groups they
// are 1/4 (g32) of the weight bytes, and missing them stalled the GEMV 4x when the weight came from DRAM.
// Prefetch the rows kScaleAheadRows ahead of the R rows at n0.
inline void prefetch_scales_ahead(const W4& w, int64_t n0, int R) {
  if (n0 + kScaleAheadRows + R > w.N) return;
  const int64_t G = w.G;
  const char* sa = reinterpret_cast<const char*>(w.s + (n0 + kScaleAheadRows) * G);
  for (int64_t b = 0; b < R * G * 4; b += 64) _mm_prefetch(sa + b, _MM_HINT_T0);
  if (w.zp) {
    const char* za = reinterpret_cast<const char*>(w.zp + (n0 + kScaleAheadRows) * G);
    for (int64_t b = 0; b < R * G; b += 64) _mm_prefetch(za + b, _MM_HINT_T0);
  } else if (w.zf) {
    const char* za = reinterpret_cast<const char*>(w.zf + (n0 + kScaleAheadRows) * G);
    for (int64_t b = 0; b < R * G * 4; b += 64) _mm_prefetch(za + b, _MM_HINT_T0);
  }
}

// The GEMV's results of R rows of W (n0 ..) x MM rows of x (m0 ..) from their scaled sums tot: minus the
// constant part sum_g s_g (off + zp_g) sx_g (s_g (off + zp_g) once per row of W, an FMA per row of x),
// times 2^-j, plus the bias. off: 16, or 24 for two's complement nibbles (16 + (nibble ^ 8) = 24 + q).
template <int R, int MM>
inline void finish_rows(const W4& w, const XPerm& p, int64_t n0, int64_t m0, const __m512 (&tot)[R][MM], const float* bias, void* out,
                        at::ScalarType ot) {
  const int64_t G = w.G;
  const float off = asym(w) ? 16.f : 24.f;
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    __m512 corr[MM];
    for (int m = 0; m < MM; ++m) corr[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 gm = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1);
      __m512 z = _mm512_set1_ps(off);
      if (w.zp) z = _mm512_add_ps(z, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(gm, w.zp + n * G + g))));
      else if (w.zf) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(gm, w.zf + n * G + g));
      const __m512 cz = _mm512_mul_ps(_mm512_maskz_loadu_ps(gm, w.s + n * G + g), z);
      for (int m = 0; m < MM; ++m) corr[m] = _mm512_fmadd_ps(cz, _mm512_maskz_loadu_ps(gm, p.sx.data() + (m0 + m) * G + g), corr[m]);
    }
    for (int m = 0; m < MM; ++m) {
      float v = lowbit::unscale(_mm512_reduce_add_ps(_mm512_sub_ps(tot[r][m], corr[m])), p.post[m0 + m]);
      if (bias) v += bias[n];
      store_out(out, ot, (m0 + m) * w.N + n, v);
    }
  }
}

// R rows of W (n0 .. n0 + R) x MM rows of x (m0 .. m0 + MM). first: the first block of x's rows for these
// rows of W (it prefetches the weight and the scales; later blocks find them in L1 / L2). The sums of a
// pair (row of W, row of x) are the same operations in the same order whatever R, MM, MEM and m0 are, so
// a row of the result does not depend on the other rows of x.
// MEM (M > 1, R = 4, MM <= 4): the unpacked weight vectors and lane scales also go to an L1 array that the
// products read. Measured on Zen 4 (session 25), this is the form GCC compiles best at M > 1: it keeps the
// 4R weight vectors and x's 4 vectors of a row in registers and the R x MM sums in L1 (a load and a store
// per four products); the register-only form at R = 2..4 ran 10-40% slower at M = 4..16, a form with the
// sums explicitly in L1 ~8% slower (benchmarks/results/avx512_zen4/scratch/int4_gemv_m16_variants_session25.txt).
template <int R, int MM, bool MEM>
inline void gemv_bf16_rows(const W4& w, const XPerm& p, int64_t n0, int64_t m0, bool first, const float* bias, void* out,
                           at::ScalarType ot) {
  const int64_t C = p.C, rb = w.rb, gs = w.gs, G = w.G;
  const __m512i m78 = _mm512_set1_epi16(0x78);
  const __m512i magic = _mm512_set1_epi16(asym(w) ? 0x4180 : 0x41C0);
  // group of fp32 lane l in a chunk: lane l covers chunk elements [8l, 8l + 8)
  alignas(64) int32_t gidx[16];
  for (int l = 0; l < 16; ++l) gidx[l] = gs < 128 ? int32_t(8 * l / gs) : 0;
  const __m512i gi = _mm512_load_si512(gidx);
  const int64_t gpc = gs < 128 ? 128 / gs : 0;  // groups per chunk (small groups)
  __m512 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_setzero_ps();
  const uint8_t* qr[R];
  const float* sr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = w.q + (n0 + r) * rb;
    sr[r] = w.s + (n0 + r) * G;
  }
  const uint16_t* xb = p.xq.data() + m0 * C * 128;
  if (first) prefetch_scales_ahead(w, n0, R);
  const int64_t tail_bytes = rb - (C - 1) * 64;  // 1..64
  const __mmask64 tail_mask = tail_bytes >= 64 ? ~__mmask64(0) : ((__mmask64(1) << tail_bytes) - 1);
  for (int64_t c = 0; c < C; ++c) {
    const uint16_t* xc = xb + c * 128;
    const __mmask64 bm = c + 1 < C ? ~__mmask64(0) : tail_mask;
    __mmask16 sm = 0xFFFF;
    if (gs < 128) {
      const int64_t left = G - c * gpc;
      sm = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    }
    __m512bh wv[R][4];
    __m512 sv[R];
    alignas(64) __m512i wb[MEM ? R : 1][4];
    alignas(64) __m512 sb[MEM ? R : 1];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (first) lowbit::prefetch_stream(qr[r] + c * 64);
      const __m512i v = c + 1 < C ? _mm512_loadu_si512(qr[r] + c * 64) : _mm512_maskz_loadu_epi8(bm, qr[r] + c * 64);
      // nibble j (bits 4j .. 4j + 3 of a word) to mantissa bits 3 .. 6 under 16.0's exponent: 16 + q
      wv[r][0] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(v, 3), m78, magic, kAndXor);
      wv[r][1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 1), m78, magic, kAndXor);
      wv[r][2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 5), m78, magic, kAndXor);
      wv[r][3] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 9), m78, magic, kAndXor);
      if (gs < 128) sv[r] = _mm512_permutexvar_ps(gi, _mm512_maskz_loadu_ps(sm, sr[r] + c * gpc));
      else sv[r] = _mm512_set1_ps(sr[r][(c * 128) >> w.lg]);
      if constexpr (MEM) {
        for (int j = 0; j < 4; ++j) wb[r][j] = (__m512i)wv[r][j];
        sb[r] = sv[r];
      }
    }
    if constexpr (MEM) asm volatile("" ::: "memory");  // the products read wb / sb back (see above)
#pragma GCC unroll 16
    for (int m = 0; m < MM; ++m) {
      const uint16_t* xm = xc + m * C * 128;
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xm), x1 = (__m512bh)_mm512_loadu_si512(xm + 32);
      const __m512bh x2 = (__m512bh)_mm512_loadu_si512(xm + 64), x3 = (__m512bh)_mm512_loadu_si512(xm + 96);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const auto wj = [&](int j) {
          if constexpr (MEM) return (__m512bh)_mm512_load_si512(&wb[r][j]);
          else return wv[r][j];
        };
        // one chain of four products, one FMA by the group scales: 5 ops a pair a chunk
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), wj(0), x0);
        a = _mm512_dpbf16_ps(a, wj(1), x1);
        a = _mm512_dpbf16_ps(a, wj(2), x2);
        a = _mm512_dpbf16_ps(a, wj(3), x3);
        if constexpr (MEM) tot[r][m] = _mm512_fmadd_ps(a, _mm512_load_ps(reinterpret_cast<const float*>(&sb[r])), tot[r][m]);
        else tot[r][m] = _mm512_fmadd_ps(a, sv[r], tot[r][m]);
      }
    }
  }
  finish_rows<R, MM>(w, p, n0, m0, tot, bias, out, ot);
}

#ifndef KGEMVROWS
#define KGEMVROWS 4
#endif
constexpr int kGemvRows = KGEMVROWS;  // rows of W per step at M = 1 (registers)
constexpr int kGemvRowsM = 4;         // rows of W per step at M > 1 (sums in L1: gemv_bf16_rows' MEM)
constexpr int kGemvBlockM = 4;        // rows of x per pass over a step's rows of W (M > 1)
constexpr int64_t kGemvMaxM = 16;     // gemv_bf16's largest M

// mm (1..4) rows of x at m0 against R rows of W at n0 (gemv_bf16_rows).
template <int R, bool MEM>
inline void gemv_bf16_block(int mm, const W4& w, const XPerm& p, int64_t n0, int64_t m0, bool first, const float* bias, void* out,
                            at::ScalarType ot) {
  static_assert(kGemvBlockM == 4, "the switch below takes 1..4 rows of x");
  switch (mm) {
    case 1: gemv_bf16_rows<R, 1, MEM>(w, p, n0, m0, first, bias, out, ot); break;
    case 2: gemv_bf16_rows<R, 2, MEM>(w, p, n0, m0, first, bias, out, ot); break;
    case 3: gemv_bf16_rows<R, 3, MEM>(w, p, n0, m0, first, bias, out, ot); break;
    default: gemv_bf16_rows<R, 4, MEM>(w, p, n0, m0, first, bias, out, ot); break;
  }
}

// 1 <= M <= kGemvMaxM: x's rows in nblk balanced blocks of at most kGemvBlockM, every block against a step's
// R rows of W while they are in L1.
inline void gemv_bf16_impl(const W4& w, const XPerm& p, int64_t M, const float* bias, void* out, at::ScalarType ot) {
  const int64_t nblk = (M + kGemvBlockM - 1) / kGemvBlockM;
  int64_t bm0[kGemvMaxM + 1];
  for (int64_t b = 0; b <= nblk; ++b) bm0[b] = b * M / nblk;
  const auto run = [&](auto rows, auto mem) {
    constexpr int R = decltype(rows)::value;
    constexpr bool MEM = decltype(mem)::value;
    const int64_t nb = (w.N + R - 1) / R;
    par_for(0, nb, 4, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n0 = i * R;
        for (int64_t k = 0; k < nblk; ++k) {
          const int mm = int(bm0[k + 1] - bm0[k]);
          if (n0 + R <= w.N) gemv_bf16_block<R, MEM>(mm, w, p, n0, bm0[k], k == 0, bias, out, ot);
          else  // the last rows of W one at a time
            for (int64_t n = n0; n < w.N; ++n) gemv_bf16_block<1, false>(mm, w, p, n, bm0[k], k == 0, bias, out, ot);
        }
      }
    });
  };
  if (M == 1) run(std::integral_constant<int, kGemvRows>{}, std::false_type{});
  else run(std::integral_constant<int, kGemvRowsM>{}, std::true_type{});
}

}  // namespace lowbit::int4
