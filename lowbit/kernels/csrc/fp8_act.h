// Float8 activation fake quantization in one pass, shared by both builds of int8_act (fake_quant_fp8)
// and, fused into the widening of x, by the fp8_cpu and int4_cpu GEMVs (fake_quant_into). Scalar C++,
// no instruction-set specific code; every float32 operation below is the single IEEE operation
// lowbit.primitives.float8 does. int8_act is compiled with -ffp-contract=off; the GEMV builds are not,
// and need not be: the only products that an add follows are exact power-of-two scalings (round_f8's
// |v| * 2^q, and c10's software float16 rounding where F16C is not enabled), so an FMA gives the same bits.
//   s   = clamp(amax / fmax, min=eps)                per row (per token), per tensor, or the static s
//   q   = float8(clamp(x / s, -fmax, fmax))          round_f8: bit for bit torch's .to() (c10's conversion)
//   out = cast_T(float(q) * s)                       c10's round-to-nearest-even cast, as torch's .to()
// NaN behaves as in torch: a NaN in a block makes its amax, hence its scale and every output, NaN.
#pragma once

#include <torch/extension.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "parallel.h"

namespace fp8_act {

// max |x[i]|, or the first NaN's |x[i]| when there is one (then the scale is NaN, as torch's amax).
// On the float32 bits with the sign cleared: for non-negative floats the unsigned integer order is the
// float order, and every NaN is above infinity's 0x7F800000, so an integer max (which vectorizes; a
// float max reduction does not without -ffinite-math-only, and the loop with a return inside held a 256 x
// 576 prefill activation at ~2.4 cycles per element) finds the largest |x[i]| and whether a NaN is there.
template <typename T>
inline float block_amax(const T* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b &= 0x7FFFFFFFu;
    m = b > m ? b : m;
  }
  if (m > 0x7F800000u)
    for (int64_t i = 0; i < n; ++i) {
      const float v = std::fabs(static_cast<float>(x[i]));
      if (std::isnan(v)) return v;
    }
  float a;
  std::memcpy(&a, &m, 4);
  return a;
}

// Rows per parallel task: at least ~16K elements. Each row's values do not depend on the split.
inline int64_t rows_per_task(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)); }

inline float scale_from_amax(float amax, float fmax, float eps) {
  if (std::isnan(amax)) return amax;
  const float s = amax / fmax;
  return s < eps ? eps : s;
}

// v (|v| <= F8's largest finite value, or NaN) rounded to the nearest float8 value, ties to even, as
// float32: static_cast<float>(F8(v)) (c10's conversion, one rounding from float32) for every such v,
// in integer and float32 operations a compiler vectorizes (c10's is a scalar branchy function: it
// held a prefill's 256 x 576 activation at ~4 ns per element). Normal results: the float32 bits
// rounded to F8's mantissa width (RNE by adding half an ulp minus one plus the kept lsb, a carry
// moving to the next binade). Below F8's smallest normal: rounded to a multiple of its subnormal
// quantum 2^-q by adding and subtracting 1.5 * 2^23 to |v| * 2^q (< 8: exact, RNE; an FMA of the
// exact product gives the same). The sign is kept (so -0 stays -0); NaN passes through.
template <typename F8>
inline float round_f8(float v) {
  constexpr bool e4m3 = std::is_same_v<F8, c10::Float8_e4m3fn>;
  constexpr int drop = e4m3 ? 20 : 21;                          // float32 mantissa bits beyond F8's
  constexpr uint32_t min_normal = e4m3 ? 0x3C800000u : 0x38800000u;  // 2^-6, 2^-14
  constexpr float quantum_inv = e4m3 ? 512.f : 65536.f, quantum = 1.f / quantum_inv;  // 2^9, 2^16
  uint32_t b;
  std::memcpy(&b, &v, 4);
  const uint32_t sign = b & 0x80000000u, a = b ^ sign;
  const uint32_t rn = (a + ((1u << (drop - 1)) - 1u) + ((a >> drop) & 1u)) & ~((1u << drop) - 1u);
  float av, nr;
  std::memcpy(&av, &a, 4);
  std::memcpy(&nr, &rn, 4);
  const float sub = ((av * quantum_inv + 12582912.f) - 12582912.f) * quantum;  // 1.5 * 2^23
  float r = a < min_normal ? sub : nr;
  uint32_t rb;
  std::memcpy(&rb, &r, 4);
  rb |= sign;
  std::memcpy(&r, &rb, 4);
  return v != v ? v : r;
}

