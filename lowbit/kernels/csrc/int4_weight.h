// W4: the canonical int4 weight as the int4 kernels read it (int4_cpu.cpp's layout comment): packed nibbles
// (N, K/2), float32 scales (N, G), an int8 or float32 zero point or none. No instructions of any ISA here: both
// builds of int4_cpu (AVX-512 through int4_panels.h, AVX2) include it.
#pragma once

#include <cstdint>

namespace lowbit::int4 {

struct W4 {
  const uint8_t* q;
  const float* s;
  const int8_t* zp;  // int8 zero point, or nullptr
  const float* zf;   // float32 zero point, or nullptr (both nullptr: symmetric)
  int64_t N, K, G, gs, rb;
  int lg;  // log2(gs)
};

}  // namespace lowbit::int4
