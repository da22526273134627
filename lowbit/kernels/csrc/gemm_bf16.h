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
    uint16_t* o = ob + i * ldo;                                                                     \
    if (rowpost && rowpost[i] != 1.f) { /* a scaled row: its results may be subnormal */           \
      const __m512 r = _mm512_set1_ps(rowpost[i]);                                                  \
      store_exact(o, cols, _mm512_fmadd_ps(_mm512_mul_ps(c##i##0, r), s0, b0),                      \
                  _mm512_fmadd_ps(_mm512_mul_ps(c##i##1, r), s1, b1),                               \
                  _mm512_fmadd_ps(_mm512_mul_ps(c##i##2, r), s2, b2),                               \
                  _mm512_fmadd_ps(_mm512_mul_ps(c##i##3, r), s3, b3));                              \
    } else {                                                                                        \
    const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(c##i##1, s1, b1), _mm512_fmadd_ps(c##i##0, s0, b0)); \
    const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(c##i##3, s3, b3), _mm512_fmadd_ps(c##i##2, s2, b2)); \
    _mm512_mask_storeu_epi16(o, mlo, lo);                                                           \
    _mm512_mask_storeu_epi16(o + 32, mhi, hi);                                                      \
    }                                                                                               \
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
  auto mask_from = [&](int64_t start) -> __mmask32 {
    const int64_t n = cols - start;
    return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
  };
  auto load_at = [&](const float* v, int64_t j, float absent) -> __m512 {
    const int64_t n = cols - j;
    const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
    return v ? _mm512_maskz_loadu_ps(m, v + j) : _mm512_set1_ps(absent);
  };
  const __mmask32 mlo = mask_from(0), mhi = mask_from(32);
  const __m512 b0 = load_at(bias, 0, 0.f), b1 = load_at(bias, 16, 0.f), b2 = load_at(bias, 32, 0.f), b3 = load_at(bias, 48, 0.f);
  const __m512 s0 = load_at(colscale, 0, 1.f), s1 = load_at(colscale, 16, 1.f), s2 = load_at(colscale, 32, 1.f);
  const __m512 s3 = load_at(colscale, 48, 1.f);
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

// out (M, N) bf16 = (x (M, K) bf16 (row stride ldx, unit column stride) @ P.T) * colscale + bias, P's panels
// made by `pack`; colscale and bias float32 (N,) or nullptr (1 and 0). K even. Call only on a CPU with
// avx512bf16.
template <typename Packer>
LOWBIT_BF16 void gemm(const uint16_t* x, int64_t ldx, int64_t M, int64_t N, int64_t K, const Packer& pack, const float* bias,
                      uint16_t* out, const float* colscale = nullptr) {
  TORCH_CHECK(K % 2 == 0, "gemm_bf16: K must be even, got ", K);
  // rows below 2^kScaleTop: a scaled copy of x (rows of Kp, a multiple of 32, zero padded) and 2^-j per row
  std::vector<uint16_t> xs;
  std::vector<float> rowpost;
  if (any_row_below(x, ldx, M, K)) {
    const int64_t Kp = (K + 31) / 32 * 32;
    xs.assign(size_t(M * Kp), 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(xs.data() + m * Kp, x + m * ldx, size_t(K) * 2);
    std::vector<double> post(static_cast<size_t>(M));
    lowbit::scale_rows_bf16(xs.data(), M, Kp, Kp, kScaleTop, post.data());
    rowpost.assign(post.begin(), post.end());  // 2^-j, j <= 127: exact in float32
    x = xs.data();
    ldx = Kp;
  }
  const float* rp = rowpost.empty() ? nullptr : rowpost.data();
  const int64_t panels = (N + kNR - 1) / kNR, tiles = (M + kMR - 1) / kMR;
  const int64_t splits = lowbit::m_splits(panels, tiles, 1.0);
  const int64_t per_split = (tiles + splits - 1) / splits;
  const bool blocks = K > kKC;
  lowbit::par_for(0, panels * splits, 1, [&](int64_t begin, int64_t end) {
    uint8_t* panel = panel_buffer();
    thread_local std::vector<float> run_keep;
    alignas(64) float one_tile[kMR * kNR];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / splits, s = item % splits;
      const int64_t n0 = p * kNR, cols = std::min(kNR, N - n0);
      const int64_t t0 = s * per_split, t1 = std::min(tiles, t0 + per_split);
      if (t0 >= t1) continue;
      float* running = one_tile;
      if (blocks) {  // one 6 x 64 float32 tile per m-tile of the run, 64-byte aligned
        run_keep.resize(size_t((t1 - t0) * kMR * kNR + 16));
        running = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(run_keep.data()) + 63) & ~uintptr_t(63));
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        const bool first = k0 == 0, last = k0 + kc >= K;
        pack(n0, cols, k0, kc, panel);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m = t * kMR, mr = std::min<int64_t>(kMR, M - m);
          float* c = blocks ? running + (t - t0) * kMR * kNR : one_tile;
          micro_any(int(mr), x + m * ldx + k0, ldx, panel, kc / 2, c, first, last ? out + m * N + n0 : nullptr, N,
                    rp ? rp + m : nullptr, colscale ? colscale + n0 : nullptr, bias ? bias + n0 : nullptr, cols);
        }
      }
    }
  });
}

#undef LOWBIT_BF16

}  // namespace gemm_bf16
