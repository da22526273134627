// The entry points of kernel "int8_int4" (8da4w with integer arithmetic), shared by its two builds:
// int8_int4.cpp (AVX-512 VNNI) and int8_int4_avx2.cpp (AVX2). Each source defines run_kernel (the
// product proper, declared below with its contract) and includes this header once; the argument
// checks, the activation quantizer (quantize_act_asym, bit for bit the primitives') and the Python
// module are the same code in both, so the builds differ only in how they form the exact int32
// group sums and in the order of the float32 operations that scale them.
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "parallel.h"
#include "prefetch.h"

namespace {

constexpr int64_t kBlock = 32;      // weights per 16 packed bytes; every group size is a multiple of it
constexpr int64_t kMaxGroup = 256;  // bound by the AVX2 build's int16 partial sums; both builds take the same groups

inline float load_float(const void* p, at::ScalarType t, int64_t i) {
  if (t == at::kBFloat16) return float(static_cast<const c10::BFloat16*>(p)[i]);
  if (t == at::kHalf) return float(static_cast<const c10::Half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

inline void store_float(void* p, at::ScalarType t, int64_t i, float v) {
  if (t == at::kBFloat16) static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v);
  else if (t == at::kHalf) static_cast<c10::Half*>(p)[i] = c10::Half(v);
  else static_cast<float*>(p)[i] = v;
}


void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), name, " must be a defined CPU tensor");
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Temporaries of a call (thread-local in the fused entry: reused, never shared between calls).
struct Scratch {
  std::vector<int8_t> xq, xp;
  std::vector<float> sx;
  std::vector<int32_t> zp, sxc;
  std::vector<uint16_t> xb;                // the AVX-512 build's AMX route: x's integers as bf16
  std::vector<float> sx_amx, bias_f32;     // and its row scales, bias as float32
};

// The kernel proper, after the entry points' checks: xq (M, K) int8 rows, sxp / zp one per row
// (zp in [-128, 127]), qdata (N, K/2), scale (N, G) with K / G a multiple of 32 up to 256, bias
// (N,) or nullptr, out (M, N); every pointer contiguous. Each build's source defines it.
void run_kernel(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
                const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
                Scratch& ws);

// The weight-side checks both entry points share (names as the entry's arguments).
void check_weight(const torch::Tensor& qdata, const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias,
                  int64_t K) {
  check_cpu(qdata, "qdata");
  check_cpu(scale, "scale");
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == torch::kByte && qdata.is_contiguous() && 2 * qdata.size(1) == K,
              "qdata must be contiguous uint8 (N, K/2) with K = ", K, ", got ", qdata.scalar_type(), " ", qdata.sizes());
  const int64_t N = qdata.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.size(0) == N,
              "scale must be contiguous float32 (N, G) with N = ", N, ", got ", scale.scalar_type(), " ", scale.sizes());
  const int64_t G = scale.size(1);
  TORCH_CHECK(G > 0 && K % G == 0, "scale groups (", G, ") must divide K (", K, ")");
  const int64_t gs = K / G;
  TORCH_CHECK(gs % kBlock == 0 && gs <= kMaxGroup, "group size must be a multiple of 32 and at most 256, got ", gs);
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() && is_float_type(bias->scalar_type()),
                "bias must be contiguous float32, bfloat16 or float16 (N,) with N = ", N, ", got ", bias->scalar_type(), " ",
                bias->sizes());
  }
}

}  // namespace

