// Float8 (e4m3fn / e5m2) weight-only linear on CPU, AVX2 + FMA + F16C build (no AVX-512): the same
// entry points, checks and error messages as fp8_cpu.cpp, chosen at run time by _ext.py.
//   out[m, n] = (sum_k x[m, k] * q[n, k]) * s[n] + bias[n]
//
// Conversion to float32 (tiled and chunked paths, and the GEMV's rows holding NaN / inf), exact for
// every byte, 8 at a time:
//  * e5m2 is the high byte of a float16: bytes interleaved with zero bytes, then vcvtph2ps
//    (infinities, NaNs and subnormals come out right);
//  * e4m3fn: the 7-bit magnitude shifted into a float16's exponent/mantissa position is the value
//    times 2^-8 (subnormals too, and float16 subnormals are normal float32), the sign moved to
//    bit 15, magnitude 0x7F (NaN) forced to NaN, vcvtph2ps, one multiply by 256.
// AVX2 has no bf16 dot product: x is widened to float32 and every product is a float32 FMA (the
// AVX-512 build multiplies the same exact values with vdpbf16ps; only the summation order differs).
//
// Paths (the caller picks the thresholds):
//  * M <= gemv_max_m (<= 4), any x dtype: fused GEMV, each weight row streamed once and converted
//    in registers by shifts alone (no vcvtph2ps; see "fused GEMV" below), software
//    prefetch (prefetch.h) ahead in the weight stream;
//  * M <= tiled_max_m: 4 rows converted into a float32 scratch (L1/L2), then tile_f32.h's 4 x 3
//    register tiles over K blocks (each row of x against the 4 rows);
//  * otherwise: one parallel region; each thread converts its own contiguous range of weight rows,
//    chunk by chunk, into a reused buffer in x's compute dtype (bf16 for bf16 x, else float32) and
//    multiplies each chunk with a serial at::mm into the output slice.
// The scale (and bias) is applied to the float32 result (GEMV/scratch) or to the output (chunks).
// fp8_linear_act: float8 dynamic activations (fp8_act.h's fake quantization) fused into the widening of
// x to float32 on the GEMV/scratch paths (the values fake_quant_fp8 returns, widened); above
// tiled_max_m x is fake-quantized first, then the chunks run as usual.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#include "fp8_act.h"
#include "fp8_special.h"
#include "parallel.h"
#include "prefetch.h"
#include "mxcsr.h"
#include "tile_f32.h"
#include "widen_f32.h"

namespace {

using lowbit::par_for;

// Fixed costs per call at small M (SmolLM2's decode layers are 108-864 KiB; a 192 x 576 layer's call took
// 17 us against 6-10 for the int8 kernels): x's float32 copy, its permuted copy and the zero row live in
// buffers kept per thread between calls (up to kKeepBytes; larger ones are freed on return), and a weight
// under kSerialBytes runs on the calling thread, without the OpenMP team's fork/join (the int8 GEMV's
// measured threshold, int8_gemv_avx2.cpp).
constexpr int64_t kKeepBytes = int64_t(1) << 19;
constexpr int64_t kSerialBytes = 64 * 1024;

// A buffer of n T's: the calling thread's kept one when small enough, else `once` (freed by its owner).
template <typename T>
T* scratch(std::vector<T>& kept, std::vector<T>& once, int64_t n) {
  std::vector<T>& v = n * int64_t(sizeof(T)) <= kKeepBytes ? kept : once;
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

// Rows [b, e) of groups of R weight rows: f(b, e) over threads, or on the calling thread for a small weight.
template <typename F>
void rows_par(int64_t groups, int64_t weight_bytes, const F& f) {
  if (weight_bytes < kSerialBytes) f(int64_t(0), groups);
  else par_for(0, groups, 4, f);
}

using lowbit::tile_f32::hsum8;  // the 8 lanes' sum by a fixed tree

// 8 float8 bytes (the low 8 bytes of b) -> 8 float32, exact.
template <bool E5M2>
inline __m256 cvt8(__m128i b) {
  if constexpr (E5M2) {
    return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), b));
  } else {
    // e4m3fn s.eeee.mmm as float16 bits s.0eeee.mmm0000000: the value times 2^-8, subnormals
    // included (float16 subnormals are normal float32: no denormal arithmetic); NaN forced.
    const __m128i w = _mm_unpacklo_epi8(b, _mm_setzero_si128());
    const __m128i mag = _mm_and_si128(w, _mm_set1_epi16(0x7F));
    __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
    h = _mm_or_si128(h, _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
  }
}

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }

