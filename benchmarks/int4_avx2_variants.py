"""Candidate inner loops for the AVX2 int4 GEMV (issue 18) against the production kernel
(``csrc/int4_cpu_avx2.cpp`` ``gemv_bf16``) and a DRAM read probe, interleaved in one process.

The production loop spends, per 16 weights, vpmovzxbd, and, sub, srl, sub, 2 x vcvtdq2ps and
2 FMAs. The candidates (C++ below, built with the same flags) keep the canonical layout and the
exact products (q - zp) * x in float32, summed per group and scaled once:

* ``magic16``: vpmovzxbd | 0x4B000000, then one AND per half gives 2^23 + lo or 2^19 + hi as a
  float, minus 2^23 + zp / 2^19 + zp (8 ops per 16; no shift, no conversion instruction);
* ``lut_bf16``: a 32-byte load split once into low and high nibble vectors; vpshufb from two
  16-entry tables per zero point gives the two bytes of bf16(q - zp) (exact), interleaved into
  the high half of dwords = float32 (6.75 ops per 16, 16 of them shuffles per 64 weights);
* ``dword``: the 32 bytes as 8 dwords of 8 nibbles, no widening: d | 0x4F000000 then one AND per
  nibble position keeps 2^(23 - 4j) + q, minus 2^(23 - 4j) + zp (1 shift, 2 OR, then AND, SUB, FMA
  per 8 weights: 6.75 ops per 16); ``dword_r2`` shares each x load between two weight rows.

Static estimates (llvm-mca 14, ``-mcpu=znver3``, each compiled inner loop at M = 1, cycles per 64
weights): production 15.5 (vpmovzxbd ymm is modelled at 3 cycles on FP1/FP2, which the shift,
the conversions and half the FMAs also need), magic16 15.0, lut_bf16 11.1, dword 8.9 (FMA-bound in
the model). Measured on a quiet 2-core Zen 3 (2.45 GHz, load 0.1-1.0, 7 interleaved rounds; the results file):
at M = 1 against 8 x 4096^2 the production loop moves 6.88 GB/s on 1 thread and 9.77 on 2, 0.37 of
the DRAM probe (18.6 / 26.1 GB/s); the best candidates, dword_r2 and lut_bf16, 1.08-1.17x that
(0.40-0.44 of the probe), but 0.95-1.02x on the L2-resident rows and 0.86-0.94x at M = 4. So fewer
instructions per byte did not buy throughput where the weight sits in L2: the model's 1.7x for
dword did not appear, and the DRAM-row gain looks like the access pattern (2 row streams) rather
than the loop. The production kernel is unchanged. Lower bound for this design: 2 float32 FMAs
per 8 packed bytes; at 2 FMAs a cycle and 2.45 GHz that alone caps one core at 19.6 GB/s, before
any nibble decoding; a second thread gave 1.42x (the probe 1.40x).

Optionally (``--baseline REV``) an earlier revision of the production source is built from git
beside it (dispatcher registration stripped). Workloads, bf16 x of M rows, group 128 asymmetric
(int8 zero point) unless ``--symmetric``:

* ``dram``: 8 x Linear(4096, 4096) (66 MiB packed, over the 32 MiB L3), read once per call; GB/s
  beside ``torch.sum`` over 1 GiB of float32;
* ``l2``: Linear(512, 2048) (512 KiB, L2-resident) called 64 times: instruction throughput.

Every variant runs once per round, rounds interleaved; medians of wall and process CPU time (CPU
well below threads x wall means the process waited for a core). Each variant's SQNR against a
float64 reference is printed beside the production kernel's (both round the output to bf16).

Run: ``python benchmarks/int4_avx2_variants.py [--threads 1,2] [--m 1,4] [--rounds 11]``; writes
``benchmarks/results/int4_avx2_variants.json``. A measurement, not a test; x86-64 with AVX2, FMA
and F16C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup
from lowbit.kernels import _ext
from lowbit.primitives import choose_qparams_affine, dequantize_affine, pack_int4, quantize_affine
from lowbit.spec import QuantSpec

ROOT = Path(__file__).resolve().parent.parent
SRC = "lowbit/kernels/csrc/int4_cpu_avx2.cpp"
OUT = Path(__file__).parent / "results" / "int4_avx2_variants.json"
# (name, variant id in the C++ below, weight rows per step): M = 1 uses these, M > 1 one row per step
VARIANTS = [("magic16", 0, 4), ("lut_bf16", 1, 2), ("dword", 2, 1), ("dword_r2", 2, 2)]

_CPP = r"""
// Candidate inner loops for the AVX2 int4 GEMV (benchmarks/int4_avx2_variants.py builds this).
// Each computes out = x @ W.T for bf16 x (M <= 4 rows) and the canonical packed int4 weight
// (uint8 (N, K/2), low nibble = even element; float32 scale and int8 zero point per group >= 64),
// every product the exact float32 (q - zp) * x, summed per group in float32 and scaled once.
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

