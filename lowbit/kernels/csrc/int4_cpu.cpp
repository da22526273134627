// Int4 weight-only linear for CPU (AVX-512 F/BW/VL + BF16 + VBMI).
//
// Weight: qdata uint8 (N, K/2), byte j of a row = element 2j (low nibble) | element 2j+1 (high
// nibble); asymmetric nibbles are uint4 q with an int8 zero point per group, symmetric nibbles are
// int4 two's complement (q + 8 == nibble ^ 8, no zero point). scale float32 (N, G), group size
// gs = K / G a power of two >= 32 (gemv_f32 steps 32 elements within a group). W[n, k] = (q - zp) * s.
// A float32 zero point (the float zero-point domain) is taken as it is: every path that removes the
// zero point once per group (the bf16 GEMV and small-M GEMM) reads it as a float; the paths that form
// (q - zp) per element (dequantization, gemv_f32) form q exactly and subtract zp in float32, one
// rounding, as the reference does.
//
// Every entry point checks its own arguments (devices, dtypes, ranks, shapes, strides, group size)
// with TORCH_CHECK before touching memory: whatever Python passes, nothing is read out of bounds.
//
// Three paths (the Python wrapper picks by M and dtype):
//  * gemv_bf16 (bf16 x, small M): streams the packed weight once. Nibbles become bf16 with a shift
//    and a ternary-logic op each (bits 0x4180 | q << 3 == 16 + q exactly), dot products with vdpbf16ps
//    against a copy of x permuted once per call to the nibble-unpack order, per-lane group scale
//    with one FMA per 128 elements, and the constant part removed once per row:
//    dot(x, 16 + q) - sum_g s_g (16 + zp_g) sum(x over g). Float32 accumulation, so an absolute error of
//    about 2^-24 (16 + zp) s sum|x| (README, "Int4's bf16 GEMM at small M multiplies by q - zp"). M <= 16: rows of x
//    in blocks of at most 4, each block against 4 rows of W while they are in L1 (int4_gemv_bf16.h); a
//    row's result is the same whatever the other rows of x are.
//  * gemv_f32 (float32 / float16 x, M = 1): x in float32, nibbles -> float32 exactly
//    (0x4B000000 | v == 2^23 + v, minus 2^23 + zp), FMA per group, scale per group.
//  * gemm_small_bf16 (bf16 x, small M): the nibbles of a tile of rows are looked up as bf16 (q - zp)
//    (exact; int4_gemv_bf16.h's NibbleLut) into an L1 buffer, then vdpbf16ps with a broadcast weight
//    pair against 16 rows of x at a time (x repacked once per call as k-pairs x 16 rows), the group
//    scale by one FMA per segment: products exact, float32 sums, no offset.
//  * gemm_bf16 (bf16 x, larger M): gemm_bf16.h's GEMM, its panels of 64 rows dequantized exactly (bf16,
//    bit-equal to the reference dequantize) per call inside the GEMM, in L2.
//  * linear_chunked (float32 / float16 x, large M): rows of W dequantized exactly into a reused
//    buffer in x's dtype, at::addmm / at::mm per chunk into the output's column slice.
// gemv_bf16_act: gemv_bf16 with float8 dynamic activations (fp8_act.h's fake quantization) done in
// the same call, into the bf16 copy of x the permutation reads (fp8 x int4's eager decode entry).
// vdpbf16ps ignores MXCSR: it reads bf16 subnormal inputs as zero and flushes subnormal products and
// partial sums, while the per-group sums of x (the offset's correction) are float32 adds that keep
// them. So both bf16 paths first scale each row of a copy of x by 2^j (exact; bf16_scale.h) so that its
// largest value is 2^kScaleTop .. 2^(kScaleTop + 1), and multiply the row's results by 2^-j in double
// (one rounding to float32) before the bias: rows whose largest value is >= 2^kScaleTop are untouched,
// others give the unscaled float32 result exactly unless it was flushed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_scale.h"
#include "bf16_rows.h"
#include "fp8_act.h"
#include "gemm_bf16.h"
#include "int4_gemv_bf16.h"
#include "int4_panels.h"
#include "parallel.h"
#include "prefetch.h"

