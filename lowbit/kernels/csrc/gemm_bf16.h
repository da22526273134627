// gemm_bf16: out (M, N) = x (M, K) @ W.T (+ bias) for bf16 x and a quantized weight W that is made bf16
// inside the GEMM, one L2-resident panel at a time (AVX-512 BF16). The weight stays in its canonical
// layout; nothing is kept between calls. Included by int8_gemv.cpp's AVX-512 build (int8 weight-only at
// large M); every function here carries its own target attribute, and callers run it only where the
// CPU has avx512bf16.
//
// Each call packs one panel of 64 weight rows by up to kKC columns of k at a time into a per-thread
// buffer (64 x 4096 bf16 = 512 KiB: Zen 4's L2 is 1 MiB). The packer (a template argument) writes the
// panel's values as bf16, in k-pairs: pair p of the 64 rows is 256 contiguous bytes, zmm v holding rows
// 16v..16v+15, lane l the bf16 pair (W[16v + l, 2p], W[16v + l, 2p + 1]). The microkernel keeps a 6 x 64
// tile of float32 accumulators in 24 zmm; per k-pair it loads the panel's 4 vectors once and, per row
// of x, broadcasts that row's pair into 4 vdpbf16ps. The sum over k runs in float32 (vdpbf16ps: each
// pair's two products added, then to the accumulator), K blocks in order through a per-thread float32
// tile of M x 64, and the last block multiplies by a per-column scale (where the packer leaves it out of
// the panel: float8 weights, exact in bf16) and adds the bias in float32, one fma, one rounding to bf16.
//
// vdpbf16ps treats bf16 subnormal inputs as zero and flushes subnormal products and sums whatever MXCSR
// says. So, as the GEMVs do (bf16_scale.h), a row of x whose largest value is below 2^kScaleTop is copied
// scaled by 2^j (exact) and its results multiplied by 2^-j (exact unless they are subnormal: then one
// rounding) before the column scale and bias; rows at or above it (ordinary activations) are used as
// they are, and when every row is, x is not copied at all.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

// bf16_scale.h needs AVX-512 BF16, which a build including this header may not require (int8_gemv's):
// compiled for it here, run only where the CPU has it, like everything in this header.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include "bf16_scale.h"
#pragma GCC pop_options
#include "amx.h"
#include "panel.h"
#include "parallel.h"

