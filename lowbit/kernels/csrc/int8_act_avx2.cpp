// Int8 activation quantization and the W8A8 epilogue, each one pass over memory: the AVX2 + F16C
// build (no AVX-512) of int8_act.cpp, with the same entry points, checks and error messages, plus
// mm_i8, an exact int8 x int8 -> int32 GEMM for small M on CPUs without VNNI (the AVX-512 build's
// hosts have VNNI and use torch._int_mm), and w8a8_dynamic_linear, quantize_i8 (dynamic) + mm_i8 +
// w8a8_epilogue as one call with thread-local temporaries (the AVX-512 build has no mm_i8, so no
// such entry: its callers check with getattr).
//
// Same float32 operations as lowbit.primitives, in the same order, so results are bit-identical
// to the PyTorch path (built with -ffp-contract=off: no fused multiply-adds):
//   quantize:  q = clamp(round_half_even(x / s) + zp, -128, 127)
//              per token (dynamic, symmetric): s = max(max|x_m| / 127, eps)
//   epilogue:  out = cast(((float(acc - zp_x * rowsum) * s_x) * s_w[n]) + bias[n])
#include <torch/extension.h>
#include "parallel.h"
#include "prefetch.h"
#include "mm_i8_check.h"
#include "fp8_act.h"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// 8 values of x (float32, bf16 or fp16) as float32.
template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
template <> inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename T> inline __m256 load_tail(const T* p, int64_t n) {  // n < 8, zero-filled
  alignas(32) T buf[8] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load8<T>(buf);
}

// float32 -> T with round-to-nearest-even (bf16: as c10::BFloat16's conversion; NaN stays NaN),
// the first n (<= 8) values.
template <typename T> inline void store8(T* p, __m256 v, int64_t n);
template <> inline void store8<float>(float* p, __m256 v, int64_t n) {
  if (n == 8) return _mm256_storeu_ps(p, v);
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  std::memcpy(p, buf, n * sizeof(float));
}
template <> inline void store8<at::BFloat16>(at::BFloat16* p, __m256 v, int64_t n) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (n == 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t buf[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
  std::memcpy(p, buf, n * 2);
}
template <> inline void store8<at::Half>(at::Half* p, __m256 v, int64_t n) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (n == 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t buf[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
  std::memcpy(p, buf, n * 2);
}

// 8 values -> 8 int8 in the low 8 bytes.
inline __m128i quant8(__m256 x, __m256 s, __m256 zp) {
  __m256 q = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, zp), _mm256_set1_ps(-128.f)), _mm256_set1_ps(127.f));
  const __m256i i = _mm256_cvtps_epi32(q);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  return _mm_packs_epi16(w, w);
}

inline __m256 abs8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

template <typename T>
void quantize_rows(const T* x, int8_t* q, float* scales, int64_t M, int64_t K, float s_static, float zp, float eps) {
  lowbit::par_for(0, M, 8, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const T* xr = x + m * K;
      float s = s_static;
      if (scales) {  // dynamic symmetric: s = max(amax / 127, eps)
        __m256 a = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) a = _mm256_max_ps(a, abs8(load8<T>(xr + k)));
        if (k < K) a = _mm256_max_ps(a, abs8(load_tail<T>(xr + k, K - k)));
        s = std::max(hmax(a) / 127.f, eps);
        scales[m] = s;
      }
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(zp);
      int8_t* qr = q + m * K;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), quant8(load8<T>(xr + k), vs, vz));
      if (k < K) {
        alignas(16) int8_t buf[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(buf), quant8(load_tail<T>(xr + k, K - k), vs, vz));
        std::memcpy(qr + k, buf, K - k);
      }
    }
  });
}