using lowbit::par_for;
constexpr int64_t kPrefetch = 32768;

struct W {
  const uint8_t* q;
  const float* s;
  const int8_t* zp;  // nullptr: symmetric (int4 two's complement nibbles)
  int64_t N, K, G, gs;
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

enum Var : int64_t { MAGIC16 = 0, LUT_BF16 = 1, DWORD = 2 };

// x as float32, permuted per chunk to the order each variant makes the weights in.
std::vector<float> permute(const c10::BFloat16* x, int64_t M, int64_t K, int64_t ldx, int64_t var) {
  std::vector<float> p(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      int64_t pos;
      if (var == MAGIC16) {  // per 16: 8 even, 8 odd
        pos = (k & ~int64_t(15)) + ((k & 1) << 3) + ((k & 15) >> 1);
      } else if (var == LUT_BF16) {  // per 64: pshufb/unpack order (parity, word quarter, lane, position)
        const int64_t e = k & 63, par = e & 1, i = e >> 1, L = i >> 4, j = (i & 15) >> 2, t = i & 3;
        pos = (k & ~int64_t(63)) + 32 * par + 8 * j + 4 * L + t;
      } else {  // per 64: nibble j of dword i at 8 j + i
        pos = (k & ~int64_t(63)) + ((k & 7) << 3) + ((k & 63) >> 3);
      }
      p[m * K + pos] = float(x[m * ldx + k]);
    }
  return p;
}

// ---- magic16: 8 bytes -> 8 dwords (vpmovzxbd) | 0x4B000000; even = v & 0xFF00000F = 2^23 + lo,
// odd = v & 0xFD0000F0 = 2^19 + hi (0x4B & 0xFD = 0x49); minus 2^23 + zp / 2^19 + zp. 8 ops per 16.
template <bool SYM, int R, int MM>
void magic16_rows(const W& w, const float* xp, int64_t n0, float* out) {
  const int64_t K = w.K, G = w.G, gs = w.gs;
  __m256 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm256_setzero_ps();
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = w.q + (n0 + r) * (K / 2);
  const __m256i mv = _mm256_set1_epi32(0x4B000000), me = _mm256_set1_epi32(int32_t(0xFF00000F)), mo = _mm256_set1_epi32(int32_t(0xFD0000F0));
  for (int64_t g = 0; g < G; ++g) {
    __m256 ae[R][MM], ao[R][MM], ce[R], co[R];
    for (int r = 0; r < R; ++r) {
      const int z = SYM ? 8 : w.zp[(n0 + r) * G + g];
      ce[r] = _mm256_set1_ps(8388608.f + z);
      co[r] = _mm256_set1_ps(524288.f + z);
      for (int m = 0; m < MM; ++m) ae[r][m] = ao[r][m] = _mm256_setzero_ps();
    }
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const int64_t kb = k >> 1;
      if ((k & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(qr[r] + kb + kPrefetch), _MM_HINT_NTA);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256i v = _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr[r] + kb))), mv);
        if constexpr (SYM) v = _mm256_xor_si256(v, _mm256_set1_epi32(0x88));  // two's complement nibble -> q + 8
        const __m256 ev = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(v, me)), ce[r]);
        const __m256 od = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(v, mo)), co[r]);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) {
          ae[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * K + k), ev, ae[r][m]);
          ao[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * K + k + 8), od, ao[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(w.s[(n0 + r) * G + g]);
      for (int m = 0; m < MM; ++m) tot[r][m] = _mm256_fmadd_ps(_mm256_add_ps(ae[r][m], ao[r][m]), sv, tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) out[m * w.N + n0 + r] = hsum(tot[r][m]);
}

