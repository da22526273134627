// Int4 weight-only linear for CPU, AVX2 + FMA + F16C build (no AVX-512): the same entry points,
// arguments, checks and error messages as int4_cpu.cpp, chosen at run time by lowbit/kernels/_ext.py.
//
// Weight: qdata uint8 (N, K/2), byte j of a row = element 2j (low nibble) | element 2j+1 (high
// nibble); asymmetric nibbles are uint4 q with an int8 zero point per group, symmetric nibbles are
// int4 two's complement. scale float32 (N, G), group size gs = K / G a power of two >= 32.
// W[n, k] = (q - zp) * s. A float32 zero point (the float zero-point domain): q is formed exactly
// and zp subtracted in float32, one rounding, as the reference does.
//
// AVX2 has no bf16 dot product: bf16 x is widened to float32 (exact: a 16-bit shift) and every
// product is a float32 FMA against the exact integer (q - zp) as float32.
//  * gemv_bf16 at M = 1 (any zero point): the integer GEMV below (x as two int16 planes, vpmaddwd, exact
//    int32 sums per block); otherwise:
//  * gemv_bf16 / gemv_f32 (M <= 4, larger M in blocks of 4 / M = 1): the packed weight is streamed once. 8 bytes become 8
//    dwords (vpmovzxbd), whose low nibbles are the even elements and high nibbles the odd ones;
//    (q - zp) in int32, converted to float32 exactly, FMA against a copy of x permuted once per call
//    to that order (per 16 elements: the 8 even, then the 8 odd). Per group the float32 sum is
//    scaled by s with one FMA. Nothing cancels: the result is the reference's sum in another order.
//    (Taking the zero point out of the loop, sum x * (q + zp) minus zp * sum(x) once per group as the
//    AVX-512 build's GEMV does with its 16 + q, saves 2 of 9 instructions per 16 elements but loses the
//    small terms next to a huge x whose weight is the zero point: the property tests found one.)
//  * gemm_small_bf16 (M <= 64): rows of W dequantized exactly (bit-equal to the reference's float32
//    dequantize) into an L1/L2 buffer, 4 at a time, then tile_f32.h's 4 x 3 register tiles, float32 FMA.
//  * linear_chunked (large M): as int4_cpu.cpp, with this file's exact dequantization.
// gemv_bf16_act: gemv_bf16 with float8 dynamic activations (fp8_act.h's fake quantization) done in
// the same call, into the bf16 copy of x the permutation widens (fp8 x int4's eager decode entry).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fp8_act.h"
#include "int4_weight.h"
#include "parallel.h"
#include "prefetch.h"
#include "tile_f32.h"

namespace {

using lowbit::par_for;

constexpr int64_t kMinGroup = 32;

#ifndef LOWBIT_INT4_IROWS
#define LOWBIT_INT4_IROWS 4  // weight rows per tile of the integer GEMV at M = 1
#endif
constexpr int64_t kScaleAheadRows = 16;

using lowbit::int4::W4;

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor");
}

W4 make_w4(const torch::Tensor& q, const torch::Tensor& s, const c10::optional<torch::Tensor>& zp) {
  check_cpu(q, "qdata");
  check_cpu(s, "scale");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous(), "qdata must be contiguous uint8 (N, K/2), got ",
              q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == torch::kFloat && s.is_contiguous() && s.size(0) == q.size(0),
              "scale must be contiguous float32 (N, G) with N = ", q.size(0), ", got ", s.scalar_type(), " ", s.sizes());
  W4 w;
  w.q = q.data_ptr<uint8_t>();
  w.s = s.data_ptr<float>();
  w.N = q.size(0);
  w.rb = q.size(1);
  w.K = 2 * w.rb;
  w.G = s.size(1);
  TORCH_CHECK(w.G > 0 && w.K % w.G == 0, "scale groups (", w.G, ") must divide K (", w.K, ")");
  w.gs = w.K / w.G;
  TORCH_CHECK(w.gs >= kMinGroup && (w.gs & (w.gs - 1)) == 0, "group size must be a power of two >= ", kMinGroup,
              ", got ", w.gs);
  w.lg = 0;
  while ((int64_t(1) << w.lg) < w.gs) ++w.lg;
  w.zp = nullptr;
  w.zf = nullptr;
  if (zp.has_value() && zp->defined()) {
    check_cpu(*zp, "zero_point");
    TORCH_CHECK((zp->scalar_type() == torch::kChar || zp->scalar_type() == torch::kFloat) && zp->is_contiguous() &&
                    zp->sizes() == s.sizes(),
                "zero_point must be contiguous int8 or float32 shaped like scale ", s.sizes(), ", got ", zp->scalar_type(), " ",
                zp->sizes());
    if (zp->scalar_type() == torch::kChar) w.zp = zp->data_ptr<int8_t>();
    else w.zf = zp->data_ptr<float>();
  }
  return w;
}