// out[i] = the fake-quantized x[i] in T, stored as D (D = T, or float: T's value widened exactly).
// Three loops over a chunk rather than one, each of which vectorizes (the same operations per element,
// so the same bits).
template <typename T, typename F8, typename D = T>
inline void fake_quant_block(const T* x, D* out, int64_t n, float s, float fmax) {
  constexpr int64_t kChunk = 256;
  alignas(64) float y[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t c = n - i0 < kChunk ? n - i0 : kChunk;
    for (int64_t i = 0; i < c; ++i) {
      const float v = static_cast<float>(x[i0 + i]) / s;
      y[i] = v < -fmax ? -fmax : (v > fmax ? fmax : v);  // NaN passes through, as torch.clamp
    }
    for (int64_t i = 0; i < c; ++i) y[i] = round_f8<F8>(y[i]);
    for (int64_t i = 0; i < c; ++i) out[i0 + i] = static_cast<D>(static_cast<T>(y[i] * s));
  }
}

template <typename T, typename F8>
void run(const torch::Tensor& x, torch::Tensor& out, torch::Tensor& scale, double static_scale, bool per_token,
         double eps, float fmax) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* sp = scale.data_ptr<float>();
  if (static_scale > 0 || !per_token) {
    float s = static_cast<float>(static_scale);
    if (static_scale <= 0) s = scale_from_amax(block_amax(xp, M * K), fmax, static_cast<float>(eps));
    sp[0] = s;
    lowbit::par_for(0, M, rows_per_task(K), [&](int64_t b, int64_t e) {
      fake_quant_block<T, F8>(xp + b * K, op + b * K, (e - b) * K, s, fmax);
    });
    return;
  }
  lowbit::par_for(0, M, rows_per_task(K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float s = scale_from_amax(block_amax(xp + m * K, K), fmax, static_cast<float>(eps));
      sp[m] = s;
      fake_quant_block<T, F8>(xp + m * K, op + m * K, K, s, fmax);
    }
  });
}

// x (M, K) contiguous float32 / bfloat16 / float16 -> (fake-quantized x in x's dtype, float32 scale:
// (M, 1) per token, (1, 1) per tensor or static). static_scale > 0: that scale; else dynamic.
inline std::tuple<torch::Tensor, torch::Tensor> fake_quant_fp8(torch::Tensor x, double static_scale, bool per_token,
                                                             double eps, bool e5m2) {
  TORCH_CHECK(x.device().is_cpu(), "fake_quant_fp8: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fake_quant_fp8: x must be a contiguous (M, K) tensor, got ",
              x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fake_quant_fp8: x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.numel() > 0, "fake_quant_fp8: x is empty (shape ", x.sizes(), ")");
  TORCH_CHECK(std::isfinite(static_scale), "fake_quant_fp8: static_scale must be finite (or <= 0 for dynamic), got ",
              static_scale);
  TORCH_CHECK(eps > 0, "fake_quant_fp8: eps must be > 0, got ", eps);
  const float fmax = e5m2 ? 57344.f : 448.f;
  auto out = torch::empty_like(x);
  const bool rows = per_token && !(static_scale > 0);
  auto scale = torch::empty({rows ? x.size(0) : 1, 1}, x.options().dtype(at::kFloat));
#define LOWBIT_FP8_ACT(T)                                                                             \
  if (e5m2) run<T, c10::Float8_e5m2>(x, out, scale, static_scale, per_token, eps, fmax);               \
  else run<T, c10::Float8_e4m3fn>(x, out, scale, static_scale, per_token, eps, fmax);
  if (dt == at::kFloat) { LOWBIT_FP8_ACT(float) }
  else if (dt == at::kBFloat16) { LOWBIT_FP8_ACT(c10::BFloat16) }
  else { LOWBIT_FP8_ACT(c10::Half) }
#undef LOWBIT_FP8_ACT
  return {out, scale};
}

// ---- fused into a GEMV's widening of x (fp8_cpu, int4_cpu) ------------------------------------------
// A GEMV that widens x to its compute type anyway can write the fake-quantized values there instead:
// the same values fake_quant_fp8 returns (dynamic scales), with no tensor in between.

