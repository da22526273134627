// Int8 weight-only matmul for small M (decode), AVX-512 F/BW build (the AVX2 + FMA + F16C one is
// int8_gemv_avx2.cpp; lowbit/kernels/_ext.py picks one at run time). Entry point, checks and the
// widening of x: int8_gemv_entry.h, shared by both builds.
//   out[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * w[n, k]
//
// The AVX2 build's register tiles at 16 lanes: R weight rows x MM rows of x (MM <= 4), one 16-lane
// float32 accumulator and one 16-lane running total per (row, x row), both in registers (32 zmm):
// R = 4 at M <= 3, 3 at M >= 4. Per 16 columns each weight row is loaded once and converted exactly
// (vpmovsxbd + vcvtdq2ps), then FMA'd against each of the MM rows of x (float32, in L1). M > 4 runs
// the tile once per 4 rows of x while the R weight rows stay in L1: the weight is read from memory
// once per call whatever M is (the first version of this build made a pass over the weight per row
// of x, so M > 1 went to torch's _weight_int8pack_mm: 0.40 of DRAM at M = 4 on an AVX-512 Zen 4).
//
// Two kinds of tiles, by x's dtype and M (run_all):
//  * float tiles (every x at M = 1; float32 and float16 x at any M; bf16 x where the bf16 tiles do not
//    apply): x widened to float32, FMA as above. Summation order:
//      1. lane j of the accumulator sums x[m, k] * float(w[n, k]) for k = j, j + 16, ... of one group,
//         in order of k, by FMA;
//      2. at the end of group g: tot = fma(acc, s[n, g], tot), groups in order;
//      3. the 16 lanes of tot are summed by _mm512_reduce_add_ps (a fixed tree), rounded once to x's dtype.
//  * bf16 tiles (bf16 x, M >= kBf16MinM = 2, groups a multiple of 32, a CPU with AVX-512 BF16): see
//    btile below. One vdpbf16ps per 32 weights and row of x where the float tiles need two FMAs and read
//    x in float32: measured (1 thread, bf16 x, 2048 x 4096 weight in L3 / 32768 x 4096 from DRAM, GB/s
//    of weight): M = 2 19.1 -> 24.2 / 19.0 -> 20.7, M = 4 7.7 -> 13.3 / 10.7 -> 15.8, M = 8 5.8 -> 8.8 /
//    5.6 -> 8.2. Not at M = 1: there it was level in L3 (28.1 against 29.1) and 10-20% slower from
//    DRAM on this Zen 4 (18-19 against 20-24 GB/s), as an exact-integer variant was (see
//    benchmarks/results/avx512_zen4/scratch/README.md): the M = 1 GEMV streams, it is not ALU-bound here.
//    With one scale per row from M = 9 (scratch_min_m) the same sums run as scratch tiles (stile below): each
//    block of 4 weight rows converted once for every row of x.
// Each kind has one summation order for every tile shape, M and thread count, so a row of a result
// equals, bit for bit, the result for that row of x alone through the same kind of tile (for bf16 x
// at M >= 2: that row twice, M = 2). The AVX2 build sums the same products in another order (8 lanes).
#define LOWBIT_INT8_GEMM_BF16
#include "int8_gemv_entry.h"
#include "gemm_bf16.h"
#include "bf16_rows.h"
// bf16_scale.h and the bf16 tiles use AVX-512 BF16, which this build does not require: they run only
// where the CPU has it (cpu_bf16()).
#pragma GCC push_options
#pragma GCC target("avx512vl,avx512bf16")
#include "bf16_scale.h"
#pragma GCC pop_options

#include <cstring>