// Zero-point kinds, a template argument of the per-element paths.
constexpr int kSym = 0, kIntZp = 1, kFloatZp = 2;

inline int zkind(const W4& w) { return w.zp ? kIntZp : w.zf ? kFloatZp : kSym; }

inline void store_out(void* out, at::ScalarType t, int64_t i, float v) {
  if (t == at::kBFloat16) static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v);
  else if (t == at::kHalf) static_cast<c10::Half*>(out)[i] = c10::Half(v);
  else static_cast<float*>(out)[i] = v;
}

using lowbit::tile_f32::hsum8;  // the 8 lanes' sum by a fixed tree

// 16 elements from 8 packed bytes as float32 (q - zp): ev = elements 0, 2, .., 14, od = elements 1,
// 3, .., 15. kSym: int4 two's complement nibbles (sign-extended), no zero point; kIntZp: exact, zpv;
// kFloatZp: q exact minus zfv in float32 (one rounding).
template <int Z>
inline void nib16(const uint8_t* p, __m256i zpv, __m256 zfv, __m256& ev, __m256& od) {
  const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  __m256i e, o;
  if constexpr (Z == kSym) {
    e = _mm256_srai_epi32(_mm256_slli_epi32(d, 28), 28);
    o = _mm256_srai_epi32(_mm256_slli_epi32(d, 24), 28);
  } else if constexpr (Z == kIntZp) {
    e = _mm256_sub_epi32(_mm256_and_si256(d, _mm256_set1_epi32(0xF)), zpv);
    o = _mm256_sub_epi32(_mm256_srli_epi32(d, 4), zpv);
  } else {
    e = _mm256_and_si256(d, _mm256_set1_epi32(0xF));
    o = _mm256_srli_epi32(d, 4);
  }
  ev = _mm256_cvtepi32_ps(e);
  od = _mm256_cvtepi32_ps(o);
  if constexpr (Z == kFloatZp) {
    ev = _mm256_sub_ps(ev, zfv);
    od = _mm256_sub_ps(od, zfv);
  }
}

inline __m256i zpv_of(const W4& w, int64_t n, int64_t g) { return _mm256_set1_epi32(w.zp ? int(w.zp[n * w.G + g]) : 0); }
inline __m256 zfv_of(const W4& w, int64_t n, int64_t g) { return _mm256_set1_ps(w.zf ? w.zf[n * w.G + g] : 0.f); }

// ---- exact dequantization ----------------------------------------------------------------------

// float32 -> bf16 bits with round-to-nearest-even, NaN -> 0x7FC0 (as c10::BFloat16).
inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// 16 consecutive float32 values (a: 0..7, b: 8..15) stored as T.
template <typename T>
inline void store16(T* o, __m256 a, __m256 b) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(o, a);
    _mm256_storeu_ps(o + 8, b);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i p = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));  // a0-3 b0-3 | a4-7 b4-7
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute4x64_epi64(p, 0xD8));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Row n, all K elements: (q - zp) * s in float32 (bit-equal to the reference), one rounding to T.
template <typename T, int Z>
void dequant_row(const W4& w, int64_t n, T* out) {
  const uint8_t* qr = w.q + n * w.rb;
  for (int64_t g = 0; g < w.G; ++g) {
    const __m256i zpv = zpv_of(w, n, g);
    const __m256 zfv = zfv_of(w, n, g);
    const __m256 sv = _mm256_set1_ps(w.s[n * w.G + g]);
    for (int64_t k = g * w.gs; k < (g + 1) * w.gs; k += 16) {
      __m256 ev, od;
      nib16<Z>(qr + k / 2, zpv, zfv, ev, od);
      const __m256 a = _mm256_unpacklo_ps(ev, od), b = _mm256_unpackhi_ps(ev, od);  // 0-3 8-11 | 4-7 12-15
      store16(out + k, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x20), sv),
              _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x31), sv));
    }
  }
}

template <typename T>
void dequant_rows_t(const W4& w, int64_t r0, int64_t r1, T* out, bool parallel) {
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      switch (zkind(w)) {
        case kIntZp: dequant_row<T, kIntZp>(w, n, out + (n - r0) * w.K); break;
        case kFloatZp: dequant_row<T, kFloatZp>(w, n, out + (n - r0) * w.K); break;
        default: dequant_row<T, kSym>(w, n, out + (n - r0) * w.K); break;
      }
    }
  };
  if (parallel) par_for(r0, r1, 8, body);
  else body(r0, r1);
}

void dequant_rows_any(const W4& w, int64_t r0, int64_t r1, torch::Tensor& out, bool parallel) {
  switch (out.scalar_type()) {
    case at::kBFloat16: dequant_rows_t(w, r0, r1, out.data_ptr<c10::BFloat16>(), parallel); break;
    case at::kHalf: dequant_rows_t(w, r0, r1, out.data_ptr<c10::Half>(), parallel); break;
    case at::kFloat: dequant_rows_t(w, r0, r1, out.data_ptr<float>(), parallel); break;
    default: TORCH_CHECK(false, "dequant output must be bfloat16, float16 or float32");
  }
}

