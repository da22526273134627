// Float8 activation fake quantization in one pass, shared by both builds of int8_act (scalar C++:
// no instruction-set specific code; the build is compiled with -ffp-contract=off, so every float32
// operation below is the single IEEE operation lowbit.primitives.float8 does):
//   s   = clamp(amax / fmax, min=eps)                per row (per token), per tensor, or the static s
//   q   = float8(clamp(x / s, -fmax, fmax))          c10's float32 -> float8 conversion, as torch's .to()
//   out = cast_T(float(q) * s)                       c10's round-to-nearest-even cast, as torch's .to()
// NaN behaves as in torch: a NaN in a block makes its amax, hence its scale and every output, NaN.
#pragma once

#include <torch/extension.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <cmath>
#include <limits>

namespace fp8_act {

template <typename T>
inline float block_amax(const T* x, int64_t n) {
  float a = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::fabs(static_cast<float>(x[i]));
    if (std::isnan(v)) return v;
    a = v > a ? v : a;
  }
  return a;
}

inline float scale_from_amax(float amax, float fmax, float eps) {
  if (std::isnan(amax)) return amax;
  const float s = amax / fmax;
  return s < eps ? eps : s;
}

template <typename T, typename F8>
inline void fake_quant_block(const T* x, T* out, int64_t n, float s, float fmax) {
  for (int64_t i = 0; i < n; ++i) {
    float y = static_cast<float>(x[i]) / s;
    y = y < -fmax ? -fmax : (y > fmax ? fmax : y);  // NaN passes through, as torch.clamp
    const float q = static_cast<float>(F8(y));
    out[i] = static_cast<T>(q * s);
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
    fake_quant_block<T, F8>(xp, op, M * K, s, fmax);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    const float s = scale_from_amax(block_amax(xp + m * K, K), fmax, static_cast<float>(eps));
    sp[m] = s;
    fake_quant_block<T, F8>(xp + m * K, op + m * K, K, s, fmax);
  }
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

}  // namespace fp8_act
