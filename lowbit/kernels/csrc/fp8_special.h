// fp8_count_special: how many bytes of a float8 weight are NaN or inf (e4m3fn: 0x7F / 0xFF; e5m2:
// exponent 31, i.e. (b & 0x7C) == 0x7C). Shared by the two fp8_cpu builds. The AVX2 GEMV checks every
// weight byte for these on every call (its shift-only conversion would read them as finite values) unless
// the caller says, with finite_weight, that none is there. fp8_weight_finite gives that answer counted once
// per version of a weight tensor (lowbit/kernels/_fp8_cpu.py's weight_finite and the compiled graphs' ops
// call it).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

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

// Whether no byte of qdata is NaN / inf, counted once per version of this tensor object: the answer is kept
// with the tensor's version counter and data pointer, so every in-place torch op (copy_, load_state_dict,
// fill_, a write through a view, which shares the counter) makes the next call count again; a write that
// bypasses the counter (through .data, numpy or a raw pointer) is not seen until fp8_forget_finite. The key
// is the TensorImpl, held weakly: its address is not reused while the entry lives, and an entry whose tensor
// died is dropped. An inference tensor has no version counter: false (the GEMV then checks every byte).
struct FiniteEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  const void* data;
  bool finite;
};

struct FiniteCache {
  std::mutex mu;
  std::unordered_map<const c10::TensorImpl*, FiniteEntry> map;
  size_t sweep_at = 64;
};

inline FiniteCache& finite_cache() {
  static FiniteCache* cache = new FiniteCache();  // never destroyed: used until the process exits
  return *cache;
}

inline bool fp8_weight_finite(const torch::Tensor& qdata) {
  if (qdata.is_inference()) return false;
  const c10::TensorImpl* key = qdata.unsafeGetTensorImpl();
  const uint32_t version = qdata._version();
  const void* data = qdata.data_ptr();
  FiniteCache& c = finite_cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.map.find(key);
    if (it != c.map.end() && !it->second.impl.expired() && it->second.version == version && it->second.data == data)
      return it->second.finite;
  }
  const bool finite = fp8_count_special(qdata) == 0;
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.map.size() >= c.sweep_at) {  // drop the entries of dead tensors; sweep again at twice the live count
    for (auto it = c.map.begin(); it != c.map.end();) it = it->second.impl.expired() ? c.map.erase(it) : std::next(it);
    c.sweep_at = std::max<size_t>(64, 2 * c.map.size());
  }
  c.map.insert_or_assign(key, FiniteEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(qdata.getIntrusivePtr()), version,
                                          data, finite});
  return finite;
}

// Forget fp8_weight_finite's answer for qdata (after a write that bypassed its version counter).
inline void fp8_forget_finite(const torch::Tensor& qdata) {
  FiniteCache& c = finite_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.map.erase(qdata.unsafeGetTensorImpl());
}

}  // namespace lowbit
