// Int8 activation quantization and the W8A8 epilogue, each one pass over memory (CPU, AVX-512).
//
// Same float32 operations as lowbit.primitives, in the same order, so results are bit-identical
// to the PyTorch path (built with -ffp-contract=off: no fused multiply-adds):
//   quantize:  q = clamp(round_half_even(x / s) + zp, -128, 127)
//              per token (dynamic, symmetric): s = max(max|x_m| / 127, eps)
//   epilogue:  out = cast(((float(acc - zp_x * rowsum) * s_x) * s_w[n]) + bias[n])
#include <torch/extension.h>
#include "parallel.h"
#include "mm_i8_check.h"
#include "prefetch.h"
#include "fp8_act.h"
#include "gemm_i8.h"
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <vector>

namespace {

// 16 values of x (float32, bf16 or fp16) as float32.
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
template <> inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <typename T> inline __m512 load_tail(const T* p, int64_t n) {
  alignas(64) T buf[16] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load16<T>(buf);
}

// float32 -> T with round-to-nearest-even (bf16: as c10::BFloat16's conversion; NaN stays NaN).
template <typename T> inline void store16(T* p, __m512 v, int64_t n);
template <> inline void store16<float>(float* p, __m512 v, int64_t n) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);
}
template <> inline void store16<at::BFloat16>(at::BFloat16* p, __m512 v, int64_t n) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1), _mm512_cvtepi32_epi16(r));
}
template <> inline void store16<at::Half>(at::Half* p, __m512 v, int64_t n) {
  _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __m128i quant16(__m512 x, __m512 s, __m512 zp) {
  __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zp), _mm512_set1_ps(-128.f)), _mm512_set1_ps(127.f));
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q));
}

template <typename T>
void quantize_rows(const T* x, int8_t* q, float* scales, int64_t M, int64_t K, float s_static, float zp, float eps) {
  lowbit::par_for(0, M, 8, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const T* xr = x + m * K;
      float s = s_static;
      if (scales) {  // dynamic symmetric: s = max(amax / 127, eps)
        __m512 a = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) a = _mm512_max_ps(a, _mm512_abs_ps(load16<T>(xr + k)));
        if (k < K) a = _mm512_max_ps(a, _mm512_abs_ps(load_tail<T>(xr + k, K - k)));
        s = std::max(_mm512_reduce_max_ps(a) / 127.f, eps);
        scales[m] = s;
      }
      const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(zp);
      int8_t* qr = q + m * K;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), quant16(load16<T>(xr + k), vs, vz));
      if (k < K) _mm_mask_storeu_epi8(qr + k, __mmask16((1u << (K - k)) - 1), quant16(load_tail<T>(xr + k, K - k), vs, vz));
    }
  });
}

// One row's N outputs from its int32 sums a (zcorr, sw, bias: the same N columns, bias may be null).
template <typename T>
inline void epilogue_row(const int32_t* a, float sx, const float* sw, const T* bias, const int32_t* zcorr, T* o,
                         int64_t N) {
  const __m512 vsx = _mm512_set1_ps(sx);
  for (int64_t n = 0; n < N; n += 16) {
    const int64_t len = std::min<int64_t>(16, N - n);
    const __mmask16 mk = __mmask16((1u << len) - 1);
    __m512i ai = _mm512_maskz_loadu_epi32(mk, a + n);
    if (zcorr) ai = _mm512_sub_epi32(ai, _mm512_maskz_loadu_epi32(mk, zcorr + n));
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ai), vsx), _mm512_maskz_loadu_ps(mk, sw + n));
    if (bias) v = _mm512_add_ps(v, len == 16 ? load16<T>(bias + n) : load_tail<T>(bias + n, len));
    store16<T>(o + n, v, len);
  }
}

template <typename T>
void epilogue_rows(const int32_t* acc, const float* sx, bool sx_per_row, const float* sw, const T* bias,
                   const int32_t* zcorr, T* out, int64_t M, int64_t N) {
  lowbit::par_for(0, M, 4, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) epilogue_row<T>(acc + m * N, sx_per_row ? sx[m] : sx[0], sw, bias, zcorr, out + m * N, N);
  });
}