// ---- fused GEMV (M <= 4) -------------------------------------------------------------------------

// x (M, K) of T as float32, permuted per 16 elements: the 8 even elements, then the 8 odd ones.
template <typename T>
std::vector<float> permute_x(const T* x, int64_t M, int64_t K, int64_t ldx) {
  std::vector<float> p(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) p[m * K + (k & ~int64_t(15)) + ((k & 1) << 3) + ((k & 15) >> 1)] = float(x[m * ldx + k]);
  return p;
}

// R rows of W (n0 ..) x MM rows of x: one accumulator per pair, 16 elements (the 8 even, then the 8 odd) a
// step; the R x MM pairs' chains are independent (two accumulators per pair, as until session 20, held M = 3
// and 4 to one weight row per tile: 8 accumulators of 4 rows of x filled the registers); per group the sum is
// scaled into tot. The sums of a pair do not depend on R or MM: a row of the result is that of its row of x
// alone, bit for bit.
template <int Z, int R, int MM>
inline void gemv_rows(const W4& w, const float* xp, int64_t n0, const float* bias, void* out, at::ScalarType ot) {
  const int64_t K = w.K, G = w.G, gs = w.gs;
  alignas(32) float tot[R][MM][8] = {};
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = w.q + (n0 + r) * w.rb;
  // The scales and zero points are separate streams the weight prefetch does not cover.
  if (n0 + kScaleAheadRows + R <= w.N) {
    const char* sa = reinterpret_cast<const char*>(w.s + (n0 + kScaleAheadRows) * G);
    for (int64_t b = 0; b < R * G * 4; b += 64) _mm_prefetch(sa + b, _MM_HINT_T0);
    if (Z == kIntZp) {
      const char* za = reinterpret_cast<const char*>(w.zp + (n0 + kScaleAheadRows) * G);
      for (int64_t b = 0; b < R * G; b += 64) _mm_prefetch(za + b, _MM_HINT_T0);
    } else if (Z == kFloatZp) {
      const char* za = reinterpret_cast<const char*>(w.zf + (n0 + kScaleAheadRows) * G);
      for (int64_t b = 0; b < R * G * 4; b += 64) _mm_prefetch(za + b, _MM_HINT_T0);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[R][MM];
    __m256i zpv[R];
    __m256 zfv[R];
    for (int r = 0; r < R; ++r) {
      zpv[r] = zpv_of(w, n0 + r, g);
      zfv[r] = zfv_of(w, n0 + r, g);
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
    }
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const int64_t kb = k >> 1;  // byte offset (k >= 0: a shift, not a signed division)
      if constexpr (R >= 2) lowbit::prefetch_region(qr[0], R * kb, R * 8);  // the tile's R rows are one region
      else if ((k & 127) == 0) lowbit::prefetch_stream(qr[0] + kb);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256 ev, od;
        nib16<Z>(qr[r] + kb, zpv[r], zfv[r], ev, od);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) {
          acc[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * K + k + 8), od,
                                      _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * K + k), ev, acc[r][m]));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(w.s[(n0 + r) * G + g]);
      for (int m = 0; m < MM; ++m)
        _mm256_store_ps(tot[r][m], _mm256_fmadd_ps(acc[r][m], sv, _mm256_load_ps(tot[r][m])));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) {
      float v = hsum8(_mm256_load_ps(tot[r][m]));
      if (bias) v += bias[n0 + r];
      store_out(out, ot, m * w.N + n0 + r, v);
    }
}

template <int Z, int MM>
void gemv_impl(const W4& w, const float* xp, const float* bias, void* out, at::ScalarType ot) {
  // Weight rows per tile, measured on a Zen 2 with one accumulator per pair (avx2_zen2/scratch/
  // int4_float_tiles_one_acc.py, 8 x 4096^2 g128, 2 threads, against two accumulators per pair and 2 / 1 / 1 rows
  // at M = 2 / 3 / 4): M = 3 with 3 rows 1.09-1.10x, M = 4 with 2 rows 1.14-1.21x, M = 2 with 4 rows level
  // (2 rows: 0.94-0.97x), M = 1 (float32 x) level.
  constexpr int R = MM == 1 ? 4 : MM == 2 ? 4 : MM == 3 ? 3 : 2;
  const int64_t nb = (w.N + R - 1) / R;
  par_for(0, nb, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * R;
      if (n0 + R <= w.N) gemv_rows<Z, R, MM>(w, xp, n0, bias, out, ot);
      else
        for (int64_t n = n0; n < w.N; ++n) gemv_rows<Z, 1, MM>(w, xp, n, bias, out, ot);
    }
  });
}

