// The bf16 compute peak of this host: vdpbf16ps on 24 registers alone on every thread (bf16_peak.py builds it).
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>
#include "parallel.h"
#define TGT __attribute__((target("avx512f,avx512bf16")))
TGT void spin(int64_t iters) {
  asm volatile(
      "1:\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm0\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm1\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm2\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm3\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm4\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm5\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm6\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm7\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm8\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm9\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm10\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm11\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm12\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm13\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm14\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm15\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm16\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm17\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm18\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm19\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm20\n"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm21\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm22\n" "vdpbf16ps %%zmm30, %%zmm31, %%zmm23\n"
      "dec %0\n" "jnz 1b\n" : "+r"(iters) : : "zmm0","zmm1","zmm2","zmm3","zmm4","zmm5","zmm6","zmm7","zmm8","zmm9","zmm10","zmm11","zmm12","zmm13","zmm14","zmm15","zmm16","zmm17","zmm18","zmm19","zmm20","zmm21","zmm22","zmm23","cc");
}
double peak(int64_t iters) {
  auto t0 = std::chrono::steady_clock::now();
  lowbit::par_for(0, at::get_num_threads(), 1, [&](int64_t b, int64_t e) { for (int64_t i = b; i < e; ++i) spin(iters); });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(iters) * 24 * 16 * 2 * 2 * at::get_num_threads() / s / 1e9;  // flops: 16 lanes x 2 pairs x 2
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m2) { m2.def("peak", &peak); }