// Every argument is checked here (devices, dtypes, shapes, contiguity, the group size, the
// activation zero point's range): whatever a caller passes, nothing is read out of bounds and no
// int16 sum can saturate. Writes out (M, N) and returns it.
torch::Tensor int8_int4_linear(torch::Tensor xq, torch::Tensor x_scale, torch::Tensor x_zero_point, torch::Tensor qdata,
                               torch::Tensor scale, c10::optional<torch::Tensor> bias, torch::Tensor out) {
  check_cpu(xq, "xq");
  check_cpu(x_scale, "x_scale");
  check_cpu(x_zero_point, "x_zero_point");
  check_cpu(out, "out");
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == torch::kChar && xq.is_contiguous(), "xq must be contiguous int8 (M, K), got ",
              xq.scalar_type(), " ", xq.sizes());
  const int64_t M = xq.size(0), K = xq.size(1);
  check_weight(qdata, scale, bias, K);
  const int64_t N = qdata.size(0);
  TORCH_CHECK(x_scale.scalar_type() == torch::kFloat && x_scale.is_contiguous() && x_scale.numel() == M,
              "x_scale must be contiguous float32 with one value per row of xq (", M, "), got ", x_scale.scalar_type(), " ",
              x_scale.sizes());
  TORCH_CHECK(x_zero_point.scalar_type() == torch::kInt && x_zero_point.is_contiguous() && x_zero_point.numel() == M,
              "x_zero_point must be contiguous int32 with one value per row of xq (", M, "), got ",
              x_zero_point.scalar_type(), " ", x_zero_point.sizes());
  // A row whose scale is not finite (NaN or inf in the input) gives NaN outputs; its zero point
  // (whatever casting a NaN made of it) is replaced by 0 and not checked.
  const float* sxp = x_scale.data_ptr<float>();
  Scratch ws;
  ws.zp.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    const int32_t z = x_zero_point.data_ptr<int32_t>()[m];
    ws.zp[m] = std::isfinite(sxp[m]) ? z : 0;
    TORCH_CHECK(ws.zp[m] >= -128 && ws.zp[m] <= 127, "x_zero_point must be in [-128, 127] (int8 activations), got ", z,
                " in row ", m);
  }
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous() && is_float_type(out.scalar_type()),
              "out must be contiguous float32, bfloat16 or float16 (M, N) = (", M, ", ", N, "), got ", out.scalar_type(), " ",
              out.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  run_kernel(xq.data_ptr<int8_t>(), sxp, ws.zp.data(), M, K, qdata.data_ptr<uint8_t>(), N, scale.data_ptr<float>(),
             scale.size(1), has_bias ? bias->data_ptr() : nullptr, has_bias ? bias->scalar_type() : at::kFloat,
             out.data_ptr(), out.scalar_type(), ws);
  return out;
}

namespace {

// Row r of x (K values of T) quantized as the primitives do for an asymmetric int8 per-token spec with
// an integer zero point (choose_qparams_affine + quantize_affine), same float32 operations in the same
// order: mn = min(min x, 0), mx = max(max x, 0); s = max((mx - mn) / (qmax - qmin), eps);
// zp = clamp(qmin - round(mn / s), qmin, qmax); q = clamp(round(x / s) + zp, qmin, qmax); round half to
// even (the default rounding mode), IEEE division. Returns false when the row holds NaN or inf (the
// caller then runs the primitives, whose NaN propagation it does not imitate).
template <typename T>
bool quantize_row_asym(const T* x, int64_t K, float qmin, float qmax, float eps, int8_t* q, float* s_out, int32_t* zp_out) {
  float mn = 0.0f, mx = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float v = float(x[k]);
    finite &= std::isfinite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (!finite) return false;
  float s = (mx - mn) / (qmax - qmin);
  s = s < eps ? eps : s;
  float zp = qmin - std::nearbyint(mn / s);
  zp = zp < qmin ? qmin : (zp > qmax ? qmax : zp);
  *s_out = s;
  *zp_out = int32_t(zp);
  const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(zp), lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = float(x[k + i]);
    __m256 v = _mm256_div_ps(_mm256_load_ps(f), sv);
    v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zv);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    alignas(32) int32_t o[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(o), _mm256_cvtps_epi32(v));  // exact: integer values
    for (int i = 0; i < 8; ++i) q[k + i] = int8_t(o[i]);
  }
  for (; k < K; ++k) {
    float v = std::nearbyint(float(x[k]) / s) + zp;
    v = v < qmin ? qmin : (v > qmax ? qmax : v);
    q[k] = int8_t(v);
  }
  return true;
}