template <int MM>
void gemv_any(const W4& w, const float* xp, const float* bias, void* out, at::ScalarType ot) {
  switch (zkind(w)) {
    case kIntZp: gemv_impl<kIntZp, MM>(w, xp, bias, out, ot); break;
    case kFloatZp: gemv_impl<kFloatZp, MM>(w, xp, bias, out, ot); break;
    default: gemv_impl<kSym, MM>(w, xp, bias, out, ot); break;
  }
}

// ---- integer GEMV at M = 1: bf16 x as two int16 planes ---------------------------------------------
//
// The float GEMV above spends, per 8 weights, two int -> float conversions and two FMAs on a core that takes
// one conversion a cycle (a Zen 2: ~2.7 packed bytes a cycle in L1, 0.41 of DRAM on 2 threads). Here each
// block of B = min(group, 2048) elements of bf16 x becomes two int16 planes with a shared power-of-two step:
// x = (hi + lo * 2^-15) * step, step = 2^(E - 14) where the block's largest magnitude is in [2^E, 2^(E+1)).
// hi holds the 15 bits below 2^(E+1), lo the next 15, so every element of magnitude >= 2^(E-22) is held
// exactly (bf16 has 8 significant bits) and a smaller one is rounded to 2^(E-29), below a float32 rounding
// of the block's largest term. nibble * hi and nibble * lo are summed in int32 lanes by vpmaddwd, exactly
// (a lane sums B / 16 pairs of |x| < 2^15 times a nibble <= 15); zp * (the lanes' sums of x) is taken off,
// exactly (a float zero point: the nibble sums are made float32 on their own, a rounding beyond 2^24 as in the
// integer case but relative to sum(q * x) rather than to the difference, and zf times the lanes' sums of x, exact
// in float32 below 2^23, comes off in one FMA, a second rounding);
// each block's lanes become float32 once, are scaled by s[n, g] * step and added to a float32 total
// per lane, blocks in order; the 8 lanes by hsum8. One rounding per block instead of one per product: more
// exact than the float GEMV (measured on random data: the SQNR of the bf16 output against float64 equals
// that of float64's own bf16 rounding). A block whose lo plane is all zero skips the lo products.
// Where it runs: M = 1 (at M >= 2 the float tiles share each converted weight across the rows of x with
// 2 FMAs a cycle, where vpmaddwd runs 1 a cycle: 2 rows were level, 3 and 4 0.83x / 0.69x), every zero-point
// kind, groups <= 2048 or a multiple of 2048, x without NaN / inf (else the float GEMV runs).
// (The choice is per call: a NaN / inf or tiny block anywhere in x sends the whole call to the float GEMV.)
// So a row of x alone (M = 1) and the same row among others (M = 2..4, the float tiles) can differ in the
// last bit. x with a nonzero block whose largest magnitude is below 2^-100 (subnormals included) also takes
// the float GEMV: the steps stay normal float32 numbers.
// Measured (8 x 4096^2 g128, bf16 x, 2 threads, interleaved with the float GEMV in one process): 0.41 -> 0.50
// of the DRAM probe (benchmarks/results/avx2_zen2/scratch/README.md, session 17); float zero points (HQQ's,
// GGUF Q4_1's) since session 20: 0.47 -> 0.66 (6.0 -> 4.3 ms).

constexpr int64_t kMaxBlock = 2048;
constexpr int kMinExp = -100;  // blocks of x whose largest magnitude is below 2^kMinExp: the float GEMV

struct XPlanes {
  std::vector<int16_t> hi, lo;   // (K): per 32 elements the 16 even ones, then the 16 odd ones
  std::vector<float> step;       // (blocks): the value of one unit of hi
  std::vector<uint8_t> uses_lo;  // (blocks): lo holds a nonzero value in the block
  // (blocks, 8): per int32 lane of iblock's sums, the sum of the hi (lo) values that lane multiplies
  std::vector<int32_t> sum_hi, sum_lo;
  int64_t block = 0, blocks = 0;
};

inline float pow2f(int e) {  // 2^e for -126 <= e <= 127
  return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128((e + 127) << 23)));
}

