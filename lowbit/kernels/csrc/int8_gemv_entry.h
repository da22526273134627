// The entry point of kernel "int8_gemv" (int8 weight-only matmul for small M), shared by its two
// builds: int8_gemv.cpp (AVX-512) and int8_gemv_avx2.cpp (AVX2 + FMA + F16C). Each source defines
// run_all (the product proper over every row of the weight and of x) and includes this header once;
// the argument checks, the widening of x and the Python module are the same code in both.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "prefetch.h"
#include "widen_f32.h"

#ifndef LOWBIT_INT8_SERIAL_BYTES
#define LOWBIT_INT8_SERIAL_BYTES (64 * 1024)
#endif

namespace {

// Weights of fewer bytes than this run on one thread (see int8_gemv_avx2.cpp's header).
constexpr int64_t kSerialBytes = LOWBIT_INT8_SERIAL_BYTES;
constexpr int64_t kKeepFloats = 16 * 8192;  // x up to this size is widened into a buffer kept per thread (512 KiB)

struct Args {
  const float* x;   // (M, K) float32, row-major
  const int8_t* w;  // (N, K) int8, row-major
  const float* s;   // scale (N, G) with strides ss0, ss1 (a broadcast scale has stride 0)
  int64_t ss0, ss1;
  int64_t M, N, K, G, gs;
  void* out;  // (M, N) in dtype ot
  at::ScalarType ot;
  const uint16_t* xb = nullptr;  // x's own bf16 rows (row stride ldxb) when x is bfloat16 with unit column stride
  int64_t ldxb = 0;
  const uint16_t* xs = nullptr;  // the AVX-512 build's bf16 tiles: x scaled per row (M, K), and 2^-j per row
  const double* post = nullptr;
};

inline void store_out(const Args& a, int64_t i, float v) {
  if (a.ot == at::kBFloat16) static_cast<c10::BFloat16*>(a.out)[i] = c10::BFloat16(v);
  else if (a.ot == at::kHalf) static_cast<c10::Half*>(a.out)[i] = c10::Half(v);
  else static_cast<float*>(a.out)[i] = v;
}

// out = x W^T with the scales, every row of W and of x (run<R> below with the build's R). Defined by each source.
void run_all(const Args& a);

// Whether run_all takes bf16 x as it is (the AVX-512 build's bf16 tiles: a.xb set, a.x not needed), so the
// entry widens x to float32 only for the float tiles. Defined by each source.
bool takes_bf16(const Args& a);

constexpr int kMaxMM = 4;  // rows of x per tile

// Rows n0 .. n0 + R of the weight x rows m0 .. m0 + MM of x, into out. PF: issue the weight prefetch
// (the first pass over these rows; later passes find them in L1). Defined by each source (its vector width).
template <int R, int MM, bool PF>
void tile(const Args& a, int64_t n0, int64_t m0);

// The tiles run_all uses unless it says otherwise: the build's tile above.
struct FloatTiles {
  template <int R, int MM, bool PF>
  static void run_tile(const Args& a, int64_t n0, int64_t m0) { tile<R, MM, PF>(a, n0, m0); }
};

// Rows n0 .. n0 + R of the weight against every row of x, 4 rows of x at a time, by Tiles::run_tile.
template <int R, typename Tiles>
inline void rows_all_m(const Args& a, int64_t n0) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxMM) {
    const int64_t mm = std::min<int64_t>(kMaxMM, a.M - m0);
    if (m0 == 0) {
      switch (mm) {
        case 1: Tiles::template run_tile<R, 1, true>(a, n0, m0); break;
        case 2: Tiles::template run_tile<R, 2, true>(a, n0, m0); break;
        case 3: Tiles::template run_tile<R, 3, true>(a, n0, m0); break;
        default: Tiles::template run_tile<R, 4, true>(a, n0, m0); break;
      }
    } else {
      switch (mm) {
        case 1: Tiles::template run_tile<R, 1, false>(a, n0, m0); break;
        case 2: Tiles::template run_tile<R, 2, false>(a, n0, m0); break;
        case 3: Tiles::template run_tile<R, 3, false>(a, n0, m0); break;
        default: Tiles::template run_tile<R, 4, false>(a, n0, m0); break;
      }
    }
  }
}

