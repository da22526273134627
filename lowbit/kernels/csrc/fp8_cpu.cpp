// Float8 (e4m3fn / e5m2) weight-only linear on CPU (AVX-512 BW/VBMI/BF16):
//   out[m, n] = (sum_k x[m, k] * q[n, k]) * s[n] + bias[n]
// with q the float8 weight (N, K) and s a per-row (N) or per-tensor float32 scale.
//
// Conversion: every e4m3fn / e5m2 value is exactly a bf16. The 7-bit magnitude of each byte
// indexes two 128-entry byte tables (high and low byte of the bf16) with vpermt2b (64 lanes per
// instruction), the sign bit is OR-ed into the high byte, and vpunpck{l,h}bw interleaves the two
// into 16-bit words. The input bytes are permuted first (vpermb) so that the words come out in
// natural order. NaN encodings map to bf16 NaN (and so propagate), subnormals are exact.
//
// Paths (the caller picks the thresholds):
//  * bf16 x, M <= gemv_max_m (<= 4): fused GEMV. Each thread streams its rows once, 4 rows at a
//    time, converting in registers and multiplying with vdpbf16ps (float32 accumulation);
//    software prefetch (prefetch.h) ahead in the weight stream.
//  * bf16 x, M <= tiled_max_m: 4 rows are converted into a small bf16 scratch (L1), then
//    4x4 register tiles (4 rows of x, 4 weight rows) of vdpbf16ps over K; the next 4 weight rows
//    are prefetched while computing, so the weight read overlaps the arithmetic.
//  * bf16 x above that (K even): gemm_bf16.h's GEMM, its 64-row panels converted (exactly, cvt64) per
//    call inside the GEMM, in L2; the scale and bias applied to the float32 sums, one rounding.
//  * otherwise: one parallel region; each thread converts its own contiguous range of weight
//    rows, chunk by chunk, into a reused buffer in x's compute dtype that stays in cache and
//    multiplies each chunk with a serial at::mm into the output slice.
//  * float32 / float16 x: the weight is converted to float32 (small M: per 4 rows, float32 FMA;
//    large M: chunks + at::mm in float32); float16 x is computed in float32, cast at the end.
// The scale (and bias) is applied to the float32 result (GEMV/tiled) or to the output (chunks).
// vdpbf16ps ignores MXCSR and always reads subnormal inputs as zero and flushes subnormal results
// (products, partial sums): on the GEMV/tiled paths each row of the bf16 copy of x is first scaled by
// a power of two 2^j (exact; scale_rows_bf16), as large as the sums allow without overflow, and its
// results by 2^-j together with the scale, in double (post_scale): the plain float32 result, with no
// flushing unless an element is below 2^-126 after scaling (negligible next to the row's maximum).
// fp8_linear_act: float8 dynamic activations (fp8_act.h's fake quantization) fused into the padded copy
// of x on the GEMV/tiled paths (the values fake_quant_fp8 returns, in x's dtype; float16 widened to
// float32); above tiled_max_m x is fake-quantized first, then the chunks run as usual.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#include "bf16_scale.h"
#include "fp8_act.h"
#include "fp8_special.h"
#include "gemm_bf16.h"
#include "parallel.h"
#include "prefetch.h"

namespace {

using lowbit::par_for;

struct Tables {
  __m512i hlo, hhi, llo, lhi, perm, sign;
};

inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);  // exact for every float8 value
}

float e4m3fn_value(int m) {  // magnitude byte 0..127
  const int e = m >> 3, f = m & 7;
  if (m == 0x7F) return NAN;
  if (e == 0) return std::ldexp(static_cast<float>(f), -9);
  return std::ldexp(static_cast<float>(8 + f), e - 10);
}

float e5m2_value(int m) {
  const int e = m >> 2, f = m & 3;
  if (e == 31) return f ? NAN : INFINITY;
  if (e == 0) return std::ldexp(static_cast<float>(f), -16);
  return std::ldexp(static_cast<float>(4 + f), e - 17);
}

