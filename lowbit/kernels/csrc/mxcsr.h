// MXCSR's DAZ (denormals-are-zero, bit 6) cleared for the life of the object and restored after
// (torch.set_flush_denormal(True) sets it): for kernels whose float32 or bf16 inputs may be subnormal
// and must not be read as zero. Any x86 build (SSE's MXCSR only).
#pragma once

#include <immintrin.h>

namespace lowbit {

struct NoDenormalsAreZero {
  unsigned csr = _mm_getcsr();
  NoDenormalsAreZero() {
    if (csr & 0x40) _mm_setcsr(csr & ~0x40u);
  }
  ~NoDenormalsAreZero() {
    if (csr & 0x40) _mm_setcsr(csr);
  }
};

}  // namespace lowbit