namespace gemm_bf16 {

constexpr int kMR = 6;          // rows of x per microkernel call
constexpr int64_t kNR = 64;     // weight rows (output columns) per panel: 4 zmm
constexpr int64_t kKC = 4096;   // k per packed panel (a multiple of 32)
constexpr int64_t kPairBytes = kNR * 4;
constexpr int kScaleTop = 0;    // rows of x with a largest |value| below 2^kScaleTop are scaled (see above)

#define LOWBIT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// acc += vdpbf16ps(a, b), in place (an asm operand: gcc 12 spills arrays of intrinsic accumulators, see
// gemm_i8.h's dpbusd).
LOWBIT_BF16 inline void dpbf16(__m512& acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
}

inline int32_t load_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Rows m .. m + MR of x (lda) against the panel's `pairs` k-pairs. c (float32, ldc = 64): the running
// tile of earlier K blocks (read unless `first`), written back unless `ob` is set; ob: the last block,
// where (tile * rowpost[i]) * colscale + bias (`rowpost` + m, `colscale` + n0 and `bias` + n0, each
// nullptr: 1, 1 and 0) is rounded to bf16 into ob (ldo), `cols` columns.
#define LB_ACC(i)                                                                                   \
  __m512 c##i##0, c##i##1, c##i##2, c##i##3;                                                        \
  if constexpr (MR > i) {                                                                           \
    if (first) {                                                                                    \
      c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm512_setzero_ps();                                  \
    } else {                                                                                        \
      c##i##0 = _mm512_load_ps(c + i * kNR);                                                        \
      c##i##1 = _mm512_load_ps(c + i * kNR + 16);                                                   \
      c##i##2 = _mm512_load_ps(c + i * kNR + 32);                                                   \
      c##i##3 = _mm512_load_ps(c + i * kNR + 48);                                                   \
    }                                                                                               \
  }
#define LB_ROW(i)                                                                                   \
  if constexpr (MR > i) {                                                                           \
    const __m512i xv = _mm512_set1_epi32(load_pair(a + i * lda + 2 * q));                           \
    dpbf16(c##i##0, w0, xv);                                                                        \
    dpbf16(c##i##1, w1, xv);                                                                        \
    dpbf16(c##i##2, w2, xv);                                                                        \
    dpbf16(c##i##3, w3, xv);                                                                        \
  }
#define LB_KEEP(i)                                                                                  \
  if constexpr (MR > i) {                                                                           \
    _mm512_store_ps(c + i * kNR, c##i##0);                                                          \
    _mm512_store_ps(c + i * kNR + 16, c##i##1);                                                     \
    _mm512_store_ps(c + i * kNR + 32, c##i##2);                                                     \
    _mm512_store_ps(c + i * kNR + 48, c##i##3);                                                     \
  }
#define LB_OUT(i)                                                                                   \
  if constexpr (MR > i) {                                                                           \
    finish_row(ob + i * ldo, c##i##0, c##i##1, c##i##2, c##i##3, rowpost ? rowpost[i] : 1.f, ep);   \
  }

// The first `cols` of 64 float32 values (v0..v3) rounded to bf16 one by one as c10::BFloat16 rounds
// (nearest even), subnormal results included: vcvtne2ps2bf16 would read float32 subnormals as zero.
LOWBIT_BF16 inline void store_exact(uint16_t* o, int64_t cols, __m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  alignas(64) float t[kNR];
  _mm512_store_ps(t, v0);
  _mm512_store_ps(t + 16, v1);
  _mm512_store_ps(t + 32, v2);
  _mm512_store_ps(t + 48, v3);
  for (int64_t j = 0; j < std::min(cols, kNR); ++j) o[j] = c10::BFloat16(t[j]).x;
}

// A tile's last step, shared by the AVX-512 and AMX kernels: per column scale (1 where absent) and bias (0),
// masks for the first `cols` of 64 columns.
struct Epilogue {
  __m512 s[4], b[4];
  __mmask32 mlo, mhi;
  int64_t cols;
};

LOWBIT_BF16 inline Epilogue make_epilogue(const float* colscale, const float* bias, int64_t cols) {
  Epilogue e;
  e.cols = cols;
  auto mask_from = [&](int64_t start) -> __mmask32 {
    const int64_t n = cols - start;
    return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
  };
  auto load_at = [&](const float* v, int64_t j, float absent) -> __m512 {
    const int64_t n = cols - j;
    const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
    return v ? _mm512_maskz_loadu_ps(m, v + j) : _mm512_set1_ps(absent);
  };
  e.mlo = mask_from(0);
  e.mhi = mask_from(32);
  for (int j = 0; j < 4; ++j) {
    e.b[j] = load_at(bias, 16 * j, 0.f);
    e.s[j] = load_at(colscale, 16 * j, 1.f);
  }
  return e;
}

// Lanes of v that are subnormal or NaN: |v|'s bits minus 1 below 2^23 - 1 (subnormal), or above infinity's.
LOWBIT_BF16 inline __mmask16 odd_lanes(__m512 v) {
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_cmplt_epu32_mask(_mm512_sub_epi32(a, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x007FFFFF)) |
         _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000));
}

// One row of a finished tile, 64 float32 sums v0..v3: (v * post) * s + b rounded to bf16 into o. post != 1
// (a scaled row of x, or a per-row factor: gemm's rowscale): a result may be subnormal or NaN, where
// vcvtne2ps2bf16 differs from c10::BFloat16 (it reads float32 subnormals as zero and keeps a NaN's payload), so
// such a row goes through store_exact; others (every lane normal, zero or infinite) round with the instruction.
LOWBIT_BF16 inline void finish_row(uint16_t* o, __m512 v0, __m512 v1, __m512 v2, __m512 v3, float post,
                                   const Epilogue& e) {
  if (post != 1.f) {
    const __m512 r = _mm512_set1_ps(post);
    v0 = _mm512_fmadd_ps(_mm512_mul_ps(v0, r), e.s[0], e.b[0]);
    v1 = _mm512_fmadd_ps(_mm512_mul_ps(v1, r), e.s[1], e.b[1]);
    v2 = _mm512_fmadd_ps(_mm512_mul_ps(v2, r), e.s[2], e.b[2]);
    v3 = _mm512_fmadd_ps(_mm512_mul_ps(v3, r), e.s[3], e.b[3]);
    if (odd_lanes(v0) | odd_lanes(v1) | odd_lanes(v2) | odd_lanes(v3)) {
      store_exact(o, e.cols, v0, v1, v2, v3);
      return;
    }
    _mm512_mask_storeu_epi16(o, e.mlo, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
    _mm512_mask_storeu_epi16(o + 32, e.mhi, (__m512i)_mm512_cvtne2ps_pbh(v3, v2));
    return;
  }
  const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(v1, e.s[1], e.b[1]), _mm512_fmadd_ps(v0, e.s[0], e.b[0]));
  const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(v3, e.s[3], e.b[3]), _mm512_fmadd_ps(v2, e.s[2], e.b[2]));
  _mm512_mask_storeu_epi16(o, e.mlo, lo);
  _mm512_mask_storeu_epi16(o + 32, e.mhi, hi);
}

template <int MR>
LOWBIT_BF16 void micro(const uint16_t* a, int64_t lda, const uint8_t* panel, int64_t pairs, float* c, bool first,
                       uint16_t* ob, int64_t ldo, const float* rowpost, const float* colscale, const float* bias,
                       int64_t cols) {
  static_assert(MR >= 1 && MR <= kMR, "micro: 1 to 6 rows");
  LB_ACC(0) LB_ACC(1) LB_ACC(2) LB_ACC(3) LB_ACC(4) LB_ACC(5)
  for (int64_t q = 0; q < pairs; ++q) {
    const uint8_t* p = panel + q * kPairBytes;
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
    const __m512i w2 = _mm512_loadu_si512(p + 128), w3 = _mm512_loadu_si512(p + 192);
    LB_ROW(0) LB_ROW(1) LB_ROW(2) LB_ROW(3) LB_ROW(4) LB_ROW(5)
  }
  if (!ob) {
    LB_KEEP(0) LB_KEEP(1) LB_KEEP(2) LB_KEEP(3) LB_KEEP(4) LB_KEEP(5)
    return;
  }
  const Epilogue ep = make_epilogue(colscale, bias, cols);
  LB_OUT(0) LB_OUT(1) LB_OUT(2) LB_OUT(3) LB_OUT(4) LB_OUT(5)
}
#undef LB_ACC
#undef LB_ROW
#undef LB_KEEP
#undef LB_OUT

LOWBIT_BF16 inline void micro_any(int mr, const uint16_t* a, int64_t lda, const uint8_t* panel, int64_t pairs, float* c,
                                  bool first, uint16_t* ob, int64_t ldo, const float* rowpost, const float* colscale,
                                  const float* bias, int64_t cols) {
  static_assert(kMR == 6, "micro_any dispatches 1..6 rows");
  switch (mr) {
    case 6: return micro<6>(a, lda, panel, pairs, c, first, ob, ldo, rowpost, colscale, bias, cols);
    case 5: return micro<5>(a, lda, panel, pairs, c, first, ob, ldo, rowpost, colscale, bias, cols);
    case 4: return micro<4>(a, lda, panel, pairs, c, first, ob, ldo, rowpost, colscale, bias, cols);
    case 3: return micro<3>(a, lda, panel, pairs, c, first, ob, ldo, rowpost, colscale, bias, cols);
    case 2: return micro<2>(a, lda, panel, pairs, c, first, ob, ldo, rowpost, colscale, bias, cols);
    default: return micro<1>(a, lda, panel, pairs, c, first, ob, ldo, rowpost, colscale, bias, cols);
  }
}

// Rows n0 .. n0 + rows (rows <= 64) of an int8 weight w (N, K) with a float32 scale (N, G), groups of
// gs = K / G (a multiple of 16), as the panel of columns [k0, k0 + kc): bf16(float(q) * s[n, k / gs]),
// the reference's dequantized values bit for bit (dequantize_affine: one float32 product, one rounding).
// Rows past `rows` and columns past kc are zero. dst: ceil(kc / 32) * 16 pairs.
struct Int8Panels {
  const int8_t* w;
  const float* s;  // scale[n, g] at s[n * ss0 + g * ss1] (a broadcast scale has stride 0)
  int64_t ss0, ss1, K, G, gs;

  LOWBIT_BF16 void operator()(int64_t n0, int64_t rows, int64_t k0, int64_t kc, uint8_t* dst) const {
    for (int v = 0; v < 4; ++v) {
      for (int64_t k = 0; k < kc; k += 32) {
        const int64_t left = kc - k;
        const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
        const int64_t g_lo = (k0 + k) / gs, g_hi = std::min(G - 1, (k0 + k + 16) / gs);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = 16 * v + i;
          if (row >= rows) {
            r[i] = _mm512_setzero_si512();
            continue;
          }
          const int64_t n = n0 + row;
          const __m256i q = _mm256_maskz_loadu_epi8(mask, w + n * K + k0 + k);
          const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))),
                                          _mm512_set1_ps(s[n * ss0 + g_lo * ss1]));
          const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))),
                                          _mm512_set1_ps(s[n * ss0 + g_hi * ss1]));
          r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        }
        lowbit::transpose16(r);
        uint8_t* out = dst + (k / 2) * kPairBytes + v * 64;
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + p * kPairBytes, r[p]);
      }
    }
  }
};

