// Int8 weight-only matmul for small M (decode), AVX2 + FMA build (no AVX-512): the same entry
// point, checks and error messages as int8_gemv.cpp, chosen at run time by lowbit/kernels/_ext.py.
//   out[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * w[n, k]
// Streams the int8 weight once; x is converted to float32 once per call. M = 1 takes kRows rows per
// pass (x loaded once for all of them, two accumulators per row: 8 independent FMA chains), 8
// weights per vpmovsxbd + vcvtdq2ps + FMA; M > 1 converts a row to float32 once and reuses it for
// every row of x. Float32 accumulation per group, scales applied per group, one cast to x's dtype at
// the end. Same products as the AVX-512 build, summed in another order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "parallel.h"
#include <immintrin.h>

#include <vector>

namespace {

inline __m256 load_i8_as_f32(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kPrefetch = 32768;  // non-temporal software prefetch distance in the weight stream

// dot(x, w) over n elements (n % 16 == 0), w int8.
inline float dot_i8(const float* x, const int8_t* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_NTA);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_i8_as_f32(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load_i8_as_f32(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load_i8_as_f32(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load_i8_as_f32(w + k + 24), a3);
  }
  for (; k < n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_i8_as_f32(w + k), a0);
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

constexpr int kRows = 4;  // weight rows per pass at M = 1 (measured: 4 >= 2 > 1 rows)

// kRows dots (x, w[r]) over n elements (n % 16 == 0), w int8, into d[r].
inline void dot_rows_i8(const float* x, const int8_t* const* w, int64_t n, float* d) {
  __m256 a[kRows][2];
  for (int r = 0; r < kRows; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < kRows; ++r) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + kPrefetch), _MM_HINT_NTA);
      a[r][0] = _mm256_fmadd_ps(x0, load_i8_as_f32(w[r] + k), a[r][0]);
      a[r][1] = _mm256_fmadd_ps(x1, load_i8_as_f32(w[r] + k + 8), a[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) d[r] = hsum(_mm256_add_ps(a[r][0], a[r][1]));
}

// dot(x, w) over n elements (n % 16 == 0), w float32.
inline float dot_f32(const float* x, const float* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_loadu_ps(w + k + 24), a3);
  }
  for (; k < n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

}  // namespace

// Every argument is checked here (devices, dtypes, ranks, shapes; strides are made contiguous):
// whatever a caller passes, nothing is read out of bounds.
torch::Tensor int8_weight_only_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "x, w and scale must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (M, K) and w (N, K) expected, got ", x.sizes(),
              " and ", w.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == torch::kFloat || xt == torch::kBFloat16 || xt == torch::kHalf, "x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w must be contiguous int8, got ", w.scalar_type());
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.dim() == 2 && scale.size(0) == w.size(0),
              "scale must be float32 (N, groups) with N = ", w.size(0), ", got ", scale.scalar_type(), " ", scale.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 16 == 0, "group size must divide K and be a multiple of 16, got K = ", K,
              " with ", G, " groups");
  const int64_t gs = K / G;
  if (M == 0 || N == 0) return torch::zeros({M, N}, x.options());
  auto xf = x.to(torch::kFloat).contiguous();
  auto sc = scale.contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (M == 1) {
    // blocks of kRows rows; the last N % kRows rows one at a time
    const int64_t blocks = N / kRows;
    lowbit::par_for(0, blocks + N % kRows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (b < blocks) {
          const int64_t n = b * kRows;
          const int8_t* rows[kRows];
          float total[kRows] = {}, d[kRows];
          for (int r = 0; r < kRows; ++r) rows[r] = wp + (n + r) * K;
          for (int64_t g = 0; g < G; ++g) {
            dot_rows_i8(xp + g * gs, rows, gs, d);
            for (int r = 0; r < kRows; ++r) {
              total[r] += sp[(n + r) * G + g] * d[r];
              rows[r] += gs;
            }
          }
          for (int r = 0; r < kRows; ++r) op[n + r] = total[r];
        } else {
          const int64_t n = blocks * kRows + (b - blocks);
          float total = 0.f;
          for (int64_t g = 0; g < G; ++g) total += sp[n * G + g] * dot_i8(xp + g * gs, wp + n * K + g * gs, gs);
          op[n] = total;
        }
      }
    });
    return out.to(x.scalar_type());
  }
  lowbit::par_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);  // the row as float32, reused by every m (in L1)
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* wr = wp + n * K;
      const float* sr = sp + n * G;
      float* wf = row.data();
      for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(wf + k, load_i8_as_f32(wr + k));
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float total = 0.f;
        for (int64_t g = 0; g < G; ++g) total += sr[g] * dot_f32(xr + g * gs, wf + g * gs, gs);
        op[m * N + n] = total;
      }
    }
  });
  return out.to(x.scalar_type());
}

// The same dispatcher op as int8_gemv.cpp (only one build of a kernel loads in a process).
TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) { m.def("int8_weight_only_mm(Tensor x, Tensor w, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("int8_weight_only_mm", TORCH_FN(int8_weight_only_mm)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_weight_only_mm", &int8_weight_only_mm, "int8 weight-only matmul for small M");
}