namespace {

using lowbit::par_for;
using namespace lowbit::int4;

constexpr int64_t kMinGroup = 32;

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor");
}

W4 make_w4(const torch::Tensor& q, const torch::Tensor& s, const c10::optional<torch::Tensor>& zp) {
  check_cpu(q, "qdata");
  check_cpu(s, "scale");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous(), "qdata must be contiguous uint8 (N, K/2), got ",
              q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == torch::kFloat && s.is_contiguous() && s.size(0) == q.size(0),
              "scale must be contiguous float32 (N, G) with N = ", q.size(0), ", got ", s.scalar_type(), " ", s.sizes());
  W4 w;
  w.q = q.data_ptr<uint8_t>();
  w.s = s.data_ptr<float>();
  w.N = q.size(0);
  w.rb = q.size(1);
  w.K = 2 * w.rb;
  w.G = s.size(1);
  TORCH_CHECK(w.G > 0 && w.K % w.G == 0, "scale groups (", w.G, ") must divide K (", w.K, ")");
  w.gs = w.K / w.G;
  TORCH_CHECK(w.gs >= kMinGroup && (w.gs & (w.gs - 1)) == 0, "group size must be a power of two >= ", kMinGroup,
              ", got ", w.gs);
  w.lg = 0;
  while ((int64_t(1) << w.lg) < w.gs) ++w.lg;
  w.zp = nullptr;
  w.zf = nullptr;
  if (zp.has_value() && zp->defined()) {
    check_cpu(*zp, "zero_point");
    TORCH_CHECK((zp->scalar_type() == torch::kChar || zp->scalar_type() == torch::kFloat) && zp->is_contiguous() &&
                    zp->sizes() == s.sizes(),
                "zero_point must be contiguous int8 or float32 shaped like scale ", s.sizes(), ", got ", zp->scalar_type(), " ",
                zp->sizes());
    if (zp->scalar_type() == torch::kChar) w.zp = zp->data_ptr<int8_t>();
    else w.zf = zp->data_ptr<float>();
  }
  return w;
}

// Elements [k0, k1) of row n ((q - zp) * s in float32, one rounding to T), k0 % 16 == 0,
// k1 % 16 == 0. T: float, c10::BFloat16 or c10::Half.
template <typename T>
inline void store16(T* o, __m512 a) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(o, a);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), (__m256i)_mm512_cvtneps_pbh(a));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T>
inline void store32(T* o, __m512 a, __m512 b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(b, a));
  } else {
    store16(o, a);
    store16(o + 16, b);
  }
}

// Elements [k0, k1) of row n ((q - zp) * s in float32, one rounding to T), k0 % 16 == 0,
// k1 % 16 == 0. T: float, c10::BFloat16 or c10::Half.
template <typename T>
void dequant_row(const W4& w, int64_t n, int64_t k0, int64_t k1, T* out) {
  const __m512i ctrl = nibble_ctrl(), m0f = _mm512_set1_epi32(0xF);
  const __m512i magic = _mm512_set1_epi32(asym(w) ? 0x4B000000 : 0x4B000008);
  const uint8_t* qr = w.q + n * w.rb;
  const float* sr = w.s + n * w.G;
  int64_t k = k0;
  while (k < k1) {
    const int64_t g = k >> w.lg;
    const int64_t ke = std::min(k1, (g + 1) << w.lg);
    const __m512 mz = _mm512_set1_ps(zbase_of(w, n, g));
    const __m512 sv = _mm512_set1_ps(sr[g]);
    T* o = out + (k - k0);
    if (w.zf) {  // (q - zf) * s: q exact, one rounding for the subtraction, one for the product
      const __m512 zv = _mm512_set1_ps(w.zf[n * w.G + g]);
      for (; k < ke; k += 16, o += 16)
        store16(o, _mm512_mul_ps(_mm512_sub_ps(nib16_f32(qr, k, ctrl, m0f, magic, mz), zv), sv));
      continue;
    }
    for (; k + 32 <= ke; k += 32, o += 32)
      store32(o, _mm512_mul_ps(nib16_f32(qr, k, ctrl, m0f, magic, mz), sv),
              _mm512_mul_ps(nib16_f32(qr, k + 16, ctrl, m0f, magic, mz), sv));
    for (; k < ke; k += 16, o += 16) store16(o, _mm512_mul_ps(nib16_f32(qr, k, ctrl, m0f, magic, mz), sv));
  }
}