Tables make_tables(bool e5m2) {
  alignas(64) uint8_t hi[128], lo[128], perm[64];
  for (int m = 0; m < 128; ++m) {
    const uint16_t b = bf16_bits(e5m2 ? e5m2_value(m) : e4m3fn_value(m));
    hi[m] = static_cast<uint8_t>(b >> 8);
    lo[m] = static_cast<uint8_t>(b & 0xFF);
  }
  // unpacklo_epi8 takes bytes 0-7 of each 128-bit lane, unpackhi bytes 8-15: place element
  // 8j+i (i < 8) at byte 16j+i and element 32+8j+i at byte 16j+8+i.
  for (int p = 0; p < 64; ++p) {
    const int j = p / 16, i = p % 16;
    perm[p] = static_cast<uint8_t>(i < 8 ? 8 * j + i : 32 + 8 * j + (i - 8));
  }
  Tables t;
  t.hlo = _mm512_load_si512(hi);
  t.hhi = _mm512_load_si512(hi + 64);
  t.llo = _mm512_load_si512(lo);
  t.lhi = _mm512_load_si512(lo + 64);
  t.perm = _mm512_load_si512(perm);
  t.sign = _mm512_set1_epi8(static_cast<char>(0x80));
  return t;
}

// 64 float8 bytes -> 64 bf16 in natural order (w0: elements 0..31, w1: 32..63).
inline void cvt64(__m512i b, const Tables& t, __m512i& w0, __m512i& w1) {
  b = _mm512_permutexvar_epi8(t.perm, b);
  __m512i h = _mm512_permutex2var_epi8(t.hlo, b, t.hhi);
  const __m512i l = _mm512_permutex2var_epi8(t.llo, b, t.lhi);
  h = _mm512_ternarylogic_epi32(h, b, t.sign, 0xF8);  // h | (b & sign)
  w0 = _mm512_unpacklo_epi8(l, h);
  w1 = _mm512_unpackhi_epi8(l, h);
}

inline __m512i load_tail(const uint8_t* p, int64_t n) {  // n < 64 bytes, zero-filled
  return _mm512_maskz_loadu_epi8(_cvtu64_mask64((n >= 64) ? ~0ULL : ((1ULL << n) - 1)), p);
}

// gemm_bf16's packer: rows n0 .. n0 + rows (<= 64) of the float8 weight q (N, K), columns [k0, k0 + kc),
// as their exact bf16 values (the scale is gemm_bf16's column scale), in k-pairs; zero past rows / kc.
struct Fp8Panels {
  const uint8_t* q;
  int64_t K;
  const Tables* t;

  void operator()(int64_t n0, int64_t rows, int64_t k0, int64_t kc, uint8_t* dst) const {
    for (int v = 0; v < 4; ++v) {
      for (int64_t k = 0; k < kc; k += 64) {
        __m512i a[16], b[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = 16 * v + i;
          if (row < rows) {
            cvt64(load_tail(q + (n0 + row) * K + k0 + k, kc - k), *t, a[i], b[i]);
          } else {
            a[i] = b[i] = _mm512_setzero_si512();
          }
        }
        lowbit::transpose16(a);
        lowbit::transpose16(b);
        uint8_t* out = dst + (k / 2) * gemm_bf16::kPairBytes + v * 64;
        for (int p = 0; p < 16; ++p) {
          _mm512_storeu_si512(out + p * gemm_bf16::kPairBytes, a[p]);
          _mm512_storeu_si512(out + (16 + p) * gemm_bf16::kPairBytes, b[p]);
        }
      }
    }
  }
};

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Sums of 4 vectors -> 4 floats.
inline void reduce4(const __m512* a, float* r) {
  for (int i = 0; i < 4; ++i) r[i] = _mm512_reduce_add_ps(a[i]);
}