namespace {

inline __m512 load_i8_as_f32(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// int8_gemv_entry.h's tile at this build's vector width.
template <int R, int MM, bool PF>
void tile(const Args& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, gs = a.gs;
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * K;
  const float* xr = a.x + m0 * K;
  __m512 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[R][MM];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t kend = (g + 1) * gs;
    for (int64_t k = g * gs; k < kend; k += 16) {
      if (PF && (k & 63) == 0)
        for (int r = 0; r < R; ++r) lowbit::prefetch_stream(wr[r] + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 wv = load_i8_as_f32(wr[r] + k);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + k), wv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(a.s[(n0 + r) * a.ss0 + g * a.ss1]);
      for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) store_out(a, (m0 + m) * a.N + n0 + r, _mm512_reduce_add_ps(tot[r][m]));
}

// ---- bf16 x: vdpbf16ps tiles (AVX-512 BF16) -----------------------------------------------------
// Per 32 columns each weight row is loaded once and converted exactly to bf16: vpmovsxbd + vcvtdq2ps,
// then the upper halves of the float32 words (vpermt2w; |w| <= 128 has 8 significant bits, so the lower
// halves are zero: no rounding, and no second float conversion instruction), then one vdpbf16ps per row
// of x against x's bf16 values. x is a copy scaled per row by 2^j (bf16_scale.h: vdpbf16ps reads
// subnormal inputs as zero and flushes subnormal results), the row's results multiplied by 2^-j in
// double. Summation order:
//   1. lane j of the accumulator adds the products of x[m, k] * w[n, k] for k = 32 i + 2j, 32 i + 2j + 1
//      of one group, in order of i, by vdpbf16ps (each product exact in float32);
//   2. at the end of group g: tot = fma(acc, s[n, g], tot), groups in order;
//   3. the 16 lanes of tot by _mm512_reduce_add_ps, times 2^-j in double (one rounding to float32),
//      rounded once to x's dtype.
constexpr int64_t kBf16MinM = 2;

template <int R, int MM, bool PF>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void btile(const Args& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, gs = a.gs;
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * K;
  const uint16_t* xr = a.xs + m0 * K;
  // word i of the result: the upper half (all of a float32 with |w| <= 128's bits) of lo's float i,
  // then of hi's float i - 16
  const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                       31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  __m512 tot[R][MM];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[R][MM];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t kend = (g + 1) * gs;
    for (int64_t k = g * gs; k < kend; k += 32) {
      if (PF && (k & 63) == 0)
        for (int r = 0; r < R; ++r) lowbit::prefetch_stream(wr[r] + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k + 16))));
        const __m512bh wb = (__m512bh)_mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd, _mm512_castps_si512(hi));
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wb, (__m512bh)_mm512_loadu_si512(xr + m * K + k));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(a.s[(n0 + r) * a.ss0 + g * a.ss1]);
      for (int m = 0; m < MM; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m)
      store_out(a, (m0 + m) * a.N + n0 + r, lowbit::unscale(_mm512_reduce_add_ps(tot[r][m]), a.post[m0 + m]));
}

// bf16 x with one scale per row at M >= scratch_min_m(): btile's sums (the same products in the same order, so the
// same bits: a row of the result still equals that row alone through the bf16 tiles), but each block of 4 weight rows
// is converted to bf16 once, whole K, into a per-thread scratch (4 x 4096 bf16: 32 KiB) that serves every row of x,
// 4 at a time (16 accumulators); btile converts its rows again for every 4 rows of x (5 conversion ops per 32
// weights against at most 4 vdpbf16ps per row). 8 x 4096^2, 2 threads, Zen 4, ms scratch / btile / gemm_bf16 /
// bf16 F.linear (benchmarks/results/avx512_zen4/scratch/int8wo_scratch_tiles_session27.txt): M = 8 10.40 / 9.85 /
// 15.96 / 17.05, M = 9 11.07 / 15.01 / 17.22 / 18.90, M = 16 15.15 / 21.06 / 22.08 / 21.90. Not kept: chunks of
// K (512, 1024 columns, the sums carried in memory between them) ran slower than whole rows
// (int8wo_scratch_chunks_session27_not_kept.txt); with groups of 128 (2 rows of x a tile, 8 running totals beside the
// sums) the scratch ran 1.0-1.75x btile's time (int8wo_scratch_tiles_session27_groups_not_kept.txt).
constexpr int64_t kScratchMinM = 9;
constexpr int kSR = lowbit::bf16_rows::kW;  // weight rows per scratch block
constexpr int kSM = 4;  // rows of x per scratch tile

int64_t& scratch_min_m() {  // set_scratch_min_m: A/B runs and tests
  static int64_t v = kScratchMinM;
  return v;
}

// The block's rows n0 .. n0 + nr - 1 converted to bf16 (exact: |q| <= 128) into dst, 4 rows of K (rows past nr: zero),
// prefetching ahead as btile does.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void convert_block(const Args& a, int64_t n0, int nr,
                                                                             uint16_t* dst) {
  const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                       31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const int64_t K = a.K;
  for (int r = 0; r < kSR; ++r) {
    uint16_t* d = dst + r * K;
    if (r >= nr) {
      std::memset(d, 0, size_t(K) * 2);
      continue;
    }
    const int8_t* w = a.w + (n0 + r) * K;
    for (int64_t k = 0; k < K; k += 32) {
      if ((k & 63) == 0) lowbit::prefetch_stream(w + k);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16))));
      _mm512_storeu_si512(d + k, _mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd, _mm512_castps_si512(hi)));
    }
  }
}

