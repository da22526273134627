// x (M, K) bfloat16 / float16 / float32, any strides, widened exactly to float32 rows of a given stride: shared
// by the int8 GEMV (int8_gemv_entry.h) and the AVX2 float8 kernel (fp8_cpu_avx2.cpp). bf16 is a 16-bit shift,
// float16 vcvtph2ps (F16C, in both builds' flags); other layouts go through ATen's conversion.
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lowbit {

// Row m of x into dst + m * ld (K floats; the padding past K is the caller's).
inline void widen_rows(const torch::Tensor& x, float* dst, int64_t ld) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const auto xt = x.scalar_type();
  if (sk == 1 && xt == torch::kBFloat16) {
    const uint16_t* base = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* p = base + m * sm;
      float* o = dst + m * ld;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        _mm256_storeu_ps(o + k, _mm256_castsi256_ps(_mm256_slli_epi32(
                                    _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))), 16)));
      for (; k < K; ++k) {
        const uint32_t u = uint32_t(p[k]) << 16;
        std::memcpy(o + k, &u, 4);
      }
    }
  } else if (sk == 1 && xt == torch::kHalf) {
    const c10::Half* base = x.data_ptr<c10::Half>();
    for (int64_t m = 0; m < M; ++m) {
      const c10::Half* p = base + m * sm;
      float* o = dst + m * ld;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))));
      for (; k < K; ++k) o[k] = float(p[k]);
    }
  } else if (sk == 1 && xt == torch::kFloat) {
    for (int64_t m = 0; m < M; ++m) std::memcpy(dst + m * ld, x.data_ptr<float>() + m * sm, K * sizeof(float));
  } else {
    const auto xf = x.to(torch::kFloat).contiguous();
    for (int64_t m = 0; m < M; ++m) std::memcpy(dst + m * ld, xf.data_ptr<float>() + m * K, K * sizeof(float));
  }
}

}  // namespace lowbit