inline __m256i load_i32(const int32_t* p, int64_t n) {
  if (n == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) int32_t buf[8] = {};
  std::memcpy(buf, p, n * 4);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

inline __m256 load_f32(const float* p, int64_t n) {
  if (n == 8) return _mm256_loadu_ps(p);
  alignas(32) float buf[8] = {};
  std::memcpy(buf, p, n * 4);
  return _mm256_load_ps(buf);
}

template <typename T>
void epilogue_rows(const int32_t* acc, const float* sx, bool sx_per_row, const float* sw, const T* bias,
                   const int32_t* zcorr, T* out, int64_t M, int64_t N) {
  lowbit::par_for(0, M, 4, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const __m256 vsx = _mm256_set1_ps(sx_per_row ? sx[m] : sx[0]);
      const int32_t* a = acc + m * N;
      T* o = out + m * N;
      for (int64_t n = 0; n < N; n += 8) {
        const int64_t len = std::min<int64_t>(8, N - n);
        __m256i ai = load_i32(a + n, len);
        if (zcorr) ai = _mm256_sub_epi32(ai, load_i32(zcorr + n, len));
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ai), vsx), load_f32(sw + n, len));
        if (bias) v = _mm256_add_ps(v, len == 8 ? load8<T>(bias + n) : load_tail<T>(bias + n, len));
        store8<T>(o + n, v, len);
      }
    }
  });
}


// --- mm_i8: exact int8 x int8 -> int32 GEMM for small M on CPUs without VNNI ---------------------
// _mm256_maddubs_epi16(|w|, sign(x, w)): |w| <= 128 as uint8, sign(x, w) = x * sgn(w) as int8, so
// each product is x * w and each int16 pair sum is at most 2 * 128 * 127 = 32512 in magnitude: no
// saturation, provided x != -128 (-(-128) does not fit int8). _mm256_madd_epi16 with ones widens the
// pairs to int32, where they accumulate. A row of a holding -128 is split exactly in two rows,
// x = max(x, -127) + (x == -128 ? -1 : 0), both free of -128, whose results are added in int32.
// Measured on the AVX2-only EPYC (1 thread, 8 x 4096 x 4096, CPU time): 1.1-1.5x faster than
// sign-extending both operands to int16 for _mm256_madd_epi16 (one multiply per 16 products, but
// twice the activation bytes and a widening load per 16 weights), 1.3-1.5x at M >= 4. The weight rows are
// prefetched as the GEMVs' (prefetch.h) on the first pass over them (PF): on that Zen 3 host it did not help
// (its hardware prefetcher followed the 4 row streams), on a Zen 2 EPYC (rows of 4096 bytes, one 4 KiB page
// each: the hardware stream starts over on every row) W8A8 at M = 1 went from ~0.75 to ~0.85 of DRAM.
constexpr int kNR = 4;                // weight rows (output columns) per pass: 4 row streams at once
constexpr int kMR = 2;                // activation rows per pass (kMR * kNR int32 accumulators)
constexpr int64_t kABytes = 1 << 18;  // activation bytes per sweep over the columns (they stay in L2)

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// c[i, j] = sum_k a[i, k] * b[j, k] for i < MR, j < NR. a: int8 rows of lda >= K values, none -128,
// zero from K to K rounded up to 32; b: int8 rows of K values; c: int32 rows of ldc.
template <int MR, int NR, bool PF>
void mm_i8_block(const int8_t* a, int64_t lda, const int8_t* b, int64_t K, int32_t* c, int64_t ldc) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  // one weight row at a time against the MR activation rows: 13 of the 16 ymm registers live
  // (holding all NR rows and their absolute values at once, gcc spilled accumulators)
  auto step = [&](const int8_t* const (&wrow)[NR], int64_t k) {
    __m256i x[MR];
    for (int i = 0; i < MR; ++i) x[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
    for (int j = 0; j < NR; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[j]));
      const __m256i uw = _mm256_abs_epi8(w);
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(uw, _mm256_sign_epi8(x[i], w)), ones));
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const int8_t* wrow[NR];
    for (int j = 0; j < NR; ++j) wrow[j] = b + j * K + k;
    if (PF && (k & 63) == 0)
      for (int j = 0; j < NR; ++j) lowbit::prefetch_stream(wrow[j]);
    step(wrow, k);
  }
  if (k < K) {  // K % 32 tail: the weight bytes through zeroed buffers (a is zero there already)
    alignas(32) int8_t buf[NR][32] = {};
    const int8_t* wrow[NR];
    for (int j = 0; j < NR; ++j) {
      std::memcpy(buf[j], b + j * K + k, K - k);
      wrow[j] = buf[j];
    }
    step(wrow, k);
  }
  for (int i = 0; i < MR; ++i) {
    if constexpr (NR == 4) {  // four 8-lane sums at once: [c0, c1, c2, c3]
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[i][0], acc[i][1]), _mm256_hadd_epi32(acc[i][2], acc[i][3]));
      const __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + i * ldc), sum);
    } else {
      for (int j = 0; j < NR; ++j) c[i * ldc + j] = hsum_i32(acc[i][j]);
    }
  }
}

