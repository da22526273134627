// The canonical int4 weight as the AVX-512 kernels read it (int4_cpu.cpp's layout comment): W4 describes it, nib16_f32
// makes 16 of its elements exact float32 (q - zp) with one vpmultishiftqb and one ternary-logic op, and Int4Panels
// dequantizes rows into gemm_bf16.h's k-pair panels, bf16 values equal to the reference's dequantize. Shared by
// int4_cpu.cpp (int4 weight-only) and int8_int4.cpp (8da4w's AMX path); needs AVX-512 VBMI and BF16, which a
// build including it either requires (int4_cpu) or wraps the include in a target pragma for (int8_int4: used
// only where the CPU has them).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "gemm_bf16.h"
#include "int4_weight.h"
#include "panel.h"

namespace lowbit::int4 {

constexpr int kAndXor = 0x6A;  // ternary logic: (a & b) ^ c
constexpr int kAndOr = 0xEA;   // ternary logic: (a & b) | c

inline bool asym(const W4& w) { return w.zp || w.zf; }

// The part of the zero point nib16_f32 subtracts through the magic number: the integer one (or 8 for
// two's complement nibbles); a float zero point is subtracted after it (sub_zf), in float32.
inline float zbase_of(const W4& w, int64_t n, int64_t g) {
  return w.zp ? 8388608.f + float(w.zp[n * w.G + g]) : w.zf ? 8388608.f : 8388616.f;
}

// vpmultishiftqb control: dword d of the result gets bits [4d, 4d + 8) of a broadcast qword, i.e.
// element d of 16 packed nibbles in its low 4 bits.
inline __m512i nibble_ctrl() {
  alignas(64) uint8_t c[64] = {0};
  for (int d = 0; d < 16; ++d) c[4 * d] = uint8_t(4 * d);
  return _mm512_load_si512(c);
}

// 16 elements starting at element k (k % 16 == 0) of row r as exact float32 (q - zp).
inline __m512 nib16_f32(const uint8_t* qr, int64_t k, __m512i ctrl, __m512i m0f, __m512i magic, __m512 mz) {
  int64_t v;
  std::memcpy(&v, qr + k / 2, 8);
  __m512i t = _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(v));
  __m512 f = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(t, m0f, magic, kAndXor));
  return _mm512_sub_ps(f, mz);
}

// gemm_bf16's packer: rows n0 .. n0 + rows (<= 64) of W, columns [k0, k0 + kc), as dequant_row's bf16
// values (the reference's), in k-pairs (gemm_bf16.h). Rows past `rows` and columns past kc are zero.
struct Int4Panels {
  const W4* w;

  // kc % 32 == 0 and k0 % 32 == 0 (K is a multiple of the group size >= 32, gemm_bf16::kKC of 32), so
  // each 32 columns of a row lie in one group: dequant_row's arithmetic on them, in registers.
  void operator()(int64_t n0, int64_t rows, int64_t k0, int64_t kc, uint8_t* dst) const {
    const W4& ww = *w;
    const __m512i ctrl = nibble_ctrl(), m0f = _mm512_set1_epi32(0xF);
    const __m512i magic = _mm512_set1_epi32(asym(ww) ? 0x4B000000 : 0x4B000008);
    for (int v = 0; v < 4; ++v) {
      for (int64_t k = 0; k < kc; k += 32) {
        const int64_t g = (k0 + k) >> ww.lg;
        __m512i t[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = 16 * v + i;
          if (row >= rows) {
            t[i] = _mm512_setzero_si512();
            continue;
          }
          const int64_t n = n0 + row;
          const uint8_t* qr = ww.q + n * ww.rb;
          const __m512 mz = _mm512_set1_ps(zbase_of(ww, n, g)), sv = _mm512_set1_ps(ww.s[n * ww.G + g]);
          __m512 a = nib16_f32(qr, k0 + k, ctrl, m0f, magic, mz), b = nib16_f32(qr, k0 + k + 16, ctrl, m0f, magic, mz);
          if (ww.zf) {  // (q - zf) * s, as dequant_row
            const __m512 zv = _mm512_set1_ps(ww.zf[n * ww.G + g]);
            a = _mm512_sub_ps(a, zv);
            b = _mm512_sub_ps(b, zv);
          }
          t[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(b, sv), _mm512_mul_ps(a, sv));
        }
        lowbit::transpose16(t);
        uint8_t* out = dst + (k / 2) * gemm_bf16::kPairBytes + v * 64;
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + p * gemm_bf16::kPairBytes, t[p]);
      }
    }
  }
};

}  // namespace lowbit::int4
