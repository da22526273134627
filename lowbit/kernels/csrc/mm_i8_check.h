// The argument checks of mm_i8, shared by its two builds (int8_act_avx2.cpp: vpmaddubsw;
// int8_act.cpp: VNNI), so both refuse the same inputs with the same messages.
#pragma once

#include <torch/extension.h>

namespace lowbit {

inline void check_mm_i8(const torch::Tensor& a, const torch::Tensor& b, const char* op = "mm_i8") {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": a and b must be CPU tensors");
  TORCH_CHECK(a.scalar_type() == torch::kChar, op, ": a must be int8, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == torch::kChar, op, ": b must be int8, got ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), op, ": a must be a contiguous (M, K) tensor, got sizes ", a.sizes(),
              " strides ", a.strides());
  TORCH_CHECK(b.dim() == 2 && b.is_contiguous(), op, ": b must be a contiguous (N, K) tensor, got sizes ", b.sizes(),
              " strides ", b.strides());
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a (M, K) and b (N, K) must have the same K, got ", a.sizes(), " and ",
              b.sizes());
}

}  // namespace lowbit