// MT rows of x (from m0) against the block's 4 converted rows (sw, row stride K), one group.
template <int MT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void stile(const Args& a, const uint16_t* sw, int64_t n0,
                                                                             int nr, int64_t m0) {
  __m512 acc[MT][kSR];
  lowbit::bf16_rows::sums<MT>(sw, a.xs + m0 * a.K, a.K, acc);
  for (int r = 0; r < nr; ++r) {
    const __m512 sv = _mm512_set1_ps(a.s[(n0 + r) * a.ss0]);
    for (int m = 0; m < MT; ++m)  // btile's tot = fma(acc, s, 0) for its one group
      store_out(a, (m0 + m) * a.N + n0 + r,
                lowbit::unscale(_mm512_reduce_add_ps(_mm512_fmadd_ps(acc[m][r], sv, _mm512_setzero_ps())), a.post[m0 + m]));
  }
}

void run_scratch(const Args& a) {
  const int64_t blocks = (a.N + kSR - 1) / kSR;
  auto body = [&](int64_t b, int64_t e) {
    thread_local std::vector<uint16_t> sw;
    sw.resize(size_t(kSR * a.K));
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * kSR;
      const int nr = static_cast<int>(std::min<int64_t>(kSR, a.N - n0));
      convert_block(a, n0, nr, sw.data());
      for (int64_t m0 = 0; m0 < a.M; m0 += kSM) {
        switch (std::min<int64_t>(kSM, a.M - m0)) {
          case 1: stile<1>(a, sw.data(), n0, nr, m0); break;
          case 2: stile<2>(a, sw.data(), n0, nr, m0); break;
          case 3: stile<3>(a, sw.data(), n0, nr, m0); break;
          default: stile<kSM>(a, sw.data(), n0, nr, m0); break;
        }
      }
    }
  };
  if (a.N * a.K < kSerialBytes) body(0, blocks);
  else lowbit::par_for(0, blocks, 1, body);
}

struct Bf16Tiles {
  template <int R, int MM, bool PF>
  static void run_tile(const Args& a, int64_t n0, int64_t m0) { btile<R, MM, PF>(a, n0, m0); }
};

bool cpu_bf16() {
  static const bool v = __builtin_cpu_supports("avx512bf16");
  return v;
}

bool takes_bf16(const Args& a) { return a.xb && a.M >= kBf16MinM && a.gs % 32 == 0 && cpu_bf16(); }

void run_all(const Args& a) {
  if (takes_bf16(a)) {
    thread_local std::vector<uint16_t> xs;
    thread_local std::vector<double> post;
    xs.resize(a.M * a.K);
    post.resize(a.M);
    for (int64_t m = 0; m < a.M; ++m) std::memcpy(xs.data() + m * a.K, a.xb + m * a.ldxb, a.K * sizeof(uint16_t));
    lowbit::scale_rows_bf16(xs.data(), a.M, a.K, a.K, 0, post.data());
    Args b = a;
    b.xs = xs.data();
    b.post = post.data();
    if (a.G == 1 && a.M >= scratch_min_m()) run_scratch(b);
    else if (a.M <= 3) run<4, Bf16Tiles>(b);
    else run<3, Bf16Tiles>(b);
    return;
  }
  if (a.M <= 3) run<4>(a);
  else run<3>(a);
}

}  // namespace

void set_scratch_min_m(int64_t m) {
  TORCH_CHECK(m >= kBf16MinM, "scratch min M must be at least ", kBf16MinM, ", got ", m);
  scratch_min_m() = m;
}
int64_t get_scratch_min_m() { return scratch_min_m(); }

// x (M, K) bf16 with unit column stride @ dequantize(w, scale).T (+ bias) in bf16, for the larger M the
// GEMV leaves: gemm_bf16::gemm with Int8Panels, so the products are the reference's (the weight's
// dequantized bf16 values, float32 sums; oneDNN's summation order differs). Needs avx512bf16.
torch::Tensor int8_weight_only_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(cpu_bf16(), "int8_weight_only_gemm needs a CPU with avx512bf16");
  check_weight_args(x, w, scale);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1, "x must be bfloat16 with unit column stride, got ",
              x.scalar_type(), " with strides ", x.strides());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point(),
                "bias must be a floating CPU tensor (N,) with N = ", N, ", got ", bias->scalar_type(), " ", bias->sizes());
    b = bias->to(torch::kFloat).contiguous();
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return b.defined() ? out.copy_(b.expand({M, N})) : out.zero_();
  const gemm_bf16::Int8Panels pack{w.data_ptr<int8_t>(), scale.data_ptr<float>(), scale.stride(0), scale.stride(1), K, G, K / G};
  gemm_bf16::gemm(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x.stride(0), M, N, K, pack,
                  b.defined() ? b.data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()));
  return out;
}