constexpr int64_t kAmxMR = 32;  // rows of x per AMX block: 2 tiles of 16

#define LOWBIT_AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

// 32 rows of x from a (lda; every row readable for 2 * pairs columns: gemm passes a zero padded copy where x
// has fewer) against the panel's `pairs` k-pairs (a multiple of 16, the panel zero past its columns), on AMX
// tiles (amx.h; the calling thread configured them). c: the running float32 tile of 32 x 64 (ldc 64), as
// micro's: read unless `first`, written back unless `ob`, else its first `rows` rows finished into ob
// (finish_row). Per half of the panel's 64 columns, 2 x 2 tiles of 16 x 16 float32
// accumulate over k; each tdpbf16ps adds a k-pair's two products to its sum (as vdpbf16ps does, bf16
// subnormal inputs read as zero: the same scaled rows of x as micro).
LOWBIT_AMX_BF16 inline void amx_block(const uint16_t* a, int64_t lda, const uint8_t* panel, int64_t pairs, float* c,
                                      bool first, uint16_t* ob, int64_t ldo, int64_t rows, const float* rowpost,
                                      const float* colscale, const float* bias, int64_t cols) {
  const int64_t sa = lda * 2;
  const bool two = rows > 16;  // a block of at most 16 rows (a small M's only block): one A tile, two C tiles
  for (int h = 0; h < 2; ++h) {
    if (h == 1 && cols <= 32) break;  // the half past the last panel's columns: zero rows, never stored
    float* ch = c + 32 * h;
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, ch, kNR * 4);
      _tile_loadd(1, ch + 16, kNR * 4);
      if (two) {
        _tile_loadd(2, ch + 16 * kNR, kNR * 4);
        _tile_loadd(3, ch + 16 * kNR + 16, kNR * 4);
      }
    }
    const uint8_t* ph = panel + 128 * h;
    if (two) {
      // each tile loaded right after its last use in the step before (no tile renaming: a load waits for the
      // products that read the tile), so the next step's loads overlap this step's products
      _tile_loadd(4, a, sa);
      _tile_loadd(6, ph, kPairBytes);
      for (int64_t q = 0; q < pairs; q += 16) {
        const bool more = q + 16 < pairs;
        _tile_loadd(7, ph + q * kPairBytes + 64, kPairBytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, a + 16 * lda + 2 * q, sa);
        _tile_dpbf16ps(1, 4, 7);
        if (more) _tile_loadd(4, a + 2 * (q + 16), sa);
        _tile_dpbf16ps(2, 5, 6);
        if (more) _tile_loadd(6, ph + (q + 16) * kPairBytes, kPairBytes);
        _tile_dpbf16ps(3, 5, 7);
      }
    } else {  // the same order on one x tile
      _tile_loadd(4, a, sa);
      _tile_loadd(6, ph, kPairBytes);
      for (int64_t q = 0; q < pairs; q += 16) {
        const bool more = q + 16 < pairs;
        _tile_loadd(7, ph + q * kPairBytes + 64, kPairBytes);
        _tile_dpbf16ps(0, 4, 6);
        if (more) _tile_loadd(6, ph + (q + 16) * kPairBytes, kPairBytes);
        _tile_dpbf16ps(1, 4, 7);
        if (more) _tile_loadd(4, a + 2 * (q + 16), sa);
      }
    }
    _tile_stored(0, ch, kNR * 4);
    _tile_stored(1, ch + 16, kNR * 4);
    if (two) {
      _tile_stored(2, ch + 16 * kNR, kNR * 4);
      _tile_stored(3, ch + 16 * kNR + 16, kNR * 4);
    }
  }
  if (!ob) return;
  const Epilogue ep = make_epilogue(colscale, bias, cols);
  for (int64_t i = 0; i < rows; ++i) {
    const float* r = c + i * kNR;
    finish_row(ob + i * ldo, _mm512_load_ps(r), _mm512_load_ps(r + 16), _mm512_load_ps(r + 32), _mm512_load_ps(r + 48),
               rowpost ? rowpost[i] : 1.f, ep);
  }
}