inline __m128i load_tail8(const uint8_t* p, int64_t n) {  // n < 8 bytes, zero-filled
  alignas(16) uint8_t buf[16] = {0};
  std::memcpy(buf, p, n);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

// Row of K bytes -> float32 dst (zero padded to Kr, a multiple of 8).
template <bool E5M2>
inline void convert_row_f32(const uint8_t* src, float* dst, int64_t K, int64_t Kr, bool prefetch) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (prefetch && (k & 63) == 0) lowbit::prefetch_stream(src + k);
    _mm256_storeu_ps(dst + k, cvt8<E5M2>(load8(src + k)));
  }
  if (k < K) {
    _mm256_storeu_ps(dst + k, cvt8<E5M2>(load_tail8(src + k, K - k)));
    k += 8;
  }
  for (; k < Kr; ++k) dst[k] = 0.f;
}

// Row of K bytes -> bf16 dst (exact: every float8 value is a bf16, the low 16 bits are zero).
template <bool E5M2>
inline void convert_row_bf16(const uint8_t* src, uint16_t* dst, int64_t K, bool prefetch) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (prefetch && (k & 63) == 0) lowbit::prefetch_stream(src + k);
    const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(cvt8<E5M2>(load8(src + k))), 16);
    const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(cvt8<E5M2>(load8(src + k + 8))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
  }
  for (; k < K; k += 8) {
    alignas(32) float f[8];
    _mm256_store_ps(f, cvt8<E5M2>(K - k >= 8 ? load8(src + k) : load_tail8(src + k, K - k)));
    for (int64_t i = 0; i < std::min<int64_t>(8, K - k); ++i) {
      uint32_t u;
      std::memcpy(&u, f + i, 4);
      dst[k + i] = static_cast<uint16_t>(u >> 16);
    }
  }
}

// ---- fused GEMV: MT (1..4) rows of x against R weight rows, no vcvtph2ps ----------------------------
// vcvtph2ps (~1.5 cycles per 8 values on this Zen 3) bound the GEMV at 12.6 GB/s, 0.6 of DRAM. Here
// 32 bytes become 4 x 8 float32 by shifts and masks only (~4.7 cycles per 32 bytes per row, measured
// in L1): the byte's sign goes to bit 31, its exponent and mantissa bits to the bottom of float32's
// exponent field and the top of its mantissa. That is the value times 2^-kBias, exact, subnormals
// included: they become float32 subnormals, which this CPU's FMA takes at full speed; DAZ is cleared
// around the loop so that a caller's flush-denormal setting cannot zero them. x is pre-multiplied by
// 2^j, j as large as x's magnitude allows without overflow (j = kBias unless |x| >= 2^(127 - kBias)),
// and the sum by 2^(kBias - j): products and sums are the plain float32 ones, only scaled.
// Bytes of a 32-byte block come out in the order 4i, 4i+2, 4i+1, 4i+3 (i = 0..7): x is permuted to
// match once per call. e4m3fn NaN (0x7F/0xFF) and e5m2 inf/NaN (exponent 31) would come out
// finite: a running byte maximum per row flags them, and a flagged row is redone by the exact
// converting path (NaN and inf propagate as in the reference).
template <bool E5M2>
struct Bits {
  static constexpr int kShift = E5M2 ? 3 : 4;                  // byte (as a word's high byte) -> bf16 bits
  static constexpr short kMask = E5M2 ? short(0x8FE0) : short(0x87F0);  // sign | exponent | mantissa
  static constexpr int kBias = E5M2 ? 112 : 120;                // 127 - the format's exponent bias
  static constexpr char kFlag = E5M2 ? char(0x83) : char(0x80);  // byte | kFlag == 0xFF: inf / NaN
};

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256i load_tail32(const uint8_t* p, int64_t n) {  // n < 32 bytes, zero-filled
  alignas(32) uint8_t buf[32] = {0};
  std::memcpy(buf, p, n);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// x rows (float32, stride Kp) -> permuted, times 2^j, into xq (stride Kq >= K rounded up to 32, zero
// filled by the caller); returns j.
template <bool E5M2>
int permute_x(const float* xf, int64_t M, int64_t K, int64_t Kp, float* xq, int64_t Kq) {
  float amax = 0.f;
  for (int64_t i = 0; i < M * Kp; ++i) {
    const float a = std::fabs(xf[i]);
    if (std::isfinite(a)) amax = std::max(amax, a);
  }
  const int j = amax > 0.f ? std::max(0, std::min(Bits<E5M2>::kBias, 127 - std::ilogb(amax))) : Bits<E5M2>::kBias;
  const float p2j = std::ldexp(1.f, j);
  static constexpr int kOff[4] = {0, 2, 1, 3};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K; b += 32)
      for (int p = 0; p < 4; ++p)
        for (int i = 0; i < 8; ++i) {
          const int64_t k = b + 4 * i + kOff[p];
          xq[m * Kq + b + 8 * p + i] = k < K ? xf[m * Kp + k] * p2j : 0.f;
        }
  return j;
}