template <int MR, bool PF>
void mm_i8_block_nr(int nr, const int8_t* a, int64_t lda, const int8_t* b, int64_t K, int32_t* c, int64_t ldc) {
  switch (nr) {
    case 4: return mm_i8_block<MR, 4, PF>(a, lda, b, K, c, ldc);
    case 3: return mm_i8_block<MR, 3, PF>(a, lda, b, K, c, ldc);
    case 2: return mm_i8_block<MR, 2, PF>(a, lda, b, K, c, ldc);
    default: return mm_i8_block<MR, 1, PF>(a, lda, b, K, c, ldc);
  }
}

// pf: the first pass over these weight rows (later passes find them in cache).
void mm_i8_block_any(int mr, int nr, bool pf, const int8_t* a, int64_t lda, const int8_t* b, int64_t K, int32_t* c,
                     int64_t ldc) {
  static_assert(kMR == 2, "mm_i8_block_any dispatches mr in 1..2");
  if (pf) return mr == 2 ? mm_i8_block_nr<2, true>(nr, a, lda, b, K, c, ldc) : mm_i8_block_nr<1, true>(nr, a, lda, b, K, c, ldc);
  return mr == 2 ? mm_i8_block_nr<2, false>(nr, a, lda, b, K, c, ldc) : mm_i8_block_nr<1, false>(nr, a, lda, b, K, c, ldc);
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

namespace {

// What mm_i8_into needs besides its operands, kept between calls (thread-local in the fused entry).
struct MmScratch {
  std::vector<int8_t> ax;     // a copied into rows of lda, zero-padded (plus the split rows)
  std::vector<int32_t> acc;   // (R, N) results when some row was split (R > M)
  std::vector<int64_t> extra;
};

// out (M, N) int32 = a @ b.T for int8 a (M, K) and b (N, K), both row-major and contiguous, exact:
// mm_i8's body on raw pointers (see mm_i8 below).
void mm_i8_into(const int8_t* ap, int64_t M, int64_t K, const int8_t* bp, int64_t N, int32_t* op, MmScratch& ws) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::fill(op, op + M * N, 0);
    return;
  }
  // a copied into rows of lda (zero-padded to 32 columns); row m holding -128 gets a second row
  // extra[m] >= M: a = max(a, -127) in row m plus (a == -128 ? -1 : 0) in row extra[m]
  ws.extra.assign(M, -1);
  std::vector<int64_t>& extra = ws.extra;
  int64_t R = M;
  for (int64_t m = 0; m < M; ++m)
    if (std::find(ap + m * K, ap + (m + 1) * K, int8_t(-128)) != ap + (m + 1) * K) extra[m] = R++;
  const int64_t lda = (K + 31) / 32 * 32;
  ws.ax.assign(R * lda, 0);
  int8_t* axp = ws.ax.data();
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = ap + m * K;
    int8_t* dst = axp + m * lda;
    if (extra[m] < 0) {
      std::memcpy(dst, src, K);
      continue;
    }
    int8_t* low = axp + extra[m] * lda;
    for (int64_t k = 0; k < K; ++k) {
      dst[k] = src[k] == -128 ? int8_t(-127) : src[k];
      low[k] = src[k] == -128 ? int8_t(-1) : int8_t(0);
    }
  }
  if (R > M) ws.acc.resize(R * N);
  int32_t* cp = R == M ? op : ws.acc.data();
  const int64_t mc = std::max<int64_t>(kMR, kABytes / lda / kMR * kMR);  // rows per sweep, a multiple of kMR
  const int64_t blocks = (N + kNR - 1) / kNR;
  // at least ~2^18 multiply-adds per thread, so tiny products don't pay for waking threads
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (kNR * K * std::min(R, mc)));
  lowbit::par_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < R; m0 += mc) {
      const int64_t m1 = std::min(R, m0 + mc);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n = blk * kNR;
        const int nr = int(std::min<int64_t>(kNR, N - n));
        for (int64_t m = m0; m < m1; m += kMR)
          mm_i8_block_any(int(std::min<int64_t>(kMR, m1 - m)), nr, m == 0, axp + m * lda, lda, bp + n * K, K,
                          cp + m * N + n, N);
      }
    }
  });
  if (R == M) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {  // int32 sum, wrapping like the accumulators (unsigned: no UB)
      const uint32_t lo = extra[m] < 0 ? 0u : uint32_t(cp[extra[m] * N + n]);
      op[m * N + n] = int32_t(uint32_t(cp[m * N + n]) + lo);
    }
}