// --- mm_i8: exact int8 x int8 -> int32 for small M, VNNI (vpdpbusd) --------------------------------
// torch._int_mm (oneDNN) is slow at small M on the AMD Zen 4 these kernels were measured on:
// 8 x Linear(4096, 4096), 2 threads, W8A8 dynamic 8.2 ms at M = 1 but 29.8 ms at M = 4
// (benchmarks/results/roofline_avx512.json's first run). vpdpbusd multiplies unsigned by signed
// bytes, so a's rows are stored as a + 128 (a ^ 0x80, in [0, 255]); each accumulator then holds
// sum (a + 128) w = a.w + 128 sum w, the weight rows' sums come from one more vpdpbusd per 64
// weights against a vector of ones, and c = acc - 128 rowsum. Exact: vpdpbusd adds four products of
// at most 255 * 128 into int32 without saturating; the result wraps mod 2^32 like _int_mm's for K
// beyond ~2^17. Compiled for VNNI in this function alone (the build needs none): Python calls it
// only on a CPU with avx512_vnni. The weight stream is prefetched as the GEMVs' (prefetch.h).
constexpr int kVnniNR = 4;  // weight rows per pass
constexpr int kVnniMR = 4;  // activation rows per pass: 16 + 4 accumulators, 4 rows of a: 26 of 32 zmm

template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void mm_vnni_block(const uint8_t* a, int64_t lda,
                                                                         const int8_t* b, int64_t K, int32_t* c,
                                                                         int64_t ldc) {
  __m512i acc[MR][NR], rs[NR];
  for (int j = 0; j < NR; ++j) {
    rs[j] = _mm512_setzero_si512();
    for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_setzero_si512();
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += 64) {
    // a's rows are padded with 128 (a = 0) up to lda; the weight's tail bytes load as zero
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    __m512i x[MR];
    for (int i = 0; i < MR; ++i) x[i] = _mm512_loadu_si512(a + i * lda + k);
    for (int j = 0; j < NR; ++j) {
      lowbit::prefetch_stream(b + j * K + k);
      const __m512i w = _mm512_maskz_loadu_epi8(mask, b + j * K + k);
      rs[j] = _mm512_dpbusd_epi32(rs[j], ones, w);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x[i], w);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const uint32_t corr = uint32_t(_mm512_reduce_add_epi32(rs[j])) * 128u;
    for (int i = 0; i < MR; ++i) c[i * ldc + j] = int32_t(uint32_t(_mm512_reduce_add_epi32(acc[i][j])) - corr);
  }
}

template <int MR>
void mm_vnni_block_nr(int nr, const uint8_t* a, int64_t lda, const int8_t* b, int64_t K, int32_t* c, int64_t ldc) {
  switch (nr) {
    case 4: return mm_vnni_block<MR, 4>(a, lda, b, K, c, ldc);
    case 3: return mm_vnni_block<MR, 3>(a, lda, b, K, c, ldc);
    case 2: return mm_vnni_block<MR, 2>(a, lda, b, K, c, ldc);
    default: return mm_vnni_block<MR, 1>(a, lda, b, K, c, ldc);
  }
}

void mm_vnni_block_any(int mr, int nr, const uint8_t* a, int64_t lda, const int8_t* b, int64_t K, int32_t* c,
                       int64_t ldc) {
  static_assert(kVnniMR == 4, "mm_vnni_block_any dispatches mr in 1..4");
  switch (mr) {
    case 4: return mm_vnni_block_nr<4>(nr, a, lda, b, K, c, ldc);
    case 3: return mm_vnni_block_nr<3>(nr, a, lda, b, K, c, ldc);
    case 2: return mm_vnni_block_nr<2>(nr, a, lda, b, K, c, ldc);
    default: return mm_vnni_block_nr<1>(nr, a, lda, b, K, c, ldc);
  }
}

}  // namespace