// v rounded to the nearest integer (ties to even) whatever MXCSR's rounding mode, as int32.
inline __m256i round_i32(__m256 v) {
  return _mm256_cvttps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The planes of one row of x (K bf16 values), blocks of b elements (a multiple of 32 dividing K); false
// (nothing usable) when a value is NaN / inf or a nonzero block is below 2^kMinExp.
inline bool make_planes(const c10::BFloat16* x, int64_t K, int64_t b, XPlanes& p) {
  const int64_t nb = K / b;
  p.block = b;
  p.blocks = nb;
  p.hi.resize(K);
  p.lo.resize(K);
  p.step.resize(nb);
  p.uses_lo.resize(nb);
  p.sum_hi.resize(nb * 8);
  p.sum_lo.resize(nb * 8);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i mag = _mm256_set1_epi16(0x7FFF), himask = _mm256_set1_epi32(int(0xFFFF0000u));
  const __m256 two15 = _mm256_set1_ps(32768.f);
  const uint16_t* xr = reinterpret_cast<const uint16_t*>(x);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t k0 = j * b;
    __m256i mx = _mm256_setzero_si256();
    for (int64_t k = k0; k < k0 + b; k += 16)
      mx = _mm256_max_epu16(mx, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k)), mag));
    __m128i h = _mm_max_epu16(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    h = _mm_max_epu16(h, _mm_srli_si128(h, 8));
    h = _mm_max_epu16(h, _mm_srli_si128(h, 4));
    h = _mm_max_epu16(h, _mm_srli_si128(h, 2));
    const int top = _mm_extract_epi16(h, 0);
    if (top >= 0x7F80) return false;  // inf / NaN
    // below 2^-100 (subnormals included) the steps would leave float32's normal range: the float GEMV
    if (top != 0 && (top >> 7) - 127 < kMinExp) return false;
    const int e = top == 0 ? 0 : (top >> 7) - 127;  // the largest magnitude is in [2^e, 2^(e + 1))
    const __m256 up = _mm256_set1_ps(pow2f(14 - e));
    p.step[j] = pow2f(e - 14);
    __m256i any_lo = _mm256_setzero_si256(), sh = _mm256_setzero_si256(), sl = _mm256_setzero_si256();
    for (int64_t k = k0; k < k0 + b; k += 32) {
      __m256i hv[2][2], lv[2][2];  // [even / odd][elements k .. k+15 / k+16 .. k+31]
      for (int half = 0; half < 2; ++half) {
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k + 16 * half));
        const __m256 ev = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16)), od = _mm256_castsi256_ps(_mm256_and_si256(d, himask));
        const __m256 vs[2] = {_mm256_mul_ps(ev, up), _mm256_mul_ps(od, up)};  // exact: a power of two, |t| < 2^15
        for (int eo = 0; eo < 2; ++eo) {
          const __m256i hq = round_i32(vs[eo]);
          const __m256 r = _mm256_sub_ps(vs[eo], _mm256_cvtepi32_ps(hq));  // exact, |r| <= 1/2
          hv[eo][half] = hq;
          lv[eo][half] = round_i32(_mm256_mul_ps(r, two15));
        }
      }
      for (int eo = 0; eo < 2; ++eo) {
        // packs: [a0-3 b0-3 | a4-7 b4-7] -> permute to a0-7 b0-7 (elements in order)
        const __m256i hp = _mm256_permute4x64_epi64(_mm256_packs_epi32(hv[eo][0], hv[eo][1]), 0xD8);
        const __m256i lp = _mm256_permute4x64_epi64(_mm256_packs_epi32(lv[eo][0], lv[eo][1]), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.hi.data() + k + 16 * eo), hp);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.lo.data() + k + 16 * eo), lp);
        any_lo = _mm256_or_si256(any_lo, lp);
        sh = _mm256_add_epi32(sh, _mm256_madd_epi16(hp, ones));
        sl = _mm256_add_epi32(sl, _mm256_madd_epi16(lp, ones));
      }
    }
    p.uses_lo[j] = !_mm256_testz_si256(any_lo, any_lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.sum_hi.data() + j * 8), sh);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.sum_lo.data() + j * 8), sl);
  }
  return true;
}

// The nibbles of 32 elements from 16 packed bytes, as int16 in [0, 15]: ev = elements 0, 2, .., 30, od = 1, 3,
// .., 31. kSym nibbles are two's complement, taken as (nibble ^ 8) with zero point 8.
template <int Z>
inline void nib32(const uint8_t* p, __m256i& ev, __m256i& od) {
  __m256i d = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if constexpr (Z == kSym) d = _mm256_xor_si256(d, _mm256_set1_epi16(0x88));
  ev = _mm256_and_si256(d, _mm256_set1_epi16(0x0F));
  od = _mm256_srli_epi16(d, 4);
}

inline int zp_of(const W4& w, int64_t n, int64_t g) { return w.zp ? int(w.zp[n * w.G + g]) : 8; }