// One flagged row, exactly as the converting paths do it: MT sums of x (unpermuted) times the row.
template <bool E5M2, int MT>
inline void exact_row(const uint8_t* row, const float* xf, int64_t K, int64_t Kp, float* res /* [MT], stride R */, int R) {
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 w = cvt8<E5M2>(K - k >= 8 ? load8(row + k) : load_tail8(row + k, K - k));
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + m * Kp + k), w, acc[m]);
  }
  for (int m = 0; m < MT; ++m) res[m * R] = hsum8(acc[m]);
}

template <bool E5M2, int MT, int R, bool CHECK>
inline void gemv_rows(const uint8_t* const* rows, const float* xq, int64_t K, int64_t Kq, float* res /* [MT][R] */,
                      bool* flagged /* [R] */) {
  using B = Bits<E5M2>;
  __m256 acc[MT][R][2];
  __m256i top[R];
  for (int r = 0; r < R; ++r) {
    top[r] = _mm256_setzero_si256();
    for (int m = 0; m < MT; ++m) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  }
  const __m256i mask = _mm256_set1_epi16(B::kMask), hi_word = _mm256_set1_epi32(int(0xFFFF0000u));
  const __m256i flag = _mm256_set1_epi8(B::kFlag);
  auto step = [&](int64_t k, const __m256i* v) {
    for (int r = 0; r < R; ++r) {
      if constexpr (CHECK) top[r] = _mm256_max_epu8(top[r], _mm256_or_si256(v[r], flag));
      const __m256i even = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v[r], 8), B::kShift), mask);
      const __m256i odd = _mm256_and_si256(_mm256_srai_epi16(v[r], B::kShift), mask);
      const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(even, 16));  // bytes 4i
      const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(even, hi_word));  // 4i + 2
      const __m256 w2 = _mm256_castsi256_ps(_mm256_slli_epi32(odd, 16));  // 4i + 1
      const __m256 w3 = _mm256_castsi256_ps(_mm256_and_si256(odd, hi_word));  // 4i + 3
      for (int m = 0; m < MT; ++m) {
        const float* x = xq + m * Kq + k;
        acc[m][r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, acc[m][r][1]);
        acc[m][r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), w2, acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), w3, acc[m][r][1]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i v[R];
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) lowbit::prefetch_stream(rows[r] + k);
      v[r] = load32(rows[r] + k);
    }
    step(k, v);
  }
  if (k < K) {
    __m256i v[R];
    for (int r = 0; r < R; ++r) v[r] = load_tail32(rows[r] + k, K - k);
    step(k, v);
  }
  for (int r = 0; r < R; ++r) {
    flagged[r] = CHECK && _mm256_movemask_epi8(_mm256_cmpeq_epi8(top[r], _mm256_set1_epi8(char(0xFF)))) != 0;
    for (int m = 0; m < MT; ++m) res[m * R + r] = hsum8(_mm256_add_ps(acc[m][r][0], acc[m][r][1]));
  }
}