template <typename T>
void dequant_rows_t(const W4& w, int64_t r0, int64_t r1, T* out, bool parallel) {
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) dequant_row<T>(w, n, 0, w.K, out + (n - r0) * w.K);
  };
  if (parallel) par_for(r0, r1, 8, body);
  else body(r0, r1);
}

void dequant_rows_any(const W4& w, int64_t r0, int64_t r1, torch::Tensor& out, bool parallel) {
  switch (out.scalar_type()) {
    case at::kBFloat16: dequant_rows_t(w, r0, r1, out.data_ptr<c10::BFloat16>(), parallel); break;
    case at::kHalf: dequant_rows_t(w, r0, r1, out.data_ptr<c10::Half>(), parallel); break;
    case at::kFloat: dequant_rows_t(w, r0, r1, out.data_ptr<float>(), parallel); break;
    default: TORCH_CHECK(false, "dequant output must be bfloat16, float16 or float32");
  }
}

// ---- GEMV, float32 math (float32 / float16 x), M = 1 -------------------------------------------

template <int R>
inline void gemv_f32_rows(const W4& w, const float* x, int64_t n0, const float* bias, void* out, at::ScalarType ot) {
  const __m512i ctrl = nibble_ctrl(), m0f = _mm512_set1_epi32(0xF);
  const __m512i magic = _mm512_set1_epi32(asym(w) ? 0x4B000000 : 0x4B000008);
  const int64_t gs = w.gs;
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 a0[R], a1[R], mz[R], zv[R];
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_setzero_ps();
      a1[r] = _mm512_setzero_ps();
      mz[r] = _mm512_set1_ps(zbase_of(w, n0 + r, g));
      zv[r] = _mm512_set1_ps(w.zf ? w.zf[(n0 + r) * w.G + g] : 0.f);
    }
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const uint8_t* qr = w.q + (n0 + r) * w.rb;
        if ((k & 127) == 0) lowbit::prefetch_stream(qr + k / 2);
        __m512 w0 = nib16_f32(qr, k, ctrl, m0f, magic, mz[r]), w1 = nib16_f32(qr, k + 16, ctrl, m0f, magic, mz[r]);
        if (w.zf) {  // q - zf in float32, one rounding (the reference's)
          w0 = _mm512_sub_ps(w0, zv[r]);
          w1 = _mm512_sub_ps(w1, zv[r]);
        }
        a0[r] = _mm512_fmadd_ps(x0, w0, a0[r]);
        a1[r] = _mm512_fmadd_ps(x1, w1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      tot[r] = _mm512_fmadd_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_set1_ps(w.s[(n0 + r) * w.G + g]), tot[r]);
  }
  for (int r = 0; r < R; ++r) {
    float v = _mm512_reduce_add_ps(tot[r]);
    if (bias) v += bias[n0 + r];
    store_out(out, ot, n0 + r, v);
  }
}

// ---- small-M GEMM, bf16 x ----------------------------------------------------------------------
//
// A chunk of 128 elements of a row is 16 dwords; dword i holds nibbles of elements 8i .. 8i + 7
// at bits 4t. The low 4 bits of each word of D >> 4j, looked up (LutTables: vpermw / vpermt2w), are the
// bf16 pair (q[8i + j] - zp, q[8i + j + 4] - zp): 4 shifts and lookups give all 64 pairs of the chunk.
// Each pair is broadcast and multiplied (vdpbf16ps) with a vector of 16 x rows holding the same two
// elements, packed once per call. Accumulators are per (row of W, 16 rows of x): a segment of
// min(gs, 128) elements is one group, its accumulator is scaled by s[n, g] with one FMA. A float zero
// point: the table gives bf16 q and sum_g s zf sum_{k in g} x is removed at the end. Against the
// offset form (bf16 128 + q, sum_g s (128 + zp) sum x removed after; before session 26) 0.88-1.00x the time
// at M = 12 on 8 x 4096^2 (avx512_zen4/scratch/int4_lut_ab_session26.txt), and exact products.