// The fused entry's temporaries, reused by the next call on the same thread (nothing in them
// outlives a call's meaning; they only keep their capacity).
constexpr size_t kKeepScratch = size_t(1) << 22;  // accumulator bytes a thread keeps between calls (4 MiB)
struct DynScratch {
  std::vector<int8_t> xq;
  std::vector<float> sx;
  std::vector<int32_t> acc;
  MmScratch mm;
};

}  // namespace

// a @ b.T for int8 a (M, K) and b (N, K), exact in int32: equal to torch._int_mm(a, b.t()) bit for
// bit (int32 sums wrap as any int32 accumulator would, from K > 2^17). Made for small M (decode) on
// CPUs without int8 dot products: each weight row is read once per sweep of up to kABytes of
// activation rows (one sweep for M <= 64 at K = 4096), the output columns split across threads.
torch::Tensor mm_i8(torch::Tensor a, torch::Tensor b) {
  lowbit::check_mm_i8(a, b);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  auto out = torch::empty({M, N}, a.options().dtype(torch::kInt));
  MmScratch ws;
  mm_i8_into(a.data_ptr<int8_t>(), M, K, b.data_ptr<int8_t>(), N, out.data_ptr<int32_t>(), ws);
  return out;
}

namespace {

// W8A8 in one call, for small M on CPUs without VNNI: quantize_i8(x, act_scale, 0, eps) (act_scale < 0:
// dynamic symmetric per token), then mm_i8(xq, w), then w8a8_epilogue(acc, s_x, s_w, bias, None, x), the
// same functions on the same values (so equal bit for bit), with xq, s_x and the int32 accumulator in
// thread-local buffers; only the (M, N) output (in x's dtype) is allocated. `fn`: the entry's name, in
// its messages. x: contiguous (M, K) float32 / bfloat16 / float16; w: contiguous int8 (N, K); s_w:
// contiguous float32 (N,); bias: contiguous (N,) in x's dtype or None; eps > 0.
torch::Tensor w8a8_linear(const char* fn, torch::Tensor x, torch::Tensor w, torch::Tensor s_w,
                          c10::optional<torch::Tensor> bias, double act_scale, double eps) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), fn, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous (M, K) tensor, got sizes ",
              x.sizes(), " strides ", x.strides());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16 || dt == torch::kHalf,
              fn, ": x must be float32, bfloat16 or float16, got ", dt);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.defined() && w.device().is_cpu(), fn, ": w must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == torch::kChar, fn, ": w must be int8, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == K,
              fn, ": w must be a contiguous (N, K) tensor with K = ", K, ", got sizes ", w.sizes(),
              " strides ", w.strides());
  const int64_t N = w.size(0);
  TORCH_CHECK(s_w.defined() && s_w.device().is_cpu(), fn, ": s_w must be a CPU tensor");
  TORCH_CHECK(s_w.scalar_type() == torch::kFloat && s_w.dim() == 1 && s_w.size(0) == N && s_w.is_contiguous(),
              fn, ": s_w must be a contiguous float32 (N,) tensor with N = ", N, ", got ", s_w.scalar_type(),
              " ", s_w.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu(), fn, ": bias must be a CPU tensor");
    TORCH_CHECK(bias->scalar_type() == dt && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                fn, ": bias must be a contiguous (N,) tensor in x's dtype (", dt, ") with N = ", N,
                ", got ", bias->scalar_type(), " ", bias->sizes());
  }
  TORCH_CHECK(eps > 0, fn, ": eps must be positive, got ", eps);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  static thread_local DynScratch ws;
  const bool dynamic = act_scale < 0;
  ws.xq.resize(M * K);
  ws.sx.assign(dynamic ? M : 1, float(act_scale));
  ws.acc.resize(M * N);
  const float fe = float(eps), fs = dynamic ? -1.0f : float(act_scale);
  switch (dt) {
#define LOWBIT_DYN(T, ST)                                                                                          \
  case ST:                                                                                                         \
    quantize_rows(x.data_ptr<T>(), ws.xq.data(), dynamic ? ws.sx.data() : nullptr, M, K, fs, 0.0f, fe);          \
    mm_i8_into(ws.xq.data(), M, K, w.data_ptr<int8_t>(), N, ws.acc.data(), ws.mm);                                 \
    epilogue_rows<T>(ws.acc.data(), ws.sx.data(), dynamic && M > 1, s_w.data_ptr<float>(),                         \
                     has_bias ? bias->data_ptr<T>() : nullptr,                                                     \
                     nullptr, out.data_ptr<T>(), M, N);                                                            \
    break;
    LOWBIT_DYN(float, torch::kFloat)
    LOWBIT_DYN(at::BFloat16, torch::kBFloat16)
    LOWBIT_DYN(at::Half, torch::kHalf)
#undef LOWBIT_DYN
    default: break;  // checked above
  }
  if (ws.acc.size() + ws.mm.acc.size() > kKeepScratch / 4) ws = DynScratch();  // a large call: don't hold its memory
  return out;
}

}  // namespace