// Block j of R rows of W (n0 ..) x the planes: the nibbles times hi (and, when LO, lo) summed in int32 lanes,
// the zero point's share (zp times the lanes' sums of x, xp.sum_hi / sum_lo) taken off, the lanes made
// float32, scaled by s[n, g] * step and added to tot.
template <int Z, int R, bool LO>
inline void iblock(const W4& w, const XPlanes& xp, int64_t n0, int64_t j, float (&tot)[R][8]) {
  const int64_t b = xp.block, k0 = j * b, g = k0 / w.gs;
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = w.q + (n0 + r) * w.rb;
  __m256i ah[R], al[R];
  for (int r = 0; r < R; ++r) ah[r] = al[r] = _mm256_setzero_si256();
  for (int64_t k = k0; k < k0 + b; k += 32) {
    const int64_t kb = k >> 1;
    lowbit::prefetch_region(qr[0], R * kb, R * 16);  // the tile's R rows are one region
    const __m256i* h = reinterpret_cast<const __m256i*>(xp.hi.data() + k);
    const __m256i he = _mm256_loadu_si256(h), ho = _mm256_loadu_si256(h + 1);
    __m256i le, lo;
    if constexpr (LO) {
      const __m256i* l = reinterpret_cast<const __m256i*>(xp.lo.data() + k);
      le = _mm256_loadu_si256(l);
      lo = _mm256_loadu_si256(l + 1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m256i ev, od;
      nib32<Z>(qr[r] + kb, ev, od);
      ah[r] = _mm256_add_epi32(ah[r], _mm256_add_epi32(_mm256_madd_epi16(ev, he), _mm256_madd_epi16(od, ho)));
      if constexpr (LO)
        al[r] = _mm256_add_epi32(al[r], _mm256_add_epi32(_mm256_madd_epi16(ev, le), _mm256_madd_epi16(od, lo)));
    }
  }
  const __m256 inv15 = _mm256_set1_ps(1.f / 32768.f);
  const __m256i sh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp.sum_hi.data() + j * 8));
  const __m256i sl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp.sum_lo.data() + j * 8));
  for (int r = 0; r < R; ++r) {
    __m256 v;
    if constexpr (Z == kFloatZp) {  // the lanes' sums of x are exact in float32 (< 2^23); cvt(ah) and the FMA round
      const __m256 zf = _mm256_set1_ps(w.zf[(n0 + r) * w.G + g]);
      v = _mm256_fnmadd_ps(zf, _mm256_cvtepi32_ps(sh), _mm256_cvtepi32_ps(ah[r]));
      if (LO) v = _mm256_fmadd_ps(_mm256_fnmadd_ps(zf, _mm256_cvtepi32_ps(sl), _mm256_cvtepi32_ps(al[r])), inv15, v);
    } else {
      const __m256i zv = _mm256_set1_epi32(zp_of(w, n0 + r, g));
      v = _mm256_cvtepi32_ps(_mm256_sub_epi32(ah[r], _mm256_mullo_epi32(zv, sh)));
      if (LO) v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(al[r], _mm256_mullo_epi32(zv, sl))), inv15, v);
    }
    const __m256 sc = _mm256_set1_ps(w.s[(n0 + r) * w.G + g] * xp.step[j]);
    _mm256_store_ps(tot[r], _mm256_fmadd_ps(v, sc, _mm256_load_ps(tot[r])));
  }
}

template <int Z, int R>
inline void igemv_rows(const W4& w, const XPlanes& xp, int64_t n0, const float* bias, void* out, at::ScalarType ot) {
  const int64_t G = w.G;
  alignas(32) float tot[R][8] = {};
  if (n0 + kScaleAheadRows + R <= w.N) {  // the scales and zero points: streams the weight prefetch does not cover
    const char* sa = reinterpret_cast<const char*>(w.s + (n0 + kScaleAheadRows) * G);
    for (int64_t i = 0; i < R * G * 4; i += 64) _mm_prefetch(sa + i, _MM_HINT_T0);
    if (Z == kIntZp) {
      const char* za = reinterpret_cast<const char*>(w.zp + (n0 + kScaleAheadRows) * G);
      for (int64_t i = 0; i < R * G; i += 64) _mm_prefetch(za + i, _MM_HINT_T0);
    } else if (Z == kFloatZp) {
      const char* za = reinterpret_cast<const char*>(w.zf + (n0 + kScaleAheadRows) * G);
      for (int64_t i = 0; i < R * G * 4; i += 64) _mm_prefetch(za + i, _MM_HINT_T0);
    }
  }
  for (int64_t j = 0; j < xp.blocks; ++j) {
    if (xp.uses_lo[j]) iblock<Z, R, true>(w, xp, n0, j, tot);
    else iblock<Z, R, false>(w, xp, n0, j, tot);
  }
  for (int r = 0; r < R; ++r) {
    float v = hsum8(_mm256_load_ps(tot[r]));
    if (bias) v += bias[n0 + r];
    store_out(out, ot, n0 + r, v);
  }
}

template <int Z>
void igemv_impl(const W4& w, const XPlanes& xp, const float* bias, void* out, at::ScalarType ot) {
  constexpr int R = LOWBIT_INT4_IROWS;
  const int64_t nb = (w.N + R - 1) / R;
  par_for(0, nb, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * R;
      if (n0 + R <= w.N) igemv_rows<Z, R>(w, xp, n0, bias, out, ot);
      else
        for (int64_t n = n0; n < w.N; ++n) igemv_rows<Z, 1>(w, xp, n, bias, out, ot);
    }
  });
}