// Every row, R at a time (the last N % R rows one at a time), over threads unless the weight is small.
template <int R, typename Tiles = FloatTiles>
void run(const Args& a) {
  const int64_t blocks = a.N / R, tail = a.N % R;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < blocks) rows_all_m<R, Tiles>(a, i * R);
      else rows_all_m<1, Tiles>(a, blocks * R + (i - blocks));
    }
  };
  if (a.N * a.K < kSerialBytes) body(0, blocks + tail);
  else lowbit::par_for(0, blocks + tail, 4, body);
}


// x (M, K) as float32 rows: x itself when it is contiguous float32, else widened into buf (exact).
const float* x_as_f32(const torch::Tensor& x, std::vector<float>& buf) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == torch::kFloat && x.stride(1) == 1 && (x.stride(0) == K || M == 1)) return x.data_ptr<float>();
  buf.resize(M * K);
  lowbit::widen_rows(x, buf.data(), K);
  return buf.data();
}

}  // namespace

// Every argument is checked here (devices, dtypes, ranks, shapes; x's and scale's strides are
// honoured): whatever a caller passes, nothing is read out of bounds.
// The checks every entry makes of x (M, K), w (N, K) int8 contiguous and scale float32 (N, groups), groups of
// a multiple of 16; x's dtype is the caller's to check.
inline void check_weight_args(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "x, w and scale must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (M, K) and w (N, K) expected, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w must be contiguous int8, got ", w.scalar_type());
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.dim() == 2 && scale.size(0) == w.size(0),
              "scale must be float32 (N, groups) with N = ", w.size(0), ", got ", scale.scalar_type(), " ", scale.sizes());
  const int64_t K = x.size(1), G = scale.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 16 == 0, "group size must divide K and be a multiple of 16, got K = ", K,
              " with ", G, " groups");
}

torch::Tensor int8_weight_only_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check_weight_args(x, w, scale);
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == torch::kFloat || xt == torch::kBFloat16 || xt == torch::kHalf, "x must be float32, bfloat16 or float16, got ", xt);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  if (M == 0 || N == 0) return torch::zeros({M, N}, x.options());
  auto out = torch::empty({M, N}, x.options());
  thread_local std::vector<float> kept;  // reused across calls: no allocation per decode step
  std::vector<float> once;                // a larger x: freed on return, not kept
  Args a{nullptr, w.data_ptr<int8_t>(), scale.data_ptr<float>(), scale.stride(0), scale.stride(1),
         M, N, K, G, K / G, out.data_ptr(), xt};
  if (xt == torch::kBFloat16 && x.stride(1) == 1) {
    a.xb = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    a.ldxb = x.stride(0);
  }
  if (!takes_bf16(a)) a.x = x_as_f32(x, M * K <= kKeepFloats ? kept : once);  // the float tiles' x, only for them
  run_all(a);
  return out;
}