template <typename out_t>
inline void store_rows(out_t* op, int64_t N, int64_t m0, int MT, int64_t n, int R, int nrows, const float* res,
                       const float* sp, bool per_row, const float* bp) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < nrows; ++r) {
      float v = res[m * R + r] * sp[per_row ? n + r : 0];
      if (bp) v += bp[n + r];
      op[(m0 + m) * N + n + r] = static_cast<out_t>(v);
    }
}

// Weight rows per pass at M = 1 (a macro so that benchmarks can build variants; measured at M = 1,
// 1 thread, same process: 2 and 4 rows within 2%, 1 row 13% slower).
#ifndef LOWBIT_FP8_GEMV_ROWS
#define LOWBIT_FP8_GEMV_ROWS 4
#endif

template <bool E5M2, int MT, bool CHECK, typename out_t>
void gemv(const float* xf, const uint8_t* q, int64_t N, int64_t K, int64_t Kp, const float* sp, bool per_row,
          const float* bp, out_t* op, const uint8_t* zero) {
  // MT >= 3 with one weight row loaded x (MT rows of float32, 16 KiB each at K = 4096: in L2) for every FMA and
  // ran at the L2's rate (M=4 0.32 of DRAM on a Zen 2); two rows halve the x traffic. MT = 4 runs as two passes
  // of two rows of x over the same two weight rows (the second from L1): 4 x 2 x 2 accumulators would not fit
  // the 16 registers, and one accumulator per pair would change the sums' order (the results stay those of
  // one row of x at a time, bit for bit, at every M).
  constexpr int R = MT == 1 ? LOWBIT_FP8_GEMV_ROWS : 2;
  const int64_t Kq = (K + 31) / 32 * 32 + 8;  // + 8: rows of x do not share L1 sets
  thread_local std::vector<float> kept;  // read by the team's threads during this call only
  std::vector<float> once;
  float* xq = scratch(kept, once, MT * Kq);
  const int j = permute_x<E5M2>(xf, MT, K, Kp, xq, Kq);
  const float post = std::ldexp(1.f, Bits<E5M2>::kBias - j);
  rows_par((N + R - 1) / R, N * K, [&](int64_t gb, int64_t ge) {
    lowbit::NoDenormalsAreZero daz_off;  // float32 subnormal weights must not be read as zero
    float res[MT * R];
    bool flagged[R];
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t n = R * g;
      const int nrows = static_cast<int>(std::min<int64_t>(R, N - n));
      const uint8_t* rows[R];
      for (int r = 0; r < R; ++r) rows[r] = r < nrows ? q + (n + r) * K : zero;
      if constexpr (MT == 4) {
        gemv_rows<E5M2, 2, R, CHECK>(rows, xq, K, Kq, res, flagged);
        gemv_rows<E5M2, 2, R, CHECK>(rows, xq + 2 * Kq, K, Kq, res + 2 * R, flagged);
      } else {
        gemv_rows<E5M2, MT, R, CHECK>(rows, xq, K, Kq, res, flagged);
      }
      for (int i = 0; i < MT * R; ++i) res[i] *= post;
      for (int r = 0; r < nrows; ++r)
        if (flagged[r]) exact_row<E5M2, MT>(rows[r], xf, K, Kp, res + r, R);
      store_rows(op, N, 0, MT, n, R, nrows, res, sp, per_row, bp);
    }
  });
}

// ---- M <= tiled_max_m: 4 rows converted to a float32 scratch, tile_f32.h's 4 x 3 tiles -------------
template <bool E5M2, typename out_t>
void tiled(const float* xf, int64_t M, const uint8_t* q, int64_t N, int64_t K, int64_t Kp, const float* sp, bool per_row,
           const float* bp, out_t* op, const uint8_t* zero) {
  namespace tf = lowbit::tile_f32;
  const int64_t Kr = (K + 7) / 8 * 8;
  par_for(0, (N + 3) / 4, 1, [&](int64_t gb, int64_t ge) {
    std::vector<float> sf(4 * Kp), acc(M * tf::kRows * 8), res(M * tf::kRows);
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t n = 4 * g;
      const int nrows = static_cast<int>(std::min<int64_t>(4, N - n));
      for (int r = 0; r < 4; ++r) convert_row_f32<E5M2>(r < nrows ? q + (n + r) * K : zero, sf.data() + r * Kp, K, Kr, true);
      tf::rows4(sf.data(), Kp, xf, Kp, M, Kr, acc.data(), res.data());
      store_rows(op, N, 0, static_cast<int>(M), n, 4, nrows, res.data(), sp, per_row, bp);
    }
  });
}