// out (M, N) int32 = a @ b.T for int8 a (M, K) and b (N, K), exactly (see mm_vnni_block); call only
// on a CPU with avx512_vnni. Every argument is checked here: nothing is read or written out of bounds.
torch::Tensor mm_i8(torch::Tensor a, torch::Tensor b) {
  lowbit::check_mm_i8(a, b);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  auto out = torch::zeros({M, N}, a.options().dtype(torch::kInt));
  if (M == 0 || N == 0 || K == 0) return out;
  const int64_t lda = (K + 63) / 64 * 64;
  std::vector<uint8_t> ax(M * lda, uint8_t(128));
  const int8_t* ap = a.data_ptr<int8_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) ax[m * lda + k] = uint8_t(ap[m * K + k]) ^ uint8_t(0x80);
  const int8_t* bp = b.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t blocks = (N + kVnniNR - 1) / kVnniNR;
  // at least ~2^18 multiply-adds per thread, so tiny products don't pay for waking threads
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (kVnniNR * K * M));
  lowbit::par_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * kVnniNR;
      const int nr = int(std::min<int64_t>(kVnniNR, N - n));
      for (int64_t m = 0; m < M; m += kVnniMR)
        mm_vnni_block_any(int(std::min<int64_t>(kVnniMR, M - m)), nr, ax.data() + m * lda, lda, bp + n * K, K,
                          op + m * N + n, N);
    }
  });
  return out;
}

// out (M, N) int32 = a @ b.T for int8 a (M, K) and b (N, K), exactly (gemm_i8.h: for M above mm_i8's);
// call only on a CPU with avx512_vnni.
torch::Tensor gemm_i8_entry(torch::Tensor a, torch::Tensor b) {
  lowbit::check_mm_i8(a, b, "gemm_i8");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  if (M == 0 || N == 0 || K == 0) return torch::zeros({M, N}, a.options().dtype(torch::kInt));
  auto out = torch::empty({M, N}, a.options().dtype(torch::kInt));
  gemm_i8::gemm(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), out.data_ptr<int32_t>(), M, N, K);
  return out;
}

// GOP/s of vpdpbusd on registers alone on every thread of torch's pool (gemm_i8::vnni_spin): the int8
// compute peak. Call only on a CPU with avx512_vnni.
double vnni_peak_gops(int64_t iters) {
  TORCH_CHECK(iters > 0, "vnni_peak_gops: iters must be positive, got ", iters);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  gemm_i8::vnni_spin(iters / 8 + 1);  // warm the unit up
  const auto t0 = std::chrono::steady_clock::now();
  lowbit::par_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) gemm_i8::vnni_spin(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(nt) * double(iters) * 24.0 * 128.0 / s / 1e9;
}

torch::Tensor w8a8_epilogue(torch::Tensor acc, torch::Tensor s_x, torch::Tensor s_w, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> zcorr, torch::Tensor like);