// ---- lut_bf16: 32 bytes -> low / high nibble index vectors; vpshufb from two 16-entry tables per
// zero point gives the low and high byte of bf16(q - zp) (exact: |q - zp| <= 143 has <= 8
// significant bits); bytes interleaved to words, words to the high half of dwords = float32.
alignas(64) uint8_t kLut[257][32];  // [zp + 128]: 16 low bytes, 16 high bytes; [256]: symmetric
void init_lut() {
  for (int z = -128; z <= 128; ++z)
    for (int q = 0; q < 16; ++q) {
      const float v = z == 128 ? float(q < 8 ? q : q - 16) : float(q - z);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      kLut[z + 128][q] = (u >> 16) & 0xFF;
      kLut[z + 128][16 + q] = u >> 24;
    }
}

template <bool SYM, int R, int MM>
void lut_rows(const W& w, const float* xp, int64_t n0, float* out) {
  const int64_t K = w.K, G = w.G, gs = w.gs;
  __m256 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm256_setzero_ps();
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = w.q + (n0 + r) * (K / 2);
  const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  for (int64_t g = 0; g < G; ++g) {
    __m256i tl[R], th[R];
    __m256 a[R][MM][2];
    for (int r = 0; r < R; ++r) {
      const uint8_t* t = kLut[SYM ? 256 : w.zp[(n0 + r) * G + g] + 128];
      tl[r] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
      th[r] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t + 16)));
      for (int m = 0; m < MM; ++m) a[r][m][0] = a[r][m][1] = _mm256_setzero_ps();
    }
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
      const int64_t kb = k >> 1;
      if ((k & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(qr[r] + kb + kPrefetch), _MM_HINT_NTA);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr[r] + kb));
        const __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
#pragma GCC unroll 2
        for (int par = 0; par < 2; ++par) {
          const __m256i idx = par ? hi : lo;
          const __m256i A = _mm256_shuffle_epi8(tl[r], idx), B = _mm256_shuffle_epi8(th[r], idx);
          const __m256i w0 = _mm256_unpacklo_epi8(A, B), w1 = _mm256_unpackhi_epi8(A, B);
          const __m256 f[4] = {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w0)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w0)),
                               _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w1)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w1))};
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
            for (int m = 0; m < MM; ++m)
              a[r][m][j & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * K + k + 32 * par + 8 * j), f[j], a[r][m][j & 1]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(w.s[(n0 + r) * G + g]);
      for (int m = 0; m < MM; ++m) tot[r][m] = _mm256_fmadd_ps(_mm256_add_ps(a[r][m][0], a[r][m][1]), sv, tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) out[m * w.N + n0 + r] = hsum(tot[r][m]);
}

// ---- dword: 32 bytes = 8 dwords of 8 nibbles, no widening. Nibble j (bits 4j..4j+3, j < 4; the
// upper half shifted down for j >= 4) becomes the mantissa of 2^(23 - 4j) + q by one AND of
// d | 0x4F000000 (the union of the four exponents) with that exponent's bits and the nibble mask;
// minus 2^(23 - 4j) + zp. Per 64 elements: 1 shift, 2 OR, then per 8: AND, SUB, FMA.
struct MagicSub {
  float v[256][4];
  constexpr MagicSub() : v() {
    for (int z = 0; z < 256; ++z)
      for (int j = 0; j < 4; ++j) v[z][j] = float(int32_t(1) << (23 - 4 * j)) + float(z - 128);
  }
};
constexpr MagicSub kMagicSub{};