template <bool E5M2, bool CHECK, typename out_t>
void gemv_m(const float* xf, int64_t M, const uint8_t* q, int64_t N, int64_t K, int64_t Kp, const float* sp,
            bool per_row, const float* bp, out_t* op, const uint8_t* zero) {
  switch (M) {
    case 1: gemv<E5M2, 1, CHECK>(xf, q, N, K, Kp, sp, per_row, bp, op, zero); break;
    case 2: gemv<E5M2, 2, CHECK>(xf, q, N, K, Kp, sp, per_row, bp, op, zero); break;
    case 3: gemv<E5M2, 3, CHECK>(xf, q, N, K, Kp, sp, per_row, bp, op, zero); break;
    default: gemv<E5M2, 4, CHECK>(xf, q, N, K, Kp, sp, per_row, bp, op, zero); break;
  }
}

// finite_weight: the caller knows no byte of q is NaN / inf (fp8_count_special), so the GEMV skips its check.
template <bool E5M2, typename out_t>
void small_m(const float* xf, int64_t M, const uint8_t* q, int64_t N, int64_t K, int64_t Kp, const float* sp,
             bool per_row, const float* bp, out_t* op, int64_t gemv_max_m, bool finite_weight) {
  thread_local std::vector<uint8_t> kept;  // zeros, never written: the rows past N of the last group
  std::vector<uint8_t> once;
  std::vector<uint8_t>& zv = K + 8 <= kKeepBytes ? kept : once;
  if (int64_t(zv.size()) < K + 8) zv.assign(K + 8, 0);
  const uint8_t* zero = zv.data();
  if (M > gemv_max_m) return tiled<E5M2>(xf, M, q, N, K, Kp, sp, per_row, bp, op, zero);
  if (finite_weight) gemv_m<E5M2, false>(xf, M, q, N, K, Kp, sp, per_row, bp, op, zero);
  else gemv_m<E5M2, true>(xf, M, q, N, K, Kp, sp, per_row, bp, op, zero);
}

// Rows [n0, n1) into buf (row stride ld >= K), bf16 or float32; serial (called inside a region or
// from par_for).
template <bool E5M2>
void convert_rows(const uint8_t* q, int64_t K, int64_t n0, int64_t n1, void* buf, int64_t ld, bool f32) {
  for (int64_t n = n0; n < n1; ++n) {
    if (f32) convert_row_f32<E5M2>(q + n * K, static_cast<float*>(buf) + (n - n0) * ld, K, ld, true);
    else convert_row_bf16<E5M2>(q + n * K, static_cast<uint16_t*>(buf) + (n - n0) * ld, K, true);
  }
}

}  // namespace