// W8A8 with dynamic symmetric per-token activations in one call (w8a8_linear above, act_scale -1).
torch::Tensor w8a8_dynamic_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s_w, c10::optional<torch::Tensor> bias,
                                  double eps) {
  return w8a8_linear("w8a8_dynamic_linear", x, w, s_w, bias, -1.0, eps);
}

// W8A8 with a static per-tensor activation scale and a zero point of 0 in one call: quantize_i8(x,
// act_scale, 0, eps), mm_i8 and w8a8_epilogue with s_x = act_scale, equal to the three calls bit for bit.
torch::Tensor w8a8_static_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s_w, c10::optional<torch::Tensor> bias,
                                 double act_scale, double eps) {
  TORCH_CHECK(std::isfinite(act_scale) && act_scale > 0, "w8a8_static_linear: act_scale must be a positive finite float, got ",
              act_scale);
  return w8a8_linear("w8a8_static_linear", x, w, s_w, bias, act_scale, eps);
}

// The CPU kernel of lowbit_cpu::w8a8_dynamic_linear (schema in lowbit/kernels/_cpu_ops.py; what a compiled W8A8
// graph calls on an AVX2 host). The AVX-512 build has no such entry: there the op's Python body runs.
// act_key, w_key: the specs, which only the op's Python body reads.
torch::Tensor w8a8_dynamic_linear_op(torch::Tensor x, torch::Tensor w, torch::Tensor s_w, c10::optional<torch::Tensor> bias,
                                     double eps, c10::string_view /*act_key*/, c10::string_view /*w_key*/) {
  return w8a8_dynamic_linear(x, w, s_w, bias, eps);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("w8a8_dynamic_linear", TORCH_FN(w8a8_dynamic_linear_op)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &lowbit::set_prefetch, "the weight stream's prefetch: hint 0 nta, 1 t0, 2 t1; distance in bytes");
  m.def("get_prefetch", &lowbit::get_prefetch, "(hint, distance) of the weight stream's prefetch");
  m.def("quantize_i8", &quantize_i8, "int8 activation quantization (static, or dynamic per-token symmetric)");
  m.def("w8a8_epilogue", &w8a8_epilogue, "int32 accumulator -> scaled float output");
  m.def("fake_quant_fp8", &fp8_act::fake_quant_fp8, "float8 activation fake quantization (per token, per tensor or static), one pass",
        py::arg("x"), py::arg("static_scale"), py::arg("per_token"), py::arg("eps"), py::arg("e5m2"));
  m.def("mm_i8", &mm_i8, "a @ b.T for int8 a (M, K), b (N, K), exact int32 (small M, no VNNI)");
  m.def("w8a8_dynamic_linear", &w8a8_dynamic_linear,
        "quantize_i8 (dynamic per token) + mm_i8 + w8a8_epilogue in one call, the same values bit for bit",
        py::arg("x"), py::arg("w"), py::arg("s_w"), py::arg("bias"), py::arg("eps"));
  m.def("w8a8_static_linear", &w8a8_static_linear,
        "quantize_i8 (static scale, zero point 0) + mm_i8 + w8a8_epilogue in one call, the same values bit for bit",
        py::arg("x"), py::arg("w"), py::arg("s_w"), py::arg("bias"), py::arg("act_scale"), py::arg("eps"));
}
