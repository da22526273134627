// The CPU kernels of the dispatcher ops lowbit_cpu::fp8_small_linear and lowbit_cpu::fp8_small_act_linear
// (schemas, fake kernels and Python bodies in lowbit/kernels/_cpu_ops.py): what a compiled float8 graph calls
// per linear at M <= tiled_max_m. Each is eager's call, fp8_linear / fp8_linear_act with the weight's finite
// count (fp8_weight_finite), made without Python: the same values bit for bit. Included by both fp8_cpu builds
// after they define fp8_linear and fp8_linear_act; kCountsSpecial says whether the build's GEMV reads the
// finite_weight flag (the AVX2 build: its shift-only conversion must otherwise check every byte).
#pragma once

#include <torch/extension.h>

#include "fp8_special.h"

namespace {

bool small_m_finite(const torch::Tensor& x, const torch::Tensor& qdata, int64_t gemv_max_m) {
  return kCountsSpecial && x.dim() == 2 && x.size(0) <= gemv_max_m && lowbit::fp8_weight_finite(qdata);
}

// spec: the weight's spec key, which only the op's Python body reads.
torch::Tensor fp8_small_linear_op(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                                  int64_t gemv_max_m, int64_t tiled_max_m, int64_t chunk_rows, c10::string_view /*spec*/) {
  return fp8_linear(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, small_m_finite(x, qdata, gemv_max_m));
}

// spec, act_spec: the spec keys, which only the op's Python body reads (act_per_token, act_eps and act_e5m2 are
// act_spec's numbers).
torch::Tensor fp8_small_act_linear_op(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale,
                                      c10::optional<torch::Tensor> bias, int64_t gemv_max_m, int64_t tiled_max_m,
                                      int64_t chunk_rows, bool act_per_token, double act_eps, bool act_e5m2,
                                      c10::string_view /*spec*/, c10::string_view /*act_spec*/) {
  return fp8_linear_act(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, act_per_token, act_eps, act_e5m2,
                        small_m_finite(x, qdata, gemv_max_m));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("fp8_small_linear", TORCH_FN(fp8_small_linear_op));
  m.impl("fp8_small_act_linear", TORCH_FN(fp8_small_act_linear_op));
}