// w8a8_epilogue(gemm_i8(a, b), s_x, s_w, bias, zcorr, like), the same values bit for bit: for K <= 4096 each
// tile of int32 sums is scaled into the output while it is in L1 (gemm_i8::gemm's epilogue), else the two
// calls. Call only on a CPU with avx512_vnni.
torch::Tensor w8a8_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor s_x, torch::Tensor s_w,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> zcorr, torch::Tensor like) {
  lowbit::check_mm_i8(a, b, "w8a8_gemm");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  // vpdpbusd's tiles carry one block of K to the epilogue; AMX's carry any K (its running tiles)
  if (M == 0 || N == 0 || K == 0 || (K > gemm_i8::kKC && !lowbit::amx::usable_int8()))
    return w8a8_epilogue(gemm_i8_entry(a, b), s_x, s_w, bias, zcorr, like);
  TORCH_CHECK(s_x.device().is_cpu() && s_w.device().is_cpu(), "w8a8_gemm: s_x and s_w must be CPU tensors");
  TORCH_CHECK(s_x.scalar_type() == torch::kFloat && s_x.is_contiguous() && (s_x.numel() == 1 || s_x.numel() == M), "s_x: float32, 1 or M values");
  TORCH_CHECK(s_w.scalar_type() == torch::kFloat && s_w.is_contiguous() && s_w.numel() == N, "s_w: float32, N values");
  const int32_t* zc = nullptr;
  if (zcorr) {
    TORCH_CHECK(zcorr->device().is_cpu(), "zcorr must be a CPU tensor");
    TORCH_CHECK(zcorr->scalar_type() == torch::kInt && zcorr->is_contiguous() && zcorr->numel() == N, "zcorr: int32, N values");
    zc = zcorr->data_ptr<int32_t>();
  }
  if (bias) TORCH_CHECK(bias->device().is_cpu(), "bias must be a CPU tensor");
  if (bias) TORCH_CHECK(bias->scalar_type() == like.scalar_type() && bias->is_contiguous() && bias->numel() == N, "bias: N values in x's dtype");
  auto out = torch::empty({M, N}, a.options().dtype(like.scalar_type()));
  const float* sx = s_x.data_ptr<float>();
  const bool per_row = s_x.numel() == M && M > 1;
  const float* sw = s_w.data_ptr<float>();
  switch (like.scalar_type()) {
#define LOWBIT_FUSED(T, ST)                                                                                       \
  case ST: {                                                                                                      \
    const T* bp = bias ? bias->data_ptr<T>() : nullptr;                                                           \
    T* op = out.data_ptr<T>();                                                                                    \
    auto epi = [&](const int32_t* tile, int64_t ld, int64_t m, int64_t rows, int64_t n0, int64_t cols) {          \
      for (int64_t i = 0; i < rows; ++i)                                                                          \
        epilogue_row<T>(tile + i * ld, per_row ? sx[m + i] : sx[0], sw + n0, bp ? bp + n0 : nullptr,              \
                        zc ? zc + n0 : nullptr, op + (m + i) * N + n0, cols);                                     \
    };                                                                                                            \
    gemm_i8::gemm(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), nullptr, M, N, K, epi);                             \
    break;                                                                                                        \
  }
    LOWBIT_FUSED(float, torch::kFloat)
    LOWBIT_FUSED(at::BFloat16, torch::kBFloat16)
    LOWBIT_FUSED(at::Half, torch::kHalf)
#undef LOWBIT_FUSED
    default: TORCH_CHECK(false, "w8a8_gemm: output must be float32, bfloat16 or float16");
  }
  return out;
}

// Quantize x (M, K) to int8: static (scale given, zp) or dynamic per-token symmetric (scale < 0).
// Returns (q, scales) where scales is (M, 1) float32 for the dynamic case, else empty.
// Every entry point checks its arguments (devices, dtypes, ranks, shapes, contiguity) before
// touching memory: whatever a caller passes, nothing is read or written out of bounds.
std::vector<torch::Tensor> quantize_i8(torch::Tensor x, double scale, int64_t zero_point, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor, got ", x.sizes());
  TORCH_CHECK(zero_point >= -128 && zero_point <= 127, "zero_point must be in [-128, 127], got ", zero_point);
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  const bool dynamic = scale < 0;
  auto s = dynamic ? torch::empty({M, 1}, x.options().dtype(torch::kFloat)) : torch::empty({0}, x.options().dtype(torch::kFloat));
  float* sp = dynamic ? s.data_ptr<float>() : nullptr;
  const float fs = float(scale), fz = float(zero_point), fe = float(eps);
  switch (x.scalar_type()) {
    case torch::kFloat: quantize_rows(x.data_ptr<float>(), q.data_ptr<int8_t>(), sp, M, K, fs, fz, fe); break;
    case torch::kBFloat16: quantize_rows(x.data_ptr<at::BFloat16>(), q.data_ptr<int8_t>(), sp, M, K, fs, fz, fe); break;
    case torch::kHalf: quantize_rows(x.data_ptr<at::Half>(), q.data_ptr<int8_t>(), sp, M, K, fs, fz, fe); break;
    default: TORCH_CHECK(false, "quantize_i8: x must be float32, bfloat16 or float16");
  }
  return {q, s};
}