// The integer GEMV's block length for this weight, or 0 where it does not apply (see above).
inline int64_t int_block(const W4& w) {
  if (w.gs <= kMaxBlock) return w.gs;
  return w.gs % kMaxBlock == 0 ? kMaxBlock : 0;
}

// ---- small-M GEMM --------------------------------------------------------------------------------

// 4 rows of W dequantized exactly into a float32 buffer, then tile_f32.h's 4 x 3 tiles over every row of x.
void gemm_small_impl(const W4& w, const float* x, int64_t M, const float* bias, void* out, at::ScalarType ot) {
  namespace tf = lowbit::tile_f32;
  const int64_t N = w.N, K = w.K;  // K: a multiple of 32 (make_w4)
  par_for(0, (N + tf::kRows - 1) / tf::kRows, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(tf::kRows * K, 0.f), acc(M * tf::kRows * 8), res(M * tf::kRows);
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = tf::kRows * i, nr = std::min<int64_t>(tf::kRows, N - n0);
      dequant_rows_t(w, n0, n0 + nr, buf.data(), false);  // a tail's missing rows: zeros, never stored
      if (nr < tf::kRows) std::fill(buf.begin() + nr * K, buf.end(), 0.f);
      tf::rows4(buf.data(), K, x, K, M, K, acc.data(), res.data());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < nr; ++r)
          store_out(out, ot, m * N + n0 + r, res[m * tf::kRows + r] + (bias ? bias[n0 + r] : 0.f));
    }
  });
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N, torch::Tensor& keep) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point(), "bias must be floating (N,) with N = ", N,
              ", got ", bias->scalar_type(), " ", bias->sizes());
  keep = bias->to(torch::kFloat).contiguous();
  return keep.data_ptr<float>();
}

}  // namespace

constexpr int64_t kGemvMaxM = 16;  // the AVX-512 build's limit

// out = x @ W.T + bias for bf16 x (2-D, row stride any, unit column stride), 1 <= M <= 16. act: x is
// first fake-quantized by that rule (gemv_bf16_act), into a bf16 copy the permutation then reads.
static torch::Tensor gemv_bf16_entry(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                                     c10::optional<torch::Tensor> bias, const fp8_act::Rule* act) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(1) == w.K && (act || x.stride(1) == 1),
              "x must be bf16 (M, K) with K = ", w.K, act ? "" : " and unit column stride", ", got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= kGemvMaxM, "gemv_bf16 takes 1 <= M <= ", kGemvMaxM, ", got M = ", M);
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  std::vector<c10::BFloat16> xq;  // act: fake_quant_fp8's bf16 values, rows of K
  if (act) {
    xq.resize(M * w.K);
    fp8_act::fake_quant_into(x.contiguous(), xq.data(), w.K, *act);
  }
  const c10::BFloat16* xb = act ? xq.data() : x.data_ptr<c10::BFloat16>();
  const int64_t ldx = act ? w.K : x.stride(0);
  auto out = torch::empty({M, w.N}, x.options());
  void* op = out.data_ptr();
  thread_local XPlanes planes;
  const int64_t block = int_block(w);
  if (M == 1 && block > 0 && make_planes(xb, w.K, block, planes)) {
    if (w.zp) igemv_impl<kIntZp>(w, planes, bp, op, at::kBFloat16);
    else if (w.zf) igemv_impl<kFloatZp>(w, planes, bp, op, at::kBFloat16);
    else igemv_impl<kSym>(w, planes, bp, op, at::kBFloat16);
    return out;
  }
  // M > 4 (the AVX-512 build's limit, taken here so that a graph traced there runs here): blocks of 4 rows
  // of x, a pass over W each (the Python routes send this build M <= _int4_cpu.GEMV_MAX_M_AVX2 = 4)
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mm = std::min<int64_t>(4, M - m0);
    const std::vector<float> xp = permute_x(xb + m0 * ldx, mm, w.K, ldx);
    void* o = static_cast<c10::BFloat16*>(op) + m0 * w.N;
    switch (mm) {
      case 1: gemv_any<1>(w, xp.data(), bp, o, at::kBFloat16); break;
      case 2: gemv_any<2>(w, xp.data(), bp, o, at::kBFloat16); break;
      case 3: gemv_any<3>(w, xp.data(), bp, o, at::kBFloat16); break;
      default: gemv_any<4>(w, xp.data(), bp, o, at::kBFloat16); break;
    }
  }
  return out;
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                        c10::optional<torch::Tensor> bias) {
  return gemv_bf16_entry(x, qdata, scale, zp, bias, nullptr);
}

