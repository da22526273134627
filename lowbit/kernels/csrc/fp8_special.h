// fp8_count_special: how many bytes of a float8 weight are NaN or inf (e4m3fn: 0x7F / 0xFF; e5m2:
// exponent 31, i.e. (b & 0x7C) == 0x7C). Shared by the two fp8_cpu builds. The AVX2 GEMV checks every
// weight byte for these on every call (its shift-only conversion would read them as finite values) unless
// the caller says, with finite_weight, that none is there: the Python layer counts once per version of a
// weight (lowbit/kernels/_fp8_cpu.py, weight_finite) and passes the answer.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "parallel.h"

namespace lowbit {

inline int64_t fp8_count_special(const torch::Tensor& qdata) {
  TORCH_CHECK(qdata.device().is_cpu(), "qdata must be a CPU tensor");
  const auto qt = qdata.scalar_type();
  TORCH_CHECK(qt == at::kFloat8_e4m3fn || qt == at::kFloat8_e5m2, "qdata must be float8_e4m3fn or float8_e5m2, got ", qt);
  const auto c = qdata.contiguous();
  const uint8_t* p = reinterpret_cast<const uint8_t*>(c.data_ptr());
  const int64_t n = c.numel();
  const uint8_t mask = qt == at::kFloat8_e5m2 ? 0x7C : 0x7F;
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> counts(std::max<int64_t>(chunks, 1), 0);
  par_for(0, chunks, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int64_t k = 0;
      for (int64_t j = i * kChunk, end = std::min(n, j + kChunk); j < end; ++j) k += (p[j] & mask) == mask;
      counts[i] = k;
    }
  });
  int64_t total = 0;
  for (int64_t k : counts) total += k;
  return total;
}

}  // namespace lowbit