// Every row of x (M, K) contiguous float32 / bfloat16 / float16 by quantize_row_asym into q (M, K),
// s (M,), zp (M,); false when some row holds NaN or inf (that row's q, s and zp unwritten; row_ok, when given,
// gets M flags: 1 for the rows written).
// Rows run in parallel when there are enough of them (prefill: 256 x 576 took ~0.6 ms on one core, more
// than the product on SmolLM2's 576 x 192 layers); each row's values do not depend on the split.
bool quantize_rows_asym(const torch::Tensor& x, int64_t qmin, int64_t qmax, double eps, int8_t* q, float* s, int32_t* zp,
                        std::vector<char>* row_ok = nullptr) {
  const int64_t M = x.size(0), K = x.size(1);
  const float lo = float(qmin), hi = float(qmax), e = float(eps);
  std::vector<char> local;
  std::vector<char>& ok = row_ok ? *row_ok : local;
  ok.assign(M, 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  lowbit::par_for(0, M, grain, [&](int64_t b, int64_t end) {
    for (int64_t m = b; m < end; ++m) {
      switch (x.scalar_type()) {
        case at::kFloat: ok[m] = quantize_row_asym(x.data_ptr<float>() + m * K, K, lo, hi, e, q + m * K, s + m, zp + m); break;
        case at::kBFloat16:
          ok[m] = quantize_row_asym(x.data_ptr<c10::BFloat16>() + m * K, K, lo, hi, e, q + m * K, s + m, zp + m);
          break;
        default: ok[m] = quantize_row_asym(x.data_ptr<c10::Half>() + m * K, K, lo, hi, e, q + m * K, s + m, zp + m);
      }
    }
  });
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

}  // namespace

// x (M, K) float32 / bfloat16 / float16 -> (xq int8 (M, K), scale float32 (M, 1), zero point int32
// (M, 1), ok): the primitives' asymmetric int8 per-token quantization, bit for bit (tests compare with
// torch.equal). ok is false when some row holds NaN or inf; the other outputs are then unspecified.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool> quantize_act_asym(torch::Tensor x, int64_t qmin, int64_t qmax,
                                                                                double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && is_float_type(x.scalar_type()),
              "x must be contiguous float32, bfloat16 or float16 (M, K), got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(qmin >= -128 && qmin < qmax && qmax <= 127, "qmin, qmax must satisfy -128 <= qmin < qmax <= 127, got ", qmin,
              ", ", qmax);
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto s = torch::empty({M, 1}, x.options().dtype(torch::kFloat));
  auto zp = torch::empty({M, 1}, x.options().dtype(torch::kInt));
  const bool ok = quantize_rows_asym(x, qmin, qmax, eps, q.data_ptr<int8_t>(), s.data_ptr<float>(), zp.data_ptr<int32_t>());
  return {q, s, zp, ok};
}