// out (M, N) in dtype of `like` = ((acc - zcorr) * s_x) * s_w + bias.
torch::Tensor w8a8_epilogue(torch::Tensor acc, torch::Tensor s_x, torch::Tensor s_w, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> zcorr, torch::Tensor like) {
  TORCH_CHECK(acc.device().is_cpu() && s_x.device().is_cpu() && s_w.device().is_cpu(), "acc, s_x and s_w must be CPU tensors");
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt && acc.is_contiguous(), "acc must be contiguous int32 (M, N)");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(s_x.scalar_type() == torch::kFloat && s_x.is_contiguous() && (s_x.numel() == 1 || s_x.numel() == M), "s_x: float32, 1 or M values");
  TORCH_CHECK(s_w.scalar_type() == torch::kFloat && s_w.is_contiguous() && s_w.numel() == N, "s_w: float32, N values");
  auto out = torch::empty({M, N}, acc.options().dtype(like.scalar_type()));
  const int32_t* zc = nullptr;
  if (zcorr) {
    TORCH_CHECK(zcorr->device().is_cpu(), "zcorr must be a CPU tensor");
    TORCH_CHECK(zcorr->scalar_type() == torch::kInt && zcorr->is_contiguous() && zcorr->numel() == N, "zcorr: int32, N values");
    zc = zcorr->data_ptr<int32_t>();
  }
  const bool per_row = s_x.numel() == M && M > 1;
  if (bias) TORCH_CHECK(bias->device().is_cpu(), "bias must be a CPU tensor");
  if (bias) TORCH_CHECK(bias->scalar_type() == like.scalar_type() && bias->is_contiguous() && bias->numel() == N, "bias: N values in x's dtype");
  switch (like.scalar_type()) {
#define LOWBIT_EPI(T, ST)                                                                                         \
  case ST:                                                                                                        \
    epilogue_rows<T>(acc.data_ptr<int32_t>(), s_x.data_ptr<float>(), per_row, s_w.data_ptr<float>(),             \
                     bias ? bias->data_ptr<T>() : nullptr, zc, out.data_ptr<T>(), M, N);                          \
    break;
    LOWBIT_EPI(float, torch::kFloat)
    LOWBIT_EPI(at::BFloat16, torch::kBFloat16)
    LOWBIT_EPI(at::Half, torch::kHalf)
#undef LOWBIT_EPI
    default: TORCH_CHECK(false, "w8a8_epilogue: output must be float32, bfloat16 or float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_i8", &quantize_i8, "int8 activation quantization (static, or dynamic per-token symmetric)");
  m.def("w8a8_epilogue", &w8a8_epilogue, "int32 accumulator -> scaled float output");
  m.def("mm_i8", &mm_i8, "exact int8 x int8 -> int32 GEMM for small M (VNNI: call only on a CPU with avx512_vnni)");
  m.def("gemm_i8", &gemm_i8_entry, "exact int8 x int8 -> int32 GEMM on panels packed per call (VNNI: call only on a CPU with avx512_vnni)");
  m.def("w8a8_gemm", &w8a8_gemm, "w8a8_epilogue(gemm_i8(a, b), ...) with the epilogue on each tile in L1 (VNNI: call only on a CPU with avx512_vnni)");
  m.def("set_amx", &lowbit::amx::set_enabled, "use AMX tiles where the CPU has them (default true; false: AVX-512 alone)");
  m.def("amx_active", [] { return lowbit::amx::usable_bf16() || lowbit::amx::usable_int8(); },
        "whether this process runs AMX tiles: the CPU has them, Linux granted them and set_amx did not switch them off");
  m.def("vnni_peak_gops", &vnni_peak_gops, "int8 compute peak: GOP/s of vpdpbusd on registers on every thread (VNNI: call only on a CPU with avx512_vnni)");
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("fake_quant_fp8", &fp8_act::fake_quant_fp8, "float8 activation fake quantization (per token, per tensor or static), one pass",
        py::arg("x"), py::arg("static_scale"), py::arg("per_token"), py::arg("eps"), py::arg("e5m2"));
}