// out[m, n] = out[m, n] * s[n] in place, each product computed in float32 and rounded once to out's
// dtype (bfloat16 and float16 round to nearest even, float32 as is): what out.mul_(s.reshape(1, -1))
// gives for a float32 s, bit for bit except a NaN's payload (NaN stays NaN), without the float32
// temporary ATen makes for the mixed dtypes (it cost ~0.9 ms a call on a 256 x 1536 bf16 output, 74 us
// here). The chunked path's per-row weight scale.
torch::Tensor scale_columns_(torch::Tensor out, torch::Tensor s) {
  TORCH_CHECK(out.device().is_cpu() && s.device().is_cpu(), "out and s must be CPU tensors");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous (M, N) tensor, got ", out.sizes());
  const auto ot = out.scalar_type();
  TORCH_CHECK(ot == torch::kFloat || ot == torch::kBFloat16 || ot == torch::kHalf, "out must be float32, bfloat16 or float16, got ", ot);
  TORCH_CHECK(s.scalar_type() == torch::kFloat && s.numel() == out.size(1), "s must be float32 with N = ", out.size(1),
              " values, got ", s.scalar_type(), " ", s.sizes());
  const int64_t M = out.size(0), N = out.size(1);
  if (M == 0 || N == 0) return out;
  const auto sc = s.contiguous();
  const float* sp = sc.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  auto rows = [&](auto* o) {
    lowbit::par_for(0, M, grain, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        auto* r = o + m * N;
        int64_t n = 0;
        using T = std::remove_pointer_t<decltype(o)>;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          uint16_t* rb = reinterpret_cast<uint16_t*>(r);
          for (; n + 8 <= N; n += 8) {  // widen exactly, multiply, round to nearest even (NaN: quiet)
            const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + n))), 16));
            const __m256 p = _mm256_mul_ps(v, _mm256_loadu_ps(sp + n));
            const __m256i bits = _mm256_castps_si256(p);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
            __m256i rn = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
            const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(p, p, _CMP_UNORD_Q));
            rn = _mm256_blendv_epi8(rn, _mm256_set1_epi32(0x7FC0), nan);
            const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rn), _mm256_extracti128_si256(rn, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(rb + n), packed);
          }
        }
        for (; n < N; ++n) r[n] = static_cast<T>(static_cast<float>(r[n]) * sp[n]);
      }
    });
  };
  if (ot == torch::kBFloat16) rows(out.data_ptr<c10::BFloat16>());
  else if (ot == torch::kHalf) rows(out.data_ptr<c10::Half>());
  else rows(out.data_ptr<float>());
  return out;
}

// Also as the dispatcher op lowbit_cpu::int8_weight_only_mm (both builds register it; only one build of a
// kernel loads in a process), called from Python or a compiled graph without the Python layers of the custom
// op lowbit::int8_weight_only_linear. No autograd kernel: callers route here only when no gradient is wanted
// (lowbit/kernels/int8.py). The schema, fake kernel and a PyTorch body are defined in Python
// (lowbit/kernels/_cpu_ops.py, so a cached compiled graph runs without this extension): only the CPU kernel here.
// Its bias is added to the GEMV's output (aten's add, as lowbit/kernels/int8.py adds it in eager).
static torch::Tensor int8_weight_only_mm_op(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  torch::Tensor out = int8_weight_only_mm(x, w, scale);
  return bias.has_value() ? out + *bias : out;
}
TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("int8_weight_only_mm", TORCH_FN(int8_weight_only_mm_op)); }

#ifdef LOWBIT_INT8_GEMM_BF16
#include "amx.h"
// The AVX-512 build's large-M entry (int8_gemv.cpp): x @ dequantize(w, scale).T + bias for bf16 x, the
// weight made bf16 one L2-resident panel at a time inside the GEMM (gemm_bf16.h).
torch::Tensor int8_weight_only_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias);
// The smallest M at which the bf16 tiles convert each block of weight rows once into a scratch (int8_gemv.cpp).
void set_scratch_min_m(int64_t m);
int64_t get_scratch_min_m();
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("int8_weight_only_mm", &int8_weight_only_mm, "int8 weight-only matmul for small M");
  m.def("scale_columns_", &scale_columns_, "out[m, n] *= s[n] in place, in float32, rounded once to out's dtype");
#ifdef LOWBIT_INT8_GEMM_BF16
  m.def("int8_weight_only_gemm", &int8_weight_only_gemm,
        "int8 weight-only GEMM for bf16 x at large M (AVX-512 BF16): the weight made bf16 per panel inside the GEMM",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("set_scratch_min_m", &set_scratch_min_m,
        "bf16 x from this M on: each block of 4 weight rows converted once, for every row of x (tests, A/B runs)",
        py::arg("m"));
  m.def("get_scratch_min_m", &get_scratch_min_m, "set_scratch_min_m's value");
  m.def("set_amx", &lowbit::amx::set_enabled, "use AMX tiles where the CPU has them (default true; false: AVX-512 alone)");
  m.def("amx_active", [] { return lowbit::amx::usable_bf16() || lowbit::amx::usable_int8(); },
        "whether this process runs AMX tiles: the CPU has them, Linux granted them and set_amx did not switch them off");
#endif
}