template <bool SYM, int R, int MM, int NA>
void dword_rows(const W& w, const float* xp, int64_t n0, float* out) {
  const int64_t K = w.K, G = w.G, gs = w.gs;
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = w.q + (n0 + r) * (K / 2);
  const __m256i orv = _mm256_set1_epi32(0x4F000000);
  const __m256i mk[4] = {_mm256_set1_epi32(0x4B00000F), _mm256_set1_epi32(0x490000F0), _mm256_set1_epi32(0x47000F00), _mm256_set1_epi32(0x4500F000)};
  __m256 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 c[R][4], a[R][MM][NA];
    for (int r = 0; r < R; ++r) {
      const float* cz = kMagicSub.v[(SYM ? 8 : w.zp[(n0 + r) * G + g]) + 128];
      for (int j = 0; j < 4; ++j) c[r][j] = _mm256_broadcast_ss(cz + j);
      for (int m = 0; m < MM; ++m)
        for (int i = 0; i < NA; ++i) a[r][m][i] = _mm256_setzero_ps();
    }
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
      const int64_t kb = k >> 1;
      if ((k & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(qr[r] + kb + kPrefetch), _MM_HINT_NTA);
      __m256i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr[r] + kb));
        if constexpr (SYM) d = _mm256_xor_si256(d, _mm256_set1_epi32(int32_t(0x88888888)));
        lo[r] = _mm256_or_si256(d, orv);
        hi[r] = _mm256_or_si256(_mm256_srli_epi32(d, 16), orv);
        __asm__("" : "+x"(lo[r]), "+x"(hi[r]));  // GCC would refold OR-then-AND into AND-then-OR: 8 more ops
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) {
          const __m256 xv = _mm256_loadu_ps(xp + m * K + k + 8 * j);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(j < 4 ? lo[r] : hi[r], mk[j & 3])), c[r][j & 3]);
            a[r][m][j % NA] = _mm256_fmadd_ps(xv, f, a[r][m][j % NA]);
          }
        }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(w.s + (n0 + r) * G + g);
      for (int m = 0; m < MM; ++m) {
        __m256 t = a[r][m][0];
        for (int i = 1; i < NA; ++i) t = _mm256_add_ps(t, a[r][m][i]);
        tot[r][m] = _mm256_fmadd_ps(t, sv, tot[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) out[m * w.N + n0 + r] = hsum(tot[r][m]);
}

template <int R, typename F>
void over_rows(const W& w, const F& rows) {
  par_for(0, w.N / R, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) rows(i * R);
  });
}

template <bool SYM, int MM>
void dispatch(int64_t var, int64_t R, const W& w, const float* xp, float* o) {
  if (var == MAGIC16 && R == 4) over_rows<4>(w, [&](int64_t n) { magic16_rows<SYM, 4, MM>(w, xp, n, o); });
  else if (var == MAGIC16 && R == 1) over_rows<1>(w, [&](int64_t n) { magic16_rows<SYM, 1, MM>(w, xp, n, o); });
  else if (var == LUT_BF16 && R == 2) over_rows<2>(w, [&](int64_t n) { lut_rows<SYM, 2, MM>(w, xp, n, o); });
  else if (var == LUT_BF16 && R == 1) over_rows<1>(w, [&](int64_t n) { lut_rows<SYM, 1, MM>(w, xp, n, o); });
  else if (var == DWORD && R == 1) over_rows<1>(w, [&](int64_t n) { dword_rows<SYM, 1, MM, MM == 1 ? 4 : 2>(w, xp, n, o); });
  else if (var == DWORD && R == 2) over_rows<2>(w, [&](int64_t n) { dword_rows<SYM, 2, MM, MM == 1 ? 2 : 1>(w, xp, n, o); });
  else TORCH_CHECK(false, "variant ", var, " has no build with ", R, " rows per step");
}

}  // namespace

// out (M, N) bf16 = x @ W.T for bf16 x (M <= 4), W as the canonical int4 data, group size >= 64.
torch::Tensor gemv(int64_t var, int64_t R, torch::Tensor x, torch::Tensor q, torch::Tensor s, c10::optional<torch::Tensor> zp) {
  static const bool lut_ready = (init_lut(), true);
  (void)lut_ready;
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.stride(1) == 1 && x.size(0) >= 1 && x.size(0) <= 4, "x: bf16 (M <= 4, K)");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.is_contiguous() && s.scalar_type() == torch::kFloat && s.is_contiguous(), "q uint8, s float32, contiguous");
  W w{q.data_ptr<uint8_t>(), s.data_ptr<float>(), zp ? zp->data_ptr<int8_t>() : nullptr, q.size(0), 2 * q.size(1), s.size(1), 0};
  w.gs = w.K / w.G;
  TORCH_CHECK(x.size(1) == w.K && w.gs >= 64 && (w.gs & (w.gs - 1)) == 0 && w.N % R == 0, "K, group >= 64, N % R");
  const int64_t M = x.size(0);
  const auto xp = permute(x.data_ptr<c10::BFloat16>(), M, w.K, x.stride(0), var);
  auto out = torch::empty({M, w.N});
  float* o = out.data_ptr<float>();
  const bool sym = w.zp == nullptr;
  switch (M) {
    case 1: sym ? dispatch<true, 1>(var, R, w, xp.data(), o) : dispatch<false, 1>(var, R, w, xp.data(), o); break;
    case 2: sym ? dispatch<true, 2>(var, R, w, xp.data(), o) : dispatch<false, 2>(var, R, w, xp.data(), o); break;
    case 3: sym ? dispatch<true, 3>(var, R, w, xp.data(), o) : dispatch<false, 3>(var, R, w, xp.data(), o); break;
    default: sym ? dispatch<true, 4>(var, R, w, xp.data(), o) : dispatch<false, 4>(var, R, w, xp.data(), o); break;
  }
  return out.to(torch::kBFloat16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv, "candidate int4 GEMV inner loops (see the benchmark)"); }