// 8da4w in one call: quantize_act_asym(x, qmin, qmax, eps), then int8_int4_linear on its xq, scale
// and zero point (the same functions on the same values: equal bit for bit), the activation's
// values in thread-local buffers and only the (M, N) output (in x's dtype) allocated. Returns None,
// having written nothing, when a row of x holds NaN or inf (the caller then quantizes with the
// primitives, as quantize_act_asym's callers do) unless nan_rows: then such a row is given a NaN scale
// (and zero point 0), which int8_int4_linear turns into a row of NaN, the row the primitives' path gives
// (their scale of a row holding NaN or inf is NaN or inf; every other row's values do not depend on it).
// Arguments as the two entries take them.
static c10::optional<torch::Tensor> dynamic_linear(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale,
                                                   c10::optional<torch::Tensor> bias, int64_t qmin, int64_t qmax, double eps,
                                                   bool nan_rows) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && is_float_type(x.scalar_type()),
              "x must be contiguous float32, bfloat16 or float16 (M, K), got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  check_weight(qdata, scale, bias, K);
  TORCH_CHECK(qmin >= -128 && qmin < qmax && qmax <= 127, "qmin, qmax must satisfy -128 <= qmin < qmax <= 127, got ", qmin,
              ", ", qmax);
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const int64_t N = qdata.size(0);
  static thread_local Scratch ws;
  ws.xq.resize(M * K);
  ws.sx.resize(M);
  ws.zp.resize(M);
  std::vector<char> row_ok;
  if (!quantize_rows_asym(x, qmin, qmax, eps, ws.xq.data(), ws.sx.data(), ws.zp.data(), &row_ok)) {
    if (!nan_rows) return c10::nullopt;
    for (int64_t m = 0; m < M; ++m)
      if (!row_ok[m]) {
        std::fill(ws.xq.begin() + m * K, ws.xq.begin() + (m + 1) * K, int8_t(0));
        ws.sx[m] = std::numeric_limits<float>::quiet_NaN();
      }
  }
  // finite values can still make an infinite scale (max - min overflows float32): int8_int4_linear
  // gives that row NaN and takes its zero point as 0; so here
  for (int64_t m = 0; m < M; ++m)
    if (!std::isfinite(ws.sx[m])) ws.zp[m] = 0;
  auto out = torch::empty({M, N}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  run_kernel(ws.xq.data(), ws.sx.data(), ws.zp.data(), M, K, qdata.data_ptr<uint8_t>(), N, scale.data_ptr<float>(),
             scale.size(1), has_bias ? bias->data_ptr() : nullptr, has_bias ? bias->scalar_type() : at::kFloat,
             out.data_ptr(), out.scalar_type(), ws);
  if (ws.xp.size() + ws.xq.size() + 4 * ws.sxc.size() + 2 * ws.xb.size() > (size_t(1) << 22)) ws = Scratch();  // a large call: don't hold its memory
  return out;
}

c10::optional<torch::Tensor> int8_int4_dynamic_linear(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale,
                                                      c10::optional<torch::Tensor> bias, int64_t qmin, int64_t qmax,
                                                      double eps) {
  return dynamic_linear(x, qdata, scale, bias, qmin, qmax, eps, false);
}

// The CPU kernel of the dispatcher op lowbit_cpu::int8_int4_dynamic_linear (schema in lowbit/kernels/_cpu_ops.py,
// what a compiled 8da4w graph calls): the one-call path for every input, NaN / inf rows as the primitives' path
// gives them, so the op equals eager 8da4w bit for bit. Any x layout (made contiguous here).
torch::Tensor int8_int4_dynamic_linear_op(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale,
                                          c10::optional<torch::Tensor> bias, int64_t qmin, int64_t qmax, double eps,
                                          c10::string_view /*act_key: the spec, for the Python body*/) {
  c10::optional<torch::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  return *dynamic_linear(x.contiguous(), qdata.contiguous(), scale.contiguous(), b, qmin, qmax, eps, true);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("int8_int4_dynamic_linear", TORCH_FN(int8_int4_dynamic_linear_op)); }

#ifdef LOWBIT_INT8_INT4_AMX
#include "amx.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LOWBIT_INT8_INT4_AMX
  m.def("set_amx", &lowbit::amx::set_enabled, "use AMX tiles where the CPU has them (default true; false: AVX-512 alone)");
  m.def("amx_active", [] { return lowbit::amx::usable_bf16() || lowbit::amx::usable_int8(); },
        "whether this process runs AMX tiles: the CPU has them, Linux granted them and set_amx did not switch them off");
#endif
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("quantize_act_asym", &quantize_act_asym,
        "asymmetric int8 per-token activation quantization, bit for bit the primitives': (xq, scale, zero_point, ok)");
  m.def("int8_int4_linear", &int8_int4_linear,
        "int8 activations (per-row scale, zero point) x packed int4 weight: exact int32 group sums, float32 scaling");
  m.def("int8_int4_dynamic_linear", &int8_int4_dynamic_linear,
        "quantize_act_asym + int8_int4_linear in one call, the same values bit for bit; None when x holds NaN or inf",
        py::arg("x"), py::arg("qdata"), py::arg("scale"), py::arg("bias"), py::arg("qmin"), py::arg("qmax"), py::arg("eps"));
}