// xpk[b][c][j][i][l] = (x[16b + l, 128c + 8i + j], x[16b + l, 128c + 8i + j + 4]); zero padded.
std::vector<uint32_t> pack_x_pairs(const c10::BFloat16* x, int64_t M, int64_t K, int64_t ldx, int64_t C) {
  const int64_t MB = (M + 15) / 16;
  std::vector<uint32_t> xp(MB * C * 64 * 16, 0);
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x + m * ldx);
    uint32_t* d = xp.data() + (m / 16) * C * 1024 + (m % 16);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t kb = c * 128;
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 16; ++i) {
          const int64_t k0 = kb + 8 * i + j, k1 = k0 + 4;
          const uint32_t lo = k0 < K ? xr[k0] : 0, hi = k1 < K ? xr[k1] : 0;
          d[(c * 64 + j * 16 + i) * 16] = lo | (hi << 16);
        }
    }
  }
  return xp;
}

template <int MB, int NT, int LM>
void gemm_small_impl(const W4& w, const uint32_t* xp, const float* sxp, const double* post, int64_t M, const float* bias,
                     void* out, at::ScalarType ot) {
  const int64_t N = w.N, K = w.K, G = w.G, C = (K + 127) / 128;
  const int64_t seg = std::min<int64_t>(w.gs, 128);  // elements per segment (one group)
  const int ipg = int(seg / 8);                      // dword lanes i per segment
  const int64_t ntiles = (N + NT - 1) / NT;
  const int64_t tail_bytes = w.rb - (C - 1) * 64;
  const __mmask64 tail_mask = tail_bytes >= 64 ? ~__mmask64(0) : ((__mmask64(1) << tail_bytes) - 1);
  const __m512i m0f = _mm512_set1_epi32(0x000F000F);
  const __m512i gbits = lut_group_bits<LM>();
  par_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    alignas(64) uint32_t wbuf[NT][64];
    alignas(64) float tot[NT][MB][16];
    alignas(64) float tmp[16];
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * NT;
      int64_t nr[NT];
      for (int n = 0; n < NT; ++n) nr[n] = std::min<int64_t>(n0 + n, N - 1);  // tail rows repeat the last
      // scaled per-group sums, in memory (one load/FMA/store per 64 pairs): registers hold acc only
      for (int n = 0; n < NT; ++n)
        for (int b = 0; b < MB; ++b) _mm512_store_ps(tot[n][b], _mm512_setzero_ps());
      for (int64_t c = 0; c < C; ++c) {
        const __mmask64 bm = c + 1 < C ? ~__mmask64(0) : tail_mask;
        for (int n = 0; n < NT; ++n) {
          const uint8_t* src = w.q + nr[n] * w.rb + c * 64;
          lowbit::prefetch_stream(src);
          const __m512i v = _mm512_maskz_loadu_epi8(bm, src);
          const LutTables<LM> lt(w, nr[n], c);  // words 2i, 2i + 1 are in the chunk's group 8i / gs, as in the GEMV
          _mm512_store_si512(wbuf[n], lt.lookup(v, m0f, gbits));
          _mm512_store_si512(wbuf[n] + 16, lt.lookup(_mm512_srli_epi32(v, 4), m0f, gbits));
          _mm512_store_si512(wbuf[n] + 32, lt.lookup(_mm512_srli_epi32(v, 8), m0f, gbits));
          _mm512_store_si512(wbuf[n] + 48, lt.lookup(_mm512_srli_epi32(v, 12), m0f, gbits));
        }
        const int64_t nseg = std::min<int64_t>(128, K - c * 128) / seg;
        for (int64_t sgi = 0; sgi < nseg; ++sgi) {
          const int64_t g = (c * 128 + sgi * seg) >> w.lg;
          __m512 acc[NT][MB];
          for (int n = 0; n < NT; ++n)
            for (int b = 0; b < MB; ++b) acc[n][b] = _mm512_setzero_ps();
          for (int j = 0; j < 4; ++j) {
            for (int i = int(sgi) * ipg; i < int(sgi + 1) * ipg; ++i) {
              const int p = j * 16 + i;
              __m512bh xv[MB];
              for (int b = 0; b < MB; ++b) xv[b] = (__m512bh)_mm512_loadu_si512(xp + ((b * C + c) * 64 + p) * 16);
#pragma GCC unroll 16
              for (int n = 0; n < NT; ++n) {
                const __m512bh wv = (__m512bh)_mm512_set1_epi32(int(wbuf[n][p]));
                for (int b = 0; b < MB; ++b) acc[n][b] = _mm512_dpbf16_ps(acc[n][b], wv, xv[b]);
              }
            }
          }
          for (int n = 0; n < NT; ++n) {
            const __m512 sv = _mm512_set1_ps(w.s[nr[n] * G + g]);
            for (int b = 0; b < MB; ++b) _mm512_store_ps(tot[n][b], _mm512_fmadd_ps(acc[n][b], sv, _mm512_load_ps(tot[n][b])));
          }
        }
      }
      const int64_t nv = std::min<int64_t>(NT, N - n0);
      for (int n = 0; n < nv; ++n) {
        const int64_t row = n0 + n;
        const float bv = bias ? bias[row] : 0.f;
        for (int b = 0; b < MB; ++b) {
          __m512 corr = _mm512_setzero_ps();
          for (int64_t g = 0; w.zf && g < G; ++g) {
            const float cg = w.s[row * G + g] * w.zf[row * G + g];
            corr = _mm512_fmadd_ps(_mm512_set1_ps(cg), _mm512_loadu_ps(sxp + (b * G + g) * 16), corr);
          }
          _mm512_store_ps(tmp, _mm512_sub_ps(_mm512_load_ps(tot[n][b]), corr));
          const int64_t mend = std::min<int64_t>(16, M - b * 16);
          for (int64_t l = 0; l < mend; ++l)
            store_out(out, ot, (b * 16 + l) * N + row, lowbit::unscale(tmp[l], post[b * 16 + l]) + bv);
        }
      }
    }
  });
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N, torch::Tensor& keep) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point(), "bias must be floating (N,) with N = ", N,
              ", got ", bias->scalar_type(), " ", bias->sizes());
  keep = bias->to(torch::kFloat).contiguous();
  return keep.data_ptr<float>();
}

}  // namespace