"""


def _build_variants():
    """The candidates above as an extension (cached by torch's build directory)."""
    d = Path(tempfile.gettempdir()) / "lowbit_int4_avx2_variants"
    d.mkdir(exist_ok=True)
    src = d / "int4_avx2_variants.cpp"
    if not src.exists() or src.read_text() != _CPP:
        src.write_text(_CPP)
    from torch.utils.cpp_extension import load

    return load(name="lowbit_int4_avx2_variants", sources=[str(src)], build_directory=str(d),
                extra_include_paths=[str(ROOT / "lowbit/kernels/csrc")],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"], verbose=False)


def _build_revision(rev: str):
    """The production AVX2 int4 extension as of git revision ``rev``, under its own module name."""
    text = subprocess.run(["git", "show", f"{rev}:{SRC}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # one build per process may register the lowbit_cpu dispatcher op: drop the revision's registration
    text = re.sub(r"TORCH_LIBRARY_FRAGMENT\(lowbit_cpu, m\) \{.*?\n\}\n", "", text, flags=re.S)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(lowbit_cpu, CPU, m\) \{.*?\}\n", "", text, flags=re.S)
    tag = re.sub(r"\W", "_", rev)
    d = Path(tempfile.gettempdir()) / f"lowbit_int4_avx2_{tag}"
    d.mkdir(exist_ok=True)
    src = d / "int4_cpu_avx2_rev.cpp"
    src.write_text(text)
    from torch.utils.cpp_extension import load

    return load(name=f"lowbit_int4_avx2_rev_{tag}", sources=[str(src)], build_directory=str(d),
                extra_include_paths=[str(ROOT / "lowbit/kernels/csrc")],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"], verbose=False)


def _weights(n, k, layers, symmetric, gen):
    """Per layer (qdata, scale, zero_point or None, float64 dequantized weight)."""
    spec = (QuantSpec("int4", PerGroup(128), symmetric=True) if symmetric
            else QuantSpec("uint4", PerGroup(128), symmetric=False, zero_point_dtype=torch.int8))
    out = []
    for i in range(layers):
        w = torch.randn(n, k, generator=gen) * 0.02
        s, z = choose_qparams_affine(w, spec)
        q = quantize_affine(w, s, z, spec)
        deq = dequantize_affine(q, s, z, spec).double() if i == 0 else None
        out.append((pack_int4(q), s.contiguous(), None if z is None else z.contiguous(), deq))
    return out


def _nbytes(layers) -> int:
    return sum(t.numel() * t.element_size() for L in layers for t in L[:3] if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, help="also time the production source at this git revision")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--m", default="1,4", help="rows of x (1..4)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    load_start = os.getloadavg()
    cur = _ext.load("int4_cpu")
    if cur is None or _ext.status()["int4_cpu"] != "ok (avx2)":
        raise SystemExit(f"needs the AVX2 build of int4_cpu, got {_ext.status()['int4_cpu']} (LOWBIT_ISA=avx2 forces it)")
    var = _build_variants()
    kernels = {"current": lambda x, q, s, z: cur.gemv_bf16(x, q, s, z, None)}
    if args.baseline:
        base = _build_revision(args.baseline)
        kernels[f"rev_{args.baseline}"] = lambda x, q, s, z: base.gemv_bf16(x, q, s, z, None)
    for name, vid, rows in VARIANTS:
        kernels[name] = lambda x, q, s, z, vid=vid, rows=rows: var.gemv(vid, rows if x.shape[0] == 1 else 1, x, q, s, z)
    gen = torch.Generator().manual_seed(0)
    work = {"dram": (_weights(4096, 4096, 8, args.symmetric, gen), 1),
            "l2": (_weights(512, 2048, 1, args.symmetric, gen), 64)}
    probe = torch.ones(256 * 1024 * 1024)  # 1 GiB float32
    ms = [int(m) for m in args.m.split(",")]
    xs = {(m, k): torch.randn(m, k, generator=gen).bfloat16() for m in ms for k in (4096, 2048)}

    sqnr_db = {}  # against x @ W.T in float64, W the dequantized weight (outputs rounded to bf16)
    for wname, (layers, _) in work.items():
        q, s, z, deq = layers[0]
        for m in ms:
            x = xs[(m, 2 * q.shape[1])]
            ref = (x.double() @ deq.T).float()
            for kname, fn in kernels.items():
                sqnr_db[f"{wname}/M{m}/{kname}"] = round(float(sqnr(ref, fn(x, q, s, z).float())), 1)

    variants = {"dram_probe_sum_1GiB": (lambda: probe.sum(), probe.numel() * 4)}
    for wname, (layers, reps) in work.items():
        for m in ms:
            for kname, kfn in kernels.items():
                def run(kfn=kfn, layers=layers, reps=reps, m=m):
                    for _ in range(reps):
                        for q, s, z, _ in layers:
                            kfn(xs[(m, 2 * q.shape[1])], q, s, z)
                variants[f"{wname}/M{m}/{kname}"] = (run, _nbytes(layers) * reps)

    rows = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for fn, _ in variants.values():
            fn()
        wall = {n: [] for n in variants}
        cpu = {n: [] for n in variants}
        for _ in range(args.rounds):
            for name, (fn, _) in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        probe_gbs = variants["dram_probe_sum_1GiB"][1] / statistics.median(wall["dram_probe_sum_1GiB"]) / 1e9
        for name, (_, nbytes) in variants.items():
            med = statistics.median(wall[name])
            r = {"threads": threads, "median_ms": round(med * 1e3, 3), "cpu_median_ms": round(statistics.median(cpu[name]) * 1e3, 3),
                 "min_ms": round(min(wall[name]) * 1e3, 3), "bytes": nbytes, "GB_per_s": round(nbytes / med / 1e9, 2)}
            if not name.startswith("l2/"):
                r["fraction_of_probe"] = round(nbytes / med / 1e9 / probe_gbs, 3)
            if name.count("/") == 2 and not name.endswith("/current"):
                cur_name = name.rsplit("/", 1)[0] + "/current"
                r["speedup_vs_current"] = round(statistics.median(wall[cur_name]) / med, 2)
                r["cpu_speedup_vs_current"] = round(statistics.median(cpu[cur_name]) / statistics.median(cpu[name]), 2)
            rows[f"{threads}t/{name}"] = r
    result = {
        "what": "AVX2 int4 GEMV inner loops, bf16 x, group 128, " + ("symmetric" if args.symmetric else "asymmetric int8 zero point")
                + "; dram: 8 x Linear(4096, 4096) once per call; l2: Linear(512, 2048) x 64 calls; medians of interleaved rounds",
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "current": subprocess.run(["git", "log", "-1", "--format=%h", "HEAD", "--", SRC], cwd=ROOT, capture_output=True, text=True).stdout.strip()
                   + (" + working tree" if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", SRC], cwd=ROOT).returncode else ""),
        "variants": {name: {"id": vid, "rows_per_step_at_M1": rows_} for name, vid, rows_ in VARIANTS},
        "sqnr_db_vs_float64": sqnr_db,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "results": rows,
    }
    print(f"{'variant':30s} {'median ms':>10s} {'cpu ms':>8s} {'GB/s':>7s} {'of probe':>8s} {'x cur':>6s} {'cpu x':>6s}")
    for name, r in rows.items():
        print(f"{name:30s} {r['median_ms']:10.2f} {r['cpu_median_ms']:8.2f} {r['GB_per_s']:7.2f} "
              f"{r.get('fraction_of_probe', float('nan')):8.2f} {r.get('speedup_vs_current', float('nan')):6.2f} "
              f"{r.get('cpu_speedup_vs_current', float('nan')):6.2f}")
    print("SQNR vs float64 (dB):", sqnr_db)
    print("load", load_start, "->", result["loadavg_end"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