// ---- bf16 x, fused GEMV: MT (1..4) rows of x against 4 weight rows ---------------------------
// xb: MT rows of bf16 x, row stride Kp (zero padded to a multiple of 64).
template <int MT>
inline void gemv_group(const uint8_t* const* rows, const uint16_t* xb, int64_t K, int64_t Kp, const Tables& t,
                       float* res /* [MT][4] */) {
  constexpr int NA = MT <= 2 ? 2 : 1;  // accumulators per (m, row): more chains for small MT
  __m512 acc[MT][4][NA];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r)
      for (int a = 0; a < NA; ++a) acc[m][r][a] = _mm512_setzero_ps();
  auto step = [&](int64_t k, const __m512i* b) {
    __m512i w0[4], w1[4];
    for (int r = 0; r < 4; ++r) cvt64(b[r], t, w0[r], w1[r]);
    for (int m = 0; m < MT; ++m) {
      const __m512i x0 = _mm512_loadu_si512(xb + m * Kp + k);
      const __m512i x1 = _mm512_loadu_si512(xb + m * Kp + k + 32);
      for (int r = 0; r < 4; ++r) {
        acc[m][r][0] = dp(acc[m][r][0], x0, w0[r]);
        acc[m][r][NA - 1] = dp(acc[m][r][NA - 1], x1, w1[r]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i b[4];
    for (int r = 0; r < 4; ++r) {
      lowbit::prefetch_stream(rows[r] + k);
      b[r] = _mm512_loadu_si512(rows[r] + k);
    }
    step(k, b);
  }
  if (k < K) {
    __m512i b[4];
    for (int r = 0; r < 4; ++r) b[r] = load_tail(rows[r] + k, K - k);
    step(k, b);
  }
  for (int m = 0; m < MT; ++m) {
    __m512 s[4];
    for (int r = 0; r < 4; ++r) s[r] = NA == 2 ? _mm512_add_ps(acc[m][r][0], acc[m][r][NA - 1]) : acc[m][r][0];
    reduce4(s, res + m * 4);
  }
}

// Converts 4 rows of K bytes into scratch (4 rows of Kp bf16, zero padded).
inline void convert_rows_bf16(const uint8_t* const* rows, uint16_t* dst, int64_t K, int64_t Kp, const Tables& t,
                              bool prefetch) {
  for (int r = 0; r < 4; ++r) {
    const uint8_t* src = rows[r];
    uint16_t* d = dst + r * Kp;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      if (prefetch) lowbit::prefetch_stream(src + k);
      __m512i w0, w1;
      cvt64(_mm512_loadu_si512(src + k), t, w0, w1);
      _mm512_storeu_si512(d + k, w0);
      _mm512_storeu_si512(d + k + 32, w1);
    }
    if (k < K) {
      __m512i w0, w1;
      cvt64(load_tail(src + k, K - k), t, w0, w1);
      _mm512_storeu_si512(d + k, w0);
      _mm512_storeu_si512(d + k + 32, w1);
    }
  }
}

// MT (1..4) rows of x against 4 converted weight rows (scratch), K in steps of 32 (Kp % 64 == 0).
// Prefetches [pf, pf_end) spread over the steps (the next weight rows).
template <int MT>
inline void tile_4x(const uint16_t* w, const uint16_t* xb, int64_t Kr, int64_t Kp, float* res, const char*& pf,
                    const char* pf_end, int64_t pf_adv) {
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kr; k += 32) {
    if (pf < pf_end) {
      _mm_prefetch(pf, _MM_HINT_T0);
      pf += pf_adv;
    }
    __m512i wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_si512(w + r * Kp + k);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(xb + m * Kp + k);
      for (int r = 0; r < 4; ++r) acc[m][r] = dp(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MT; ++m) reduce4(acc[m], res + m * 4);
}

// res * s * post in double, rounded once to float32: res * s for post = 1 (the float32 product,
// exact in double before the rounding), and with post = 2^-j the value the unscaled sum would give,
// subnormal results included.
inline float post_scale(float res, float s, double post) {
  return static_cast<float>(static_cast<double>(res) * s * post);
}

// post: per row of x (from M0), 2^-j undoing scale_rows_bf16's 2^j; nullptr: 1 (float32 copies).
template <typename out_t>
inline void store_group(out_t* op, int64_t N, int64_t M0, int MT, int64_t n, int nrows, const float* res,
                        const float* sp, bool per_row, const float* bp, const double* post) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < nrows; ++r) {
      const float s = sp[per_row ? n + r : 0];
      float v = post ? post_scale(res[m * 4 + r], s, post[M0 + m]) : res[m * 4 + r] * s;
      if (bp) v += bp[n + r];
      op[(M0 + m) * N + n + r] = static_cast<out_t>(v);
    }
}