// out = x @ W.T + bias for bf16 x (2-D, row stride any, unit column stride), 1 <= M <= 16. act: x is
// first fake-quantized by that rule (gemv_bf16_act), into a bf16 copy the permutation then reads.
static torch::Tensor gemv_bf16_entry(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                                     c10::optional<torch::Tensor> bias, const fp8_act::Rule* act) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(1) == w.K && (act || x.stride(1) == 1),
              "x must be bf16 (M, K) with K = ", w.K, act ? "" : " and unit column stride", ", got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= kGemvMaxM, "gemv_bf16 takes 1 <= M <= ", kGemvMaxM, ", got M = ", M);
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  std::vector<c10::BFloat16> xq;  // act: fake_quant_fp8's bf16 values, rows of K
  if (act) {
    xq.resize(M * w.K);
    fp8_act::fake_quant_into(x.contiguous(), xq.data(), w.K, *act);
  }
  XPerm p = act ? permute_x(xq.data(), M, w.K, w.K, w.G, w.gs) : permute_x(x.data_ptr<c10::BFloat16>(), M, w.K, x.stride(0), w.G, w.gs);
  auto out = torch::empty({M, w.N}, x.options());
  void* op = out.data_ptr();
  gemv_bf16_impl(w, p, M, bp, op, at::kBFloat16);
  return out;
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                        c10::optional<torch::Tensor> bias) {
  return gemv_bf16_entry(x, qdata, scale, zp, bias, nullptr);
}

// gemv_bf16(fake_quant_fp8(x, dynamic, act_per_token, act_eps, act_e5m2), ...) in one call, bit for bit
// (float8 dynamic activations x int4 weight, the eager decode plan's entry; the dispatcher op keeps
// gemv_bf16's schema).
torch::Tensor gemv_bf16_act(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                            c10::optional<torch::Tensor> bias, bool act_per_token, double act_eps, bool act_e5m2) {
  const fp8_act::Rule rule = fp8_act::make_rule(act_per_token, act_eps, act_e5m2, "gemv_bf16_act");
  return gemv_bf16_entry(x, qdata, scale, zp, bias, &rule);
}