// x: (M, K) float32 / bfloat16 / float16 (any strides); qdata: (N, K) float8 contiguous;
// scale: float32 with N or 1 elements; bias: (N,) or None. act: x is first fake-quantized by that rule
// (fp8_linear_act), written straight into the float32 copy of x at M <= tiled_max_m.
static torch::Tensor linear_impl(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                                 int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, const fp8_act::Rule* act,
                                 bool finite_weight) {
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
  const bool e5m2 = qt == at::kFloat8_e5m2;
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qdata.data_ptr());
  const float* sp = sc.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;

  if (M <= tiled_max_m) {
    // x as float32, rows zero padded to Kp (a multiple of 8, plus 8 so rows do not share L1 sets)
    const int64_t Kp = (K + 7) / 8 * 8 + 8;
    thread_local std::vector<float> kept;
    std::vector<float> once;
    float* xw = scratch(kept, once, M * Kp);
    std::fill(xw, xw + M * Kp, 0.f);
    if (act) fp8_act::fake_quant_into(x.contiguous(), xw, Kp, *act);
    else lowbit::widen_rows(x, xw, Kp);
    const float* xp = xw;
#define LOWBIT_SMALL(T)                                                                                      \
  (e5m2 ? small_m<true>(xp, M, q, N, K, Kp, sp, per_row, bp, out.data_ptr<T>(), gemv_max_m, finite_weight)  \
        : small_m<false>(xp, M, q, N, K, Kp, sp, per_row, bp, out.data_ptr<T>(), gemv_max_m, finite_weight))
    if (xt == torch::kBFloat16) LOWBIT_SMALL(at::BFloat16);
    else if (xt == torch::kHalf) LOWBIT_SMALL(at::Half);
    else LOWBIT_SMALL(float);
#undef LOWBIT_SMALL
    return out;
  }

  // Chunks, in one parallel region (see fp8_cpu.cpp for why one region rather than one per chunk).
  const bool f32 = xt != torch::kBFloat16;
  const auto ct = f32 ? torch::kFloat : torch::kBFloat16;
  const int64_t Kr = (K + 15) / 16 * 16;
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
        if (e5m2) convert_rows<true>(q, K, i, j, buf.data_ptr(), Kr, f32);
        else convert_rows<false>(q, K, i, j, buf.data_ptr(), Kr, f32);
        auto w = buf.narrow(0, 0, j - i).narrow(1, 0, K);
        auto o = res.narrow(1, i, j - i);
        at::mm_out(o, xs, w.t());  // serial inside a region (ATen / BLAS do not nest)
      }
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
  return linear_impl(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, nullptr, finite_weight);
}

// fp8_linear(fake_quant_fp8(x, dynamic, act_per_token, act_eps, act_e5m2), ...) in one call, bit for bit.
torch::Tensor fp8_linear_act(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                             int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, bool act_per_token,
                             double act_eps, bool act_e5m2, bool finite_weight) {
  const fp8_act::Rule rule = fp8_act::make_rule(act_per_token, act_eps, act_e5m2, "fp8_linear_act");
  return linear_impl(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, &rule, finite_weight);
}

// fp8_linear(fake_quant_fp8(x, act_scale, per tensor, act_eps, act_e5m2), ...) in one call, bit for bit: a static
// activation scale (a positive finite float).
torch::Tensor fp8_linear_act_static(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                                    int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, double act_scale,
                                    double act_eps, bool act_e5m2, bool finite_weight) {
  const fp8_act::Rule rule = fp8_act::make_static_rule(act_scale, act_eps, act_e5m2, "fp8_linear_act_static");
  return linear_impl(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, &rule, finite_weight);
}

// The float8 -> bf16 conversion alone (tests): (N, K) float8 -> (N, K) bf16.
torch::Tensor fp8_to_bf16(torch::Tensor qdata) {
  TORCH_CHECK(qdata.device().is_cpu(), "qdata must be a CPU tensor");
  TORCH_CHECK(qdata.dim() == 2 && qdata.is_contiguous(), "qdata must be 2-D contiguous");
  const auto qt = qdata.scalar_type();
  TORCH_CHECK(qt == at::kFloat8_e4m3fn || qt == at::kFloat8_e5m2, "qdata must be float8_e4m3fn or float8_e5m2");
  const int64_t N = qdata.size(0), K = qdata.size(1);
  auto buf = torch::empty({N, K}, qdata.options().dtype(torch::kBFloat16));
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qdata.data_ptr());
  if (N > 0 && K > 0)
    par_for(0, N, 8, [&](int64_t b, int64_t e) {
      if (qt == at::kFloat8_e5m2) convert_rows<true>(q, K, b, e, buf.data_ptr<at::BFloat16>() + b * K, K, false);
      else convert_rows<false>(q, K, b, e, buf.data_ptr<at::BFloat16>() + b * K, K, false);
    });
  return buf;
}

// The AVX2 GEMV converts by shifts and checks every weight byte for NaN / inf unless told there is none.
constexpr bool kCountsSpecial = true;
#include "fp8_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
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