// ---- float32 x: 4 rows converted to float32 scratch, float32 FMA -----------------------------
inline void convert_rows_f32(const uint8_t* const* rows, float* dst, int64_t K, int64_t Kp, const Tables& t) {
  for (int r = 0; r < 4; ++r) {
    const uint8_t* src = rows[r];
    float* d = dst + r * Kp;
    for (int64_t k = 0; k < K; k += 64) {
      lowbit::prefetch_stream(src + k);
      __m512i w[2];
      cvt64(k + 64 <= K ? _mm512_loadu_si512(src + k) : load_tail(src + k, K - k), t, w[0], w[1]);
      for (int h = 0; h < 2; ++h) {
        const __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w[h])), 16);
        const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w[h], 1)), 16);
        _mm512_storeu_si512(d + k + 32 * h, lo);
        _mm512_storeu_si512(d + k + 32 * h + 16, hi);
      }
    }
  }
}

inline void dot4_f32(const float* w, const float* x, int64_t Kr, int64_t Kp, float* res) {
  __m512 acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kr; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int r = 0; r < 4; ++r) {
      acc[r][0] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + r * Kp + k), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + r * Kp + k + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// Converts rows [n0, n1) into buf (row stride ld, ld % 64 == 0 and >= K), bf16 or float32.
void convert_chunk(const uint8_t* q, int64_t K, int64_t n0, int64_t n1, void* buf, int64_t ld, bool f32,
                   const Tables& t) {
  par_for(n0, n1, 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* src = q + n * K;
      if (f32) {
        float* d = static_cast<float*>(buf) + (n - n0) * ld;
        for (int64_t k = 0; k < K; k += 64) {
          lowbit::prefetch_stream(src + k);
          __m512i w[2];
          cvt64(k + 64 <= K ? _mm512_loadu_si512(src + k) : load_tail(src + k, K - k), t, w[0], w[1]);
          for (int h = 0; h < 2; ++h) {
            _mm512_storeu_si512(d + k + 32 * h,
                                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w[h])), 16));
            _mm512_storeu_si512(d + k + 32 * h + 16,
                                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w[h], 1)), 16));
          }
        }
      } else {
        uint16_t* d = static_cast<uint16_t*>(buf) + (n - n0) * ld;
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
          lowbit::prefetch_stream(src + k);
          __m512i w0, w1;
          cvt64(_mm512_loadu_si512(src + k), t, w0, w1);
          _mm512_storeu_si512(d + k, w0);
          _mm512_storeu_si512(d + k + 32, w1);
        }
        if (k < K) {
          __m512i w0, w1;
          cvt64(load_tail(src + k, K - k), t, w0, w1);
          _mm512_storeu_si512(d + k, w0);
          _mm512_storeu_si512(d + k + 32, w1);
        }
      }
    }
  });
}