// out = x @ W.T + bias for float32 / float16 x of shape (1, K), float32 math.
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                       c10::optional<torch::Tensor> bias) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == w.K, "x must be (1, K) with K = ", w.K, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kHalf, "x must be float32 or float16, got ",
              x.scalar_type());
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  auto xf = x.to(torch::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  auto out = torch::empty({1, w.N}, x.options());
  void* op = out.data_ptr();
  const at::ScalarType ot = x.scalar_type();
  const int64_t nb = (w.N + 3) / 4;
  par_for(0, nb, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * 4;
      if (n0 + 4 <= w.N) gemv_f32_rows<4>(w, xp, n0, bp, op, ot);
      else
        for (int64_t n = n0; n < w.N; ++n) gemv_f32_rows<1>(w, xp, n, bp, op, ot);
    }
  });
  return out;
}

// x: bf16 (M, K) with K = w.K and unit column stride (the bf16 GEMMs' x).
static void check_bf16_x(const torch::Tensor& x, const W4& w) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(1) == w.K && x.stride(1) == 1,
              "x must be bf16 (M, K) with K = ", w.K, " and unit column stride, got ", x.scalar_type(), " ", x.sizes());
}

// out = x @ W.T + bias for bf16 x, 1 <= M <= 64 (see gemm_small_impl).
torch::Tensor gemm_small_bf16(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                              c10::optional<torch::Tensor> bias) {
  W4 w = make_w4(qdata, scale, zp);
  check_bf16_x(x, w);
  const int64_t M = x.size(0), K = w.K, G = w.G, C = (K + 127) / 128;
  TORCH_CHECK(M >= 1 && M <= 64, "gemm_small_bf16 takes 1 <= M <= 64, got M = ", M);
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  const int64_t MB = (M + 15) / 16;
  std::vector<double> post;  // x's rows scaled by 2^j (scaled_copy), results by post = 2^-j
  const std::vector<uint16_t> xs = scaled_copy(x.data_ptr<c10::BFloat16>(), M, K, x.stride(0), post);
  const c10::BFloat16* xb = reinterpret_cast<const c10::BFloat16*>(xs.data());
  std::vector<uint32_t> xp = pack_x_pairs(xb, M, K, K, C);
  // per-group sums of the scaled x: sx[b][g][l], zero for padding rows (read for a float zero point only)
  std::vector<float> sx(MB * G * 16, 0.f);
  for (int64_t m = 0; w.zf && m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t k = g * w.gs; k < (g + 1) * w.gs; ++k) acc += float(xb[m * K + k]);
      sx[((m / 16) * G + g) * 16 + m % 16] = acc;
    }
  auto out = torch::empty({M, w.N}, x.options());
  void* op = out.data_ptr();
  const auto run = [&](auto lut) {
    constexpr int LM = decltype(lut)::value;
    switch (MB) {
      case 1: gemm_small_impl<1, 12, LM>(w, xp.data(), sx.data(), post.data(), M, bp, op, at::kBFloat16); break;
      case 2: gemm_small_impl<2, 12, LM>(w, xp.data(), sx.data(), post.data(), M, bp, op, at::kBFloat16); break;
      case 3: gemm_small_impl<3, 8, LM>(w, xp.data(), sx.data(), post.data(), M, bp, op, at::kBFloat16); break;
      default: gemm_small_impl<4, 6, LM>(w, xp.data(), sx.data(), post.data(), M, bp, op, at::kBFloat16); break;
    }
  };
  switch (lut_mode(w)) {
    case kOne: run(std::integral_constant<int, kOne>{}); break;
    case kTwo: run(std::integral_constant<int, kTwo>{}); break;
    default: run(std::integral_constant<int, kFour>{}); break;
  }
  return out;
}