// gemv_bf16(fake_quant_fp8(x, dynamic, act_per_token, act_eps, act_e5m2), ...) in one call, bit for bit
// (float8 dynamic activations x int4 weight, the eager decode plan's entry; the dispatcher op keeps
// gemv_bf16's schema).
torch::Tensor gemv_bf16_act(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                            c10::optional<torch::Tensor> bias, bool act_per_token, double act_eps, bool act_e5m2) {
  const fp8_act::Rule rule = fp8_act::make_rule(act_per_token, act_eps, act_e5m2, "gemv_bf16_act");
  return gemv_bf16_entry(x, qdata, scale, zp, bias, &rule);
}

// out = x @ W.T + bias for float32 / float16 x of shape (1, K), float32 math.
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                       c10::optional<torch::Tensor> bias) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == w.K, "x must be (1, K) with K = ", w.K, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kHalf, "x must be float32 or float16, got ",
              x.scalar_type());
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  auto xf = x.to(torch::kFloat).contiguous();
  const std::vector<float> xp = permute_x(xf.data_ptr<float>(), 1, w.K, w.K);
  auto out = torch::empty({1, w.N}, x.options());
  gemv_any<1>(w, xp.data(), bp, out.data_ptr(), x.scalar_type());
  return out;
}

// out = x @ W.T + bias for bf16 x, 1 <= M <= 64 (see gemm_small_impl).
torch::Tensor gemm_small_bf16(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                              c10::optional<torch::Tensor> bias) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(1) == w.K && x.stride(1) == 1,
              "x must be bf16 (M, K) with K = ", w.K, " and unit column stride, got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 64, "gemm_small_bf16 takes 1 <= M <= 64, got M = ", M);
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  auto xf = x.to(torch::kFloat).contiguous();
  auto out = torch::empty({M, w.N}, x.options());
  gemm_small_impl(w, xf.data_ptr<float>(), M, bp, out.data_ptr(), at::kBFloat16);
  return out;
}

// Rows [row0, row1) of W, dequantized exactly into out[: row1 - row0] (dtype of out).
void dequant_rows(torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp, int64_t row0, int64_t row1,
                  torch::Tensor out) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(out, "out");
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= w.N, "bad row range [", row0, ", ", row1, ") for N = ", w.N);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(1) == w.K && out.size(0) >= row1 - row0,
              "out must be contiguous (>= ", row1 - row0, ", ", w.K, "), got ", out.sizes());
  dequant_rows_any(w, row0, row1, out, true);
}

// x @ W.T + bias for any M: W dequantized in chunks of `chunk` rows into a buffer of x's dtype,
// each chunk multiplied with at::mm / at::addmm into its column slice of the output.
torch::Tensor linear_chunked(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                             c10::optional<torch::Tensor> bias, int64_t chunk) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  const auto xt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "x must be (M, K) with K = ", w.K, ", got ", x.sizes());
  TORCH_CHECK(xt == torch::kBFloat16 || xt == torch::kFloat || xt == torch::kHalf, "x must be bfloat16, float32 or float16, got ", xt);
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N && bias->scalar_type() == xt, "bias must be (N,) with N = ", w.N,
                " in x's dtype ", xt, ", got ", bias->scalar_type(), " ", bias->sizes());
  }
  const int64_t M = x.size(0), N = w.N;
  auto out = torch::empty({M, N}, x.options());
  chunk = std::max<int64_t>(1, std::min(chunk, N));
  auto buf = torch::empty({chunk, w.K}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    dequant_rows_any(w, r0, r0 + rows, buf, true);
    auto wt = buf.narrow(0, 0, rows).t();
    auto o = out.narrow(1, r0, rows);
    if (has_bias) at::addmm_out(o, bias->narrow(0, r0, rows), x, wt);
    else at::mm_out(o, x, wt);
  }
  return out;
}

// The same dispatcher op as int4_cpu.cpp (only one build of a kernel loads in a process): its CPU kernel only,
// the schema is defined in Python (lowbit/kernels/_cpu_ops.py).
TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("int4_gemv_bf16", TORCH_FN(gemv_bf16)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("gemv_bf16", &gemv_bf16, "int4 weight-only GEMV, bf16 x, M <= 16");
  m.def("gemv_bf16_act", &gemv_bf16_act, "int4 GEMV of bf16 x fake-quantized to float8 (dynamic scale), M <= 16",
        py::arg("x"), py::arg("qdata"), py::arg("scale"), py::arg("zero_point"), py::arg("bias"), py::arg("act_per_token"),
        py::arg("act_eps"), py::arg("act_e5m2"));
  m.def("gemv_f32", &gemv_f32, "int4 weight-only GEMV, float32/float16 x, M = 1");
  m.def("gemm_small_bf16", &gemm_small_bf16, "int4 weight-only small-M GEMM, bf16 x, M <= 64");
  m.def("dequant_rows", &dequant_rows, "exact dequantization of a row range into a buffer");
  m.def("linear_chunked", &linear_chunked, "chunked dequantize + mm");
}