template <typename out_t>
void small_m(const torch::Tensor& xc /* compute copy, (M, Kp) bf16 or f32 */, const uint8_t* q, int64_t N,
             int64_t K, int64_t Kp, const float* sp, bool per_row, const float* bp, out_t* op, int64_t gemv_max_m,
             const Tables& t, const double* post /* per row of x, bf16 copies; nullptr for float32 */) {
  const int64_t M = xc.size(0);
  const bool f32 = xc.scalar_type() == torch::kFloat;
  const int64_t groups = (N + 3) / 4;
  const int64_t Kr = (K + 63) / 64 * 64;  // loop bound (the scratch and x are zero up to Kr)
  std::vector<uint8_t> zero(K, 0);
  par_for(0, groups, 1, [&](int64_t gb, int64_t ge) {
    std::vector<uint16_t> sbf(f32 ? 0 : 4 * Kp);
    std::vector<float> sf(f32 ? 4 * Kp : 0);
    float res[16];
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t n = 4 * g;
      const int nrows = static_cast<int>(std::min<int64_t>(4, N - n));
      const uint8_t* rows[4];
      for (int r = 0; r < 4; ++r) rows[r] = r < nrows ? q + (n + r) * K : zero.data();
      if (f32) {
        const float* xp = xc.data_ptr<float>();
        convert_rows_f32(rows, sf.data(), K, Kp, t);
        for (int64_t m = 0; m < M; ++m) {
          dot4_f32(sf.data(), xp + m * Kp, Kr, Kp, res);
          store_group(op, N, m, 1, n, nrows, res, sp, per_row, bp, nullptr);
        }
        continue;
      }
      const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
      if (M <= gemv_max_m) {
        switch (M) {
          case 1: gemv_group<1>(rows, xp, K, Kp, t, res); break;
          case 2: gemv_group<2>(rows, xp, K, Kp, t, res); break;
          case 3: gemv_group<3>(rows, xp, K, Kp, t, res); break;
          default: gemv_group<4>(rows, xp, K, Kp, t, res); break;
        }
        store_group(op, N, 0, static_cast<int>(M), n, nrows, res, sp, per_row, bp, post);
        continue;
      }
      convert_rows_bf16(rows, sbf.data(), K, Kp, t, false);
      // Prefetch the next group's rows (contiguous) spread over all tile steps.
      const int64_t nn = std::min(N, n + 4), nn_end = std::min(N, n + 8);
      const char* pf = reinterpret_cast<const char*>(q + nn * K);
      const char* pf_end = reinterpret_cast<const char*>(q + nn_end * K);
      const int64_t steps = ((M + 3) / 4) * (Kr / 32);
      int64_t adv = ((pf_end - pf) + steps - 1) / std::max<int64_t>(steps, 1);
      adv = std::min<int64_t>(std::max<int64_t>(adv, 32), 64);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int MT = static_cast<int>(std::min<int64_t>(4, M - m0));
        const uint16_t* xm = xp + m0 * Kp;
        switch (MT) {
          case 1: tile_4x<1>(sbf.data(), xm, Kr, Kp, res, pf, pf_end, adv); break;
          case 2: tile_4x<2>(sbf.data(), xm, Kr, Kp, res, pf, pf_end, adv); break;
          case 3: tile_4x<3>(sbf.data(), xm, Kr, Kp, res, pf, pf_end, adv); break;
          default: tile_4x<4>(sbf.data(), xm, Kr, Kp, res, pf, pf_end, adv); break;
        }
        store_group(op, N, m0, MT, n, nrows, res, sp, per_row, bp, post);
      }
    }
  });
}

template <typename T>
inline void copy_pad_rows(const torch::Tensor& x, T* dst, int64_t Kp) {  // x (M, K) contiguous of T
  const int64_t M = x.size(0), K = x.size(1);
  const T* src = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(dst + m * Kp, src + m * K, K * sizeof(T));
    std::memset(dst + m * Kp + K, 0, (Kp - K) * sizeof(T));
  }
}

// Scales each row of the padded bf16 copy of x (M rows of Kp elements, Kp % 32 == 0) in place by 2^j,
// j = 109 - ceil(log2 K) - ilogb(max finite |x| of the row), clamped to [0, 127] (0 for a row without a
// finite nonzero value); post[m] = 2^-j (bf16_scale.h). Every sum of K products x q (|q| < 2^16 for both
// formats) then stays below 2^126, and a row whose largest value is subnormal becomes normal: vdpbf16ps
// reads bf16 subnormals as zero and flushes subnormal products and sums.
inline void scale_rows_bf16(at::BFloat16* xc, int64_t M, int64_t K, int64_t Kp, double* post) {
  const int log2k = K > 1 ? 64 - __builtin_clzll(static_cast<unsigned long long>(K - 1)) : 0;
  lowbit::scale_rows_bf16(reinterpret_cast<uint16_t*>(xc), M, Kp, Kp, 109 - log2k, post);
}

template <typename T>
inline void zero_pad_rows(T* dst, int64_t M, int64_t K, int64_t Kp) {  // columns K .. Kp of each row
  for (int64_t m = 0; m < M; ++m) std::memset(dst + m * Kp + K, 0, (Kp - K) * sizeof(T));
}

}  // namespace