// out = x @ W.T + bias for bf16 x (2-D, row stride any, unit column stride), any M: gemm_bf16.h's GEMM
// on the reference's dequantized bf16 values, made per 64-row panel inside the GEMM.
torch::Tensor gemm_bf16_entry(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                              c10::optional<torch::Tensor> bias) {
  W4 w = make_w4(qdata, scale, zp);
  check_bf16_x(x, w);
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, w.N, bkeep);
  const int64_t M = x.size(0);
  auto out = torch::empty({M, w.N}, x.options());
  if (M == 0) return out;
  gemm_bf16::gemm(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x.stride(0), M, w.N, w.K, Int4Panels{&w}, bp,
                  reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()));
  return out;
}

// out = x @ W.T + bias for bf16 x at mid M (the route: _int4_cpu.py): each block of 4 weight rows is dequantized once
// to the reference's bf16 values (dequant_row) into a per-thread scratch of 4 rows of K, which serves every row of x,
// 4 at a time: 16 vdpbf16ps accumulators over all of K (lane l sums the k-pairs 16 i + l in order), one horizontal
// sum per output, (sum * 2^-j) + bias rounded once to bf16. gemm_bf16's products (the same bf16 weights and x), its
// sums in another order; gemm_small_bf16's exact (q - zp) group sums are not used here.
constexpr int kRowsSR = lowbit::bf16_rows::kW;  // weight rows per scratch block
constexpr int kRowsSM = 4;  // rows of x per tile

template <int MT>
inline void rows_tile(const uint16_t* sw, const uint16_t* xr, int64_t K, int nr, int64_t m0, int64_t n0, int64_t N,
                      const double* post, const float* bp, c10::BFloat16* op) {
  __m512 acc[MT][kRowsSR];
  lowbit::bf16_rows::sums<MT>(sw, xr, K, acc);
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < nr; ++r) {
      float v = lowbit::unscale(_mm512_reduce_add_ps(acc[m][r]), post[m0 + m]);
      if (bp) v += bp[n0 + r];
      op[(m0 + m) * N + n0 + r] = c10::BFloat16(v);
    }
}

torch::Tensor gemm_rows_bf16(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                             c10::optional<torch::Tensor> bias) {
  W4 w = make_w4(qdata, scale, zp);
  check_bf16_x(x, w);
  const int64_t M = x.size(0), K = w.K, N = w.N;
  TORCH_CHECK(K % 32 == 0, "gemm_rows_bf16 needs K a multiple of 32, got ", K);
  torch::Tensor bkeep;
  const float* bp = bias_ptr(bias, N, bkeep);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  std::vector<double> post;
  const std::vector<uint16_t> xs = scaled_copy(x.data_ptr<c10::BFloat16>(), M, K, x.stride(0), post);
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (N + kRowsSR - 1) / kRowsSR;
  par_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<c10::BFloat16> sw;
    sw.resize(size_t(kRowsSR * K));
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * kRowsSR;
      const int nr = static_cast<int>(std::min<int64_t>(kRowsSR, N - n0));
      for (int r = 0; r < kRowsSR; ++r) {
        if (r < nr) {
          lowbit::prefetch_region(w.q + (n0 + r) * w.rb, 0, w.rb);  // the weight stream, its distance ahead (prefetch.h)
          dequant_row<c10::BFloat16>(w, n0 + r, 0, K, sw.data() + r * K);
        } else {
          std::memset(sw.data() + r * K, 0, size_t(K) * 2);
        }
      }
      const uint16_t* swp = reinterpret_cast<const uint16_t*>(sw.data());
      for (int64_t m0 = 0; m0 < M; m0 += kRowsSM) {
        const uint16_t* xr = xs.data() + m0 * K;
        switch (std::min<int64_t>(kRowsSM, M - m0)) {
          case 1: rows_tile<1>(swp, xr, K, nr, m0, n0, N, post.data(), bp, op); break;
          case 2: rows_tile<2>(swp, xr, K, nr, m0, n0, N, post.data(), bp, op); break;
          case 3: rows_tile<3>(swp, xr, K, nr, m0, n0, N, post.data(), bp, op); break;
          default: rows_tile<kRowsSM>(swp, xr, K, nr, m0, n0, N, post.data(), bp, op); break;
        }
      }
    }
  });
  return out;
}

