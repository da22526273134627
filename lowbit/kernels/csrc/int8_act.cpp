// Int8 activation quantization and the W8A8 epilogue, each one pass over memory (CPU, AVX-512).
//
// Same float32 operations as lowbit.primitives, in the same order, so results are bit-identical
// to the PyTorch path (built with -ffp-contract=off: no fused multiply-adds):
//   quantize:  q = clamp(round_half_even(x / s) + zp, -128, 127)
//              per token (dynamic, symmetric): s = max(max|x_m| / 127, eps)
//   epilogue:  out = cast(((float(acc - zp_x * rowsum) * s_x) * s_w[n]) + bias[n])
#include <torch/extension.h>
#include "parallel.h"
#include "fp8_act.h"
#include <immintrin.h>

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

template <typename T>
void epilogue_rows(const int32_t* acc, const float* sx, bool sx_per_row, const float* sw, const T* bias,
                   const int32_t* zcorr, T* out, int64_t M, int64_t N) {
  lowbit::par_for(0, M, 4, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const __m512 vsx = _mm512_set1_ps(sx_per_row ? sx[m] : sx[0]);
      const int32_t* a = acc + m * N;
      T* o = out + m * N;
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
  });
}

}  // namespace

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
  m.def("fake_quant_fp8", &fp8_act::fake_quant_fp8, "float8 activation fake quantization (per token, per tensor or static), one pass",
        py::arg("x"), py::arg("static_scale"), py::arg("per_token"), py::arg("eps"), py::arg("e5m2"));
}