// x: (M, K) float32 / bfloat16 / float16 (any strides); qdata: (N, K) float8 contiguous;
// scale: float32 with N or 1 elements; bias: (N,) or None. act: x is first fake-quantized by that rule
// (fp8_linear_act), written straight into the padded copy of x at M <= tiled_max_m.
static torch::Tensor linear_impl(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                                 int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, const fp8_act::Rule* act) {
  // finite_weight is not taken here: this build's conversions keep NaN / inf as they are, nothing to skip
  // every argument checked before any memory is touched: nothing is read out of bounds
  TORCH_CHECK(x.device().is_cpu() && qdata.device().is_cpu() && scale.device().is_cpu(), "x, qdata and scale must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && qdata.dim() == 2 && x.size(1) == qdata.size(1), "x (M, K) and qdata (N, K) expected, got ",
              x.sizes(), " and ", qdata.sizes());
  const auto qt = qdata.scalar_type();
  TORCH_CHECK(qt == at::kFloat8_e4m3fn || qt == at::kFloat8_e5m2, "qdata must be float8_e4m3fn or float8_e5m2");
  TORCH_CHECK(qdata.is_contiguous(), "qdata must be contiguous");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == torch::kBFloat16 || xt == torch::kFloat || xt == torch::kHalf, "x must be bf16, fp16 or fp32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat, "scale must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = qdata.size(0);
  TORCH_CHECK(scale.numel() == N || scale.numel() == 1, "scale must have N or 1 elements");
  TORCH_CHECK(gemv_max_m <= 4, "gemv_max_m must be <= 4");
  const bool per_row = scale.numel() == N && N != 1;
  auto sc = scale.reshape(-1).contiguous();
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu(), "bias must be a CPU tensor");
    TORCH_CHECK(bias->numel() == N && bias->is_floating_point(), "bias must have N = ", N, " floating elements, got ",
                bias->scalar_type(), " ", bias->sizes());
    bf = bias->reshape(-1).to(torch::kFloat).contiguous();
  }
  if (act && M > tiled_max_m && K > 0) {  // the chunked path converts x itself: quantize it first
    const double st = act->static_scale > 0 ? double(act->static_scale) : -1.0;
    x = std::get<0>(fp8_act::fake_quant_fp8(x.contiguous(), st, act->per_token, act->eps, act->e5m2));
    act = nullptr;
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) {
    out.zero_();
    if (bf.defined()) out.add_(bf.to(xt));
    return out;
  }
  static const Tables t_e4m3 = make_tables(false);
  static const Tables t_e5m2 = make_tables(true);
  const Tables& t = qt == at::kFloat8_e5m2 ? t_e5m2 : t_e4m3;
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qdata.data_ptr());
  const float* sp = sc.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const bool f32 = xt != torch::kBFloat16;
  // Row stride of the padded x copy and scratch: a multiple of 64 elements plus one cache line,
  // so that rows do not all map to the same L1 sets (a 8 KiB stride thrashed L1: 4x slower).
  const int64_t Kr = (K + 63) / 64 * 64;
  const int64_t Kp = Kr + (xt == torch::kBFloat16 ? 32 : 16);
  const auto ct = f32 ? torch::kFloat : torch::kBFloat16;

  if (M <= tiled_max_m) {
    auto xc = torch::empty({M, Kp}, x.options().dtype(ct));
    if (act) {  // the fake-quantized values in x's dtype, widened to float32 for float16 x
      if (f32) fp8_act::fake_quant_into(x.contiguous(), xc.data_ptr<float>(), Kp, *act);
      else fp8_act::fake_quant_into(x.contiguous(), xc.data_ptr<at::BFloat16>(), Kp, *act);
      if (f32) zero_pad_rows<float>(xc.data_ptr<float>(), M, K, Kp);
      else zero_pad_rows<at::BFloat16>(xc.data_ptr<at::BFloat16>(), M, K, Kp);
    } else {
      auto xs = x.to(ct).contiguous();
      if (f32) copy_pad_rows<float>(xs, xc.data_ptr<float>(), Kp);
      else copy_pad_rows<at::BFloat16>(xs, xc.data_ptr<at::BFloat16>(), Kp);
    }
    if (xt == torch::kBFloat16) {
      std::vector<double> post(M);
      scale_rows_bf16(xc.data_ptr<at::BFloat16>(), M, K, Kp, post.data());
      small_m(xc, q, N, K, Kp, sp, per_row, bp, out.data_ptr<at::BFloat16>(), gemv_max_m, t, post.data());
    } else if (xt == torch::kHalf)
      small_m(xc, q, N, K, Kp, sp, per_row, bp, out.data_ptr<at::Half>(), gemv_max_m, t, nullptr);
    else
      small_m(xc, q, N, K, Kp, sp, per_row, bp, out.data_ptr<float>(), gemv_max_m, t, nullptr);
    return out;
  }

  if (!f32 && K % 2 == 0) {  // bf16 x: the panel GEMM (the scale per column, after the float32 sums)
    const auto xg = x.stride(1) == 1 ? x : x.contiguous();
    std::vector<float> cs(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) cs[size_t(n)] = sp[per_row ? n : 0];
    gemm_bf16::gemm(reinterpret_cast<const uint16_t*>(xg.data_ptr<at::BFloat16>()), xg.stride(0), M, N, K, Fp8Panels{q, K, &t}, bp,
                    reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), cs.data());
    return out;
  }

  // Chunks, in one parallel region: each thread takes a contiguous range of weight rows, converts
  // it chunk by chunk into its own reused buffer (rows, Kr) in the compute dtype and multiplies
  // each chunk with a serial at::mm into the output's column slice, then scales (and adds the
  // bias to) that slice. One region per call instead of two per chunk (a parallel conversion and
  // a parallel at::mm): a region's threads wait for each other, so while another process holds a
  // core each region can cost a scheduler slice, and SmolLM2 at M = 512 ran ~1,800 per forward.
  auto xs = x.detach().to(ct);  // detached: the worker threads call at::mm_out outside autograd
  // worker threads start outside the caller's InferenceMode (thread-local): without it, mm_out into an
  // inference tensor (out made under torch.inference_mode) raises "Inplace update to inference tensor"
  const bool inference = c10::InferenceMode::is_enabled();
  auto res = f32 ? torch::empty({M, N}, x.options().dtype(torch::kFloat)) : out;
  const int64_t rows = std::max<int64_t>(1, std::min(chunk_rows, N));
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 7) / 8));
  const int64_t span = (N + nt - 1) / nt;  // weight rows per thread
  auto work = [&](int64_t tb, int64_t te) {
    c10::InferenceMode inference_guard(inference);
    at::NoGradGuard no_grad;
    auto buf = torch::empty({std::min(rows, span), Kr}, xs.options());
    for (int64_t th = tb; th < te; ++th) {
      const int64_t n0 = th * span, n1 = std::min(N, n0 + span);
      for (int64_t i = n0; i < n1; i += rows) {
        const int64_t j = std::min(n1, i + rows);
        convert_chunk(q, K, i, j, buf.data_ptr(), Kr, f32, t);  // serial here: already in a region
        auto w = buf.narrow(0, 0, j - i).narrow(1, 0, K);
        auto o = res.narrow(1, i, j - i);
        at::mm_out(o, xs, w.t());  // serial inside a region (ATen / BLAS do not nest)
      }
      // Scale and bias on the float32 result or the bf16 output, in place, one cast.
      for (int64_t m = 0; m < M && n0 < n1; ++m) {
        if (f32) {
          float* r = res.data_ptr<float>() + m * N;
          for (int64_t n = n0; n < n1; ++n) r[n] = r[n] * sp[per_row ? n : 0] + (bp ? bp[n] : 0.f);
        } else {
          at::BFloat16* r = out.data_ptr<at::BFloat16>() + m * N;
          for (int64_t n = n0; n < n1; ++n)
            r[n] = static_cast<at::BFloat16>(static_cast<float>(r[n]) * sp[per_row ? n : 0] + (bp ? bp[n] : 0.f));
        }
      }
    }
  };
  std::exception_ptr error;  // an exception must not leave an OpenMP region: kept, rethrown after
  std::atomic<bool> failed{false};
  par_for(0, nt, 1, [&](int64_t tb, int64_t te) {
    try {
      work(tb, te);
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
  if (f32 && xt != torch::kFloat) out.copy_(res);
  return f32 && xt == torch::kFloat ? res : out;
}

torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                         int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, bool finite_weight) {
  return linear_impl(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, nullptr);
}

// fp8_linear(fake_quant_fp8(x, dynamic, act_per_token, act_eps, act_e5m2), ...) in one call, bit for bit.
torch::Tensor fp8_linear_act(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                             int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, bool act_per_token,
                             double act_eps, bool act_e5m2, bool finite_weight) {
  const fp8_act::Rule rule = fp8_act::make_rule(act_per_token, act_eps, act_e5m2, "fp8_linear_act");
  return linear_impl(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, &rule);
}

// fp8_linear(fake_quant_fp8(x, act_scale, per tensor, act_eps, act_e5m2), ...) in one call, bit for bit: a static
// activation scale (a positive finite float).
torch::Tensor fp8_linear_act_static(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                                    int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, double act_scale,
                                    double act_eps, bool act_e5m2, bool finite_weight) {
  const fp8_act::Rule rule = fp8_act::make_static_rule(act_scale, act_eps, act_e5m2, "fp8_linear_act_static");
  return linear_impl(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, &rule);
}

// The float8 -> bf16 conversion alone (tests): (N, K) float8 -> (N, K) bf16.
torch::Tensor fp8_to_bf16(torch::Tensor qdata) {
  TORCH_CHECK(qdata.device().is_cpu(), "qdata must be a CPU tensor");
  TORCH_CHECK(qdata.dim() == 2 && qdata.is_contiguous(), "qdata must be 2-D contiguous");
  const auto qt = qdata.scalar_type();
  TORCH_CHECK(qt == at::kFloat8_e4m3fn || qt == at::kFloat8_e5m2, "qdata must be float8_e4m3fn or float8_e5m2");
  static const Tables t_e4m3 = make_tables(false);
  static const Tables t_e5m2 = make_tables(true);
  const int64_t N = qdata.size(0), K = qdata.size(1), Kp = (K + 63) / 64 * 64;
  auto buf = torch::empty({N, Kp}, qdata.options().dtype(torch::kBFloat16));
  if (N > 0 && K > 0)
    convert_chunk(reinterpret_cast<const uint8_t*>(qdata.data_ptr()), K, 0, N, buf.data_ptr(), Kp, false,
                  qt == at::kFloat8_e5m2 ? t_e5m2 : t_e4m3);
  return buf.narrow(1, 0, K).contiguous();
}

// This build's GEMV converts through a table that keeps NaN / inf: it ignores finite_weight.
constexpr bool kCountsSpecial = false;
#include "fp8_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("set_amx", &lowbit::amx::set_enabled, "use AMX tiles where the CPU has them (default true; false: AVX-512 alone)");
  m.def("amx_active", [] { return lowbit::amx::usable_bf16() || lowbit::amx::usable_int8(); },
        "whether this process runs AMX tiles: the CPU has them, Linux granted them and set_amx did not switch them off");
  m.def("fp8_linear", &fp8_linear, "float8 weight-only linear (x @ (q * s).T + bias)", py::arg("x"), py::arg("qdata"),
        py::arg("scale"), py::arg("bias"), py::arg("gemv_max_m"), py::arg("tiled_max_m"), py::arg("chunk_rows"),
        py::arg("finite_weight") = false);
  m.def("fp8_linear_act", &fp8_linear_act,
        "fp8_linear of x fake-quantized to float8 (dynamic scale per token or per tensor), in one call",
        py::arg("x"), py::arg("qdata"), py::arg("scale"), py::arg("bias"), py::arg("gemv_max_m"), py::arg("tiled_max_m"),
        py::arg("chunk_rows"), py::arg("act_per_token"), py::arg("act_eps"), py::arg("act_e5m2"),
        py::arg("finite_weight") = false);
  m.def("fp8_linear_act_static", &fp8_linear_act_static,
        "fp8_linear of x fake-quantized to float8 with a static per-tensor scale, in one call",
        py::arg("x"), py::arg("qdata"), py::arg("scale"), py::arg("bias"), py::arg("gemv_max_m"), py::arg("tiled_max_m"),
        py::arg("chunk_rows"), py::arg("act_scale"), py::arg("act_eps"), py::arg("act_e5m2"),
        py::arg("finite_weight") = false);
  m.def("fp8_to_bf16", &fp8_to_bf16, "float8 (N, K) -> bf16 (N, K), exact");
  m.def("fp8_count_special", &lowbit::fp8_count_special, "bytes of a float8 tensor that are NaN or inf", py::arg("qdata"));
  m.def("fp8_weight_finite", &lowbit::fp8_weight_finite, "no byte of qdata is NaN / inf (counted once per version)",
        py::arg("qdata"));
  m.def("fp8_forget_finite", &lowbit::fp8_forget_finite, "forget fp8_weight_finite's count for qdata", py::arg("qdata"));
}