// Per-thread buffers kept between calls (a fresh block per call paid page faults): the panel, and the
// float32 running tiles of M x 64 when K spans several blocks.
inline uint8_t* panel_buffer() {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < size_t(kKC / 2 * kPairBytes)) buf.resize(kKC / 2 * kPairBytes);
  return buf.data();
}

// Whether some row of x (M, K, row stride ldx) has its largest finite |value| below 2^kScaleTop (zero
// rows included: scale_rows_bf16 leaves them as they are, but they are rare enough not to matter).
LOWBIT_BF16 inline bool any_row_below(const uint16_t* x, int64_t ldx, int64_t M, int64_t K) {
  const int top = (127 + kScaleTop) << 7;  // bits of 2^kScaleTop
  for (int64_t m = 0; m < M; ++m)
    if (lowbit::max_finite_bits(x + m * ldx, K) < top) return true;
  return false;
}

// out (M, N) bf16 = ((x (M, K) bf16 (row stride ldx, unit column stride) @ P.T) * rowscale) * colscale + bias, P's
// panels made by `pack`; rowscale float32 (M,) or nullptr (1: 8da4w's activation scale, x its integer values),
// colscale and bias float32 (N,) or nullptr (1 and 0). K even. Call only on a CPU with avx512bf16.
template <typename Packer>
LOWBIT_BF16 void gemm(const uint16_t* x, int64_t ldx, int64_t M, int64_t N, int64_t K, const Packer& pack, const float* bias,
                      uint16_t* out, const float* colscale = nullptr, const float* rowscale = nullptr) {
  TORCH_CHECK(K % 2 == 0, "gemm_bf16: K must be even, got ", K);
  // rows below 2^kScaleTop: a scaled copy of x (rows of Kp, a multiple of 32, zero padded) and 2^-j per row
  std::vector<uint16_t> xs;
  std::vector<float> rowpost;
  // AMX where the CPU has it (amx.h), for every row: a row's sums do not depend on its block (tdpbf16ps adds
  // a pair's products in another order than vdpbf16ps, so a mix would make a row's bits depend on M)
  const bool amx = lowbit::amx::usable_bf16();
  const int64_t Kp = (K + 31) / 32 * 32;
  const bool scale = any_row_below(x, ldx, M, K);
  if (scale || (amx && Kp != K)) {  // a copy of x, its rows zero padded to Kp: tiles read 32 columns at a time
    xs.assign(size_t(M * Kp), 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(xs.data() + m * Kp, x + m * ldx, size_t(K) * 2);
    if (scale) {
      std::vector<double> post(static_cast<size_t>(M));
      lowbit::scale_rows_bf16(xs.data(), M, Kp, Kp, kScaleTop, post.data());
      rowpost.assign(post.begin(), post.end());  // 2^-j, j <= 127: exact in float32
    }
    x = xs.data();
    ldx = Kp;
  }
  if (rowscale) {  // 2^-j * rowscale[m]: exact (a power of two) unless the product is subnormal
    if (rowpost.empty()) rowpost.assign(rowscale, rowscale + M);
    else for (int64_t m = 0; m < M; ++m) rowpost[m] *= rowscale[m];
  }
  const float* rp = rowpost.empty() ? nullptr : rowpost.data();
  // AMX's last block of fewer than 32 rows: read from a zero padded copy (32 x Kp)
  const int64_t full = M / kAmxMR * kAmxMR;
  struct Tail;
  uint16_t* tail = nullptr;
  if (amx && full < M) {
    tail = lowbit::amx::kept<Tail, uint16_t>(size_t(kAmxMR * Kp));
    std::fill(tail, tail + kAmxMR * Kp, uint16_t(0));
    for (int64_t m = full; m < M; ++m) std::memcpy(tail + (m - full) * Kp, x + m * ldx, size_t(K) * 2);
  }
  const int64_t unit = amx ? kAmxMR : kMR;
  const int64_t panels = (N + kNR - 1) / kNR, tiles = (M + unit - 1) / unit;
  // a panel's packing costs about one 6-row micro pass, or four 32-row AMX ones (measured at 4096^2: ~1.1 ms of
  // packing in 5.8 at M = 256)
  const int64_t splits = lowbit::m_splits(panels, tiles, amx ? 4.0 : 1.0);
  const int64_t per_split = (tiles + splits - 1) / splits;
  const bool blocks = K > kKC;
  lowbit::par_for(0, panels * splits, 1, [&](int64_t begin, int64_t end) {
    uint8_t* panel = panel_buffer();
    thread_local std::vector<float> run_keep;
    alignas(64) float one_tile[kAmxMR * kNR];
    if (amx) lowbit::amx::configure();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / splits, s = item % splits;
      const int64_t n0 = p * kNR, cols = std::min(kNR, N - n0);
      const int64_t t0 = s * per_split, t1 = std::min(tiles, t0 + per_split);
      if (t0 >= t1) continue;
      float* running = one_tile;
      if (blocks) {  // one unit x 64 float32 tile per m-tile of the run, 64-byte aligned
        run_keep.resize(size_t((t1 - t0) * unit * kNR + 16));
        running = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(run_keep.data()) + 63) & ~uintptr_t(63));
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        const bool first = k0 == 0, last = k0 + kc >= K;
        pack(n0, cols, k0, kc, panel);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m0 = t * unit, rows = std::min<int64_t>(unit, M - m0);
          float* ct = blocks ? running + (t - t0) * unit * kNR : one_tile;
          if (amx) {
            const bool whole = m0 < full;
            amx_block(whole ? x + m0 * ldx + k0 : tail + k0, whole ? ldx : Kp, panel, (kc + 31) / 32 * 16, ct,
                      first, last ? out + m0 * N + n0 : nullptr, N, rows, rp ? rp + m0 : nullptr,
                      colscale ? colscale + n0 : nullptr, bias ? bias + n0 : nullptr, cols);
            continue;
          }
          for (int64_t i = 0; i < rows; i += kMR) {
            const int64_t m = m0 + i, mr = std::min<int64_t>(kMR, rows - i);
            micro_any(int(mr), x + m * ldx + k0, ldx, panel, kc / 2, ct + i * kNR, first, last ? out + m * N + n0 : nullptr,
                      N, rp ? rp + m : nullptr, colscale ? colscale + n0 : nullptr, bias ? bias + n0 : nullptr, cols);
          }
        }
      }
    }
    if (amx) lowbit::amx::release();
  });
}

#undef LOWBIT_BF16
#undef LOWBIT_AMX_BF16

}  // namespace gemm_bf16