// The activation rule: per token or per tensor, e4m3fn or e5m2, eps; static_scale > 0: that scale for
// every row (a static activation scale, as fake_quant_fp8's static_scale), else dynamic.
struct Rule {
  bool per_token;
  float eps;
  bool e5m2;
  float static_scale = 0.f;
};

// The rule from a kernel entry's arguments (act_per_token, act_eps, act_e5m2), checked as
// fake_quant_fp8 checks its own; `who` names the entry in the error.
inline Rule make_rule(bool per_token, double eps, bool e5m2, const char* who) {
  TORCH_CHECK(eps > 0, who, ": act_eps must be > 0, got ", eps);
  return {per_token, static_cast<float>(eps), e5m2};
}

// A static rule (act_scale, a positive finite float: fake_quant_fp8's static_scale) from an entry's arguments.
inline Rule make_static_rule(double act_scale, double eps, bool e5m2, const char* who) {
  TORCH_CHECK(std::isfinite(act_scale) && act_scale > 0, who, ": act_scale must be a positive finite float, got ", act_scale);
  Rule r = make_rule(false, eps, e5m2, who);
  r.static_scale = static_cast<float>(act_scale);
  return r;
}

// Rows of x (M, K, row stride ldx) -> dst (row stride ldd): fake_quant_fp8's values as D. Per tensor,
// the amax is the rows' maximum, first NaN first (serially): the same value block_amax gives over all of
// x. Rows in parallel (lowbit::par_for; serial inside another parallel region).
template <typename T, typename F8, typename D>
void fake_quant_rows_f8(const T* x, int64_t M, int64_t K, int64_t ldx, D* dst, int64_t ldd, bool per_token, float eps,
                        float fmax, float s_static = 0.f) {
  if (!per_token || s_static > 0) {  // one scale: static (s_static > 0), or from the amax of all of x
    float amax = 0.f;
    for (int64_t m = 0; m < M && !(s_static > 0); ++m) {
      const float a = block_amax(x + m * ldx, K);
      if (std::isnan(a)) {
        amax = a;
        break;
      }
      amax = a > amax ? a : amax;
    }
    const float s = s_static > 0 ? s_static : scale_from_amax(amax, fmax, eps);
    lowbit::par_for(0, M, rows_per_task(K), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) fake_quant_block<T, F8, D>(x + m * ldx, dst + m * ldd, K, s, fmax);
    });
    return;
  }
  lowbit::par_for(0, M, rows_per_task(K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float s = scale_from_amax(block_amax(x + m * ldx, K), fmax, eps);
      fake_quant_block<T, F8, D>(x + m * ldx, dst + m * ldd, K, s, fmax);
    }
  });
}

// x: contiguous (M, K) float32 / bfloat16 / float16 (the caller checked) -> dst (M rows of K values,
// row stride ldd) of D: float (any x), or x's own element type.
template <typename D>
void fake_quant_into(const torch::Tensor& x, D* dst, int64_t ldd, const Rule& r) {
  const int64_t M = x.size(0), K = x.size(1);
  const auto dt = x.scalar_type();
  if constexpr (!std::is_same_v<D, float>)
    TORCH_CHECK(dt == c10::CppTypeToScalarType<D>::value, "fake_quant_into: x is ", dt, ", the destination ",
                c10::CppTypeToScalarType<D>::value);
#define LOWBIT_FP8_ROWS(T)                                                                                           \
  if (r.e5m2) fake_quant_rows_f8<T, c10::Float8_e5m2, D>(x.data_ptr<T>(), M, K, K, dst, ldd, r.per_token, r.eps, 57344.f, \
                                                         r.static_scale);                                            \
  else fake_quant_rows_f8<T, c10::Float8_e4m3fn, D>(x.data_ptr<T>(), M, K, K, dst, ldd, r.per_token, r.eps, 448.f,       \
                                                    r.static_scale);
  if (dt == at::kFloat) { LOWBIT_FP8_ROWS(float) }
  else if (dt == at::kBFloat16) { LOWBIT_FP8_ROWS(c10::BFloat16) }
  else if (dt == at::kHalf) { LOWBIT_FP8_ROWS(c10::Half) }
  else TORCH_CHECK(false, "fake_quant_into: x must be float32, bfloat16 or float16, got ", dt);
#undef LOWBIT_FP8_ROWS
}

}  // namespace fp8_act