// Rows [row0, row1) of W, dequantized exactly into out[: row1 - row0] (dtype of out).
void dequant_rows(torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp, int64_t row0, int64_t row1,
                  torch::Tensor out) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(out, "out");
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= w.N, "bad row range [", row0, ", ", row1, ") for N = ", w.N);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(1) == w.K && out.size(0) >= row1 - row0,
              "out must be contiguous (>= ", row1 - row0, ", ", w.K, "), got ", out.sizes());
  dequant_rows_any(w, row0, row1, out, true);
}

// x @ W.T + bias for any M: W dequantized in chunks of `chunk` rows into a buffer of x's dtype,
// each chunk multiplied with at::mm / at::addmm into its column slice of the output.
torch::Tensor linear_chunked(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, c10::optional<torch::Tensor> zp,
                             c10::optional<torch::Tensor> bias, int64_t chunk) {
  W4 w = make_w4(qdata, scale, zp);
  check_cpu(x, "x");
  const auto xt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "x must be (M, K) with K = ", w.K, ", got ", x.sizes());
  TORCH_CHECK(xt == torch::kBFloat16 || xt == torch::kFloat || xt == torch::kHalf, "x must be bfloat16, float32 or float16, got ", xt);
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N && bias->scalar_type() == xt, "bias must be (N,) with N = ", w.N,
                " in x's dtype ", xt, ", got ", bias->scalar_type(), " ", bias->sizes());
  }
  const int64_t M = x.size(0), N = w.N;
  auto out = torch::empty({M, N}, x.options());
  chunk = std::max<int64_t>(1, std::min(chunk, N));
  auto buf = torch::empty({chunk, w.K}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    dequant_rows_any(w, r0, r0 + rows, buf, true);
    auto wt = buf.narrow(0, 0, rows).t();
    auto o = out.narrow(1, r0, rows);
    if (has_bias) at::addmm_out(o, bias->narrow(0, r0, rows), x, wt);
    else at::mm_out(o, x, wt);
  }
  return out;
}

// The M <= 16 bf16 GEMV also as a dispatcher op, lowbit_cpu::int4_gemv_bf16: called from Python or from
// a compiled graph it skips the Python layers of the custom op lowbit::int4_weight_only_linear (about
// 15-20 us a call, ~10% of a compiled int4 decode step of a 1B model). No autograd kernel: callers
// route here only when no gradient is needed (lowbit/kernels/int4.py). The schema, fake kernel and a PyTorch
// body are defined in Python (lowbit/kernels/_cpu_ops.py, so a cached compiled graph runs without this
// extension): only the CPU kernel here.
TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("int4_gemv_bf16", TORCH_FN(gemv_bf16)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("gemv_bf16", &gemv_bf16, "int4 weight-only GEMV, bf16 x, M <= 16");
  m.def("set_amx", &lowbit::amx::set_enabled, "use AMX tiles where the CPU has them (default true; false: AVX-512 alone)");
  m.def("amx_active", [] { return lowbit::amx::usable_bf16() || lowbit::amx::usable_int8(); },
        "whether this process runs AMX tiles: the CPU has them, Linux granted them and set_amx did not switch them off");
  m.def("gemv_bf16_act", &gemv_bf16_act, "int4 GEMV of bf16 x fake-quantized to float8 (dynamic scale), M <= 16",
        py::arg("x"), py::arg("qdata"), py::arg("scale"), py::arg("zero_point"), py::arg("bias"), py::arg("act_per_token"),
        py::arg("act_eps"), py::arg("act_e5m2"));
  m.def("gemv_f32", &gemv_f32, "int4 weight-only GEMV, float32/float16 x, M = 1");
  m.def("gemm_small_bf16", &gemm_small_bf16, "int4 weight-only small-M GEMM, bf16 x, M <= 64");
  m.def("gemm_rows_bf16", &gemm_rows_bf16, "int4 weight-only GEMM, bf16 x, mid M: 4 weight rows dequantized at a time for every row of x");
  m.def("gemm_bf16", &gemm_bf16_entry, "int4 weight-only GEMM, bf16 x, any M: panels dequantized inside the GEMM");
  m.def("dequant_rows", &dequant_rows, "exact dequantization of a row range into a buffer");
  m.def("linear_chunked", &linear_chunked, "chunked dequantize + mm");
}
