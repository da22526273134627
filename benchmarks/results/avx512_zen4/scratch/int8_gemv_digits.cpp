// SCRATCH RECORD, NOT BUILT: the exact-integer int8 GEMV variant of 2026-12-04 (session 11), kept with
// its measurements in README.md here. It replaced csrc/int8_gemv.cpp of 062e3e0, with three more
// declarations in int8_gemv_entry.h's namespace (bool digits_available(); bool digits_enabled();
// void set_digits(bool on);), their pybind entries, stubs in the AVX2 build, and prefetch.h's
// prefetch_at<Hint>(at, distance). Not adopted: from DRAM it streamed no faster than the float tiles.
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
// Summation order (the same for every tile shape, every M and every thread count, so a row of a
// result at M > 1 equals, bit for bit, the result for that row of x alone at M = 1):
//   1. lane j of the accumulator sums x[m, k] * float(w[n, k]) for k = j, j + 16, ... of one group, in
//      order of k, by FMA;
//   2. at the end of group g: tot = fma(acc, s[n, g], tot), groups in order;
//   3. the 16 lanes of tot are summed by _mm512_reduce_add_ps (a fixed tree), rounded once to x's dtype.
// The AVX2 build sums the same products in another order (8 lanes).
#include "int8_gemv_entry.h"
#include "mxcsr.h"

#include <atomic>
#include <cmath>

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

// ---------------------------------------------------------------------------------------------------
// The exact-integer path (AVX-512 VNNI; used by run_all where it applies, else the float tiles above).
//
// Each row of x is written exactly as an integer times a power of two, in P <= 4 planes of int8 digits:
//   x[m, k] = 2^(E - 8P + 2) * X[m, k],   X = sum_p 256^(P - 1 - p) * d[m, p, k],   d in [-128, 127]
// (E: |x[m, k]| < 2^E for the row's largest; balanced base-256 digits). A row is exact in P planes when
// every element's last significant bit is >= 2^(E - 8P + 2): for bf16 rows (8 significant bits) when
// the row's elements span at most 8P - 10 binades below the largest (22 at P = 4); a zero costs nothing.
// P is the most any row of the call needs, capped at 4; a row that needs more (a float32 row, or a bf16
// row with elements 2^23 times smaller than its largest) is rounded, half to even, to multiples of
// 2^(E - 30): an error under 2^-30 of its largest magnitude (float32 rounds a sum at 2^-24 of it).
// Then, per weight row n and group g, vpdpbusd multiplies u = w + 128 (the weight's bytes with the top
// bit flipped: unsigned) by each plane's digits (signed), each int32 lane summing 4 products per
// instruction, exactly; the lanes start at -128 * (sum of the plane's digits over the group) in lane 0,
// so at the group's end the 16 lanes of plane p sum, exactly, to I_p = sum_k w[n, k] d[m, p, k].
// So x[m] . w[n] over group g = 2^(E - 6) * sum_p 2^(-8p) I_p: per group the planes' lanes are
// converted to float32 and added by FMA with s[n, g] * 2^(-8p) (exact), the 16 lanes are summed at the
// end by _mm512_reduce_add_ps and the sum is multiplied by 2^(E - 6) (ldexp: one rounding, only if
// subnormal), then rounded once to x's dtype. Exact products and exact sums within a group (the float
// tiles round each product's sum per lane in float32); the float32 steps are the groups' and planes'.
//
// Why: per 64 weight bytes and row of x, P vpdpbusd (64 products each) against 4 vpmovsxbd +
// 4 vcvtdq2ps + 4 FMA for the float tiles. A row's result does not depend on M, the tile or the thread
// count (a plane that a row does not need has zero digits, adding exact zeros), as for the float tiles.
// Where it does not apply, the float tiles run: groups not a multiple of 64 (or over 65536, where an
// int32 lane could overflow), scales not 0 or within [2^-100, 2^90] in magnitude (so the products with
// 2^(-8p) and the running totals stay normal and finite), rows of x with a NaN or infinity (those rows
// alone, through the float tile at M = 1: the other rows keep the integer path).
constexpr int kMaxPlanes = 4;
std::atomic<bool> g_digits{true};

bool cpu_vnni() {
  static const bool v = __builtin_cpu_supports("avx512vnni");
  return v;
}

struct Digits {
  int P = 1;
  const int8_t* d = nullptr;      // (M, P, K): plane p of row m at d + (m * P + p) * K
  const int32_t* init = nullptr;  // (M, P, G): -128 * the sum of plane p's digits over group g
  const int* e = nullptr;         // per row m: E - 6
  const uint8_t* ok = nullptr;    // per row m: 0 when the row has a NaN or an infinity (computed by the float tile)
};

struct DigitBuf {
  std::vector<int32_t> X, init;
  std::vector<int8_t> d;
  std::vector<int> e;
  std::vector<uint8_t> ok;
};

// Fills buf with x's digits (a.x: M rows of K float32) and returns the view the tiles read.
Digits make_digits(const Args& a, DigitBuf& buf) {
  lowbit::NoDenormalsAreZero keep_subnormals;  // a subnormal element is a value like any other
  const int64_t M = a.M, K = a.K, G = a.G, gs = a.gs;
  buf.X.resize(M * K);
  buf.e.assign(M, 0);
  buf.ok.assign(M, 1);
  int P = 1;
  const __m512i expo = _mm512_set1_epi32(0x7F800000);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = a.x + m * K;
    int32_t* X = buf.X.data() + m * K;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_loadu_ps(x + k);
      bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), expo), expo);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    if (bad || amax == 0.0f) {
      if (bad) buf.ok[m] = 0;
      std::fill(X, X + K, 0);
      continue;
    }
    int E;
    std::frexp(amax, &E);  // amax < 2^E
    buf.e[m] = E - 6;
    const __m512 sh = _mm512_set1_ps(float(8 * kMaxPlanes - 2 - E));
    __m512i bits = _mm512_setzero_si512();
    __mmask16 inexact = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 y = _mm512_scalef_ps(_mm512_loadu_ps(x + k), sh);  // exact: a power of two, |y| < 2^30
      const __m512i q = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      inexact |= _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(q), y, _CMP_NEQ_UQ);
      bits = _mm512_or_si512(bits, q);
      _mm512_storeu_si512(X + k, q);
    }
    const uint32_t b = uint32_t(_mm512_reduce_or_epi32(bits));
    const int need = inexact ? kMaxPlanes : std::max(1, kMaxPlanes - int(__builtin_ctz(b)) / 8);
    P = std::max(P, need);
  }
  // Digits of X >> 8 (4 - P) (exact: every row needs at most P planes, or P = 4), lowest plane first.
  buf.d.resize(M * P * K);
  buf.init.assign(M * P * G, 0);
  const int shift = 8 * (kMaxPlanes - P);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      __m512i sum[kMaxPlanes];
      for (int p = 0; p < P; ++p) sum[p] = _mm512_setzero_si512();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
        __m512i v = _mm512_srai_epi32(_mm512_loadu_si512(buf.X.data() + m * K + k), shift);
        for (int p = P - 1; p >= 0; --p) {
          const __m512i dv = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(buf.d.data() + (m * P + p) * K + k), _mm512_cvtepi32_epi8(dv));
          sum[p] = _mm512_add_epi32(sum[p], dv);
          v = _mm512_srai_epi32(_mm512_sub_epi32(v, dv), 8);
        }
      }
      for (int p = 0; p < P; ++p) buf.init[(m * P + p) * G + g] = -128 * _mm512_reduce_add_epi32(sum[p]);
    }
  Digits dg;
  dg.P = P;
  dg.d = buf.d.data();
  dg.init = buf.init.data();
  dg.e = buf.e.data();
  dg.ok = buf.ok.data();
  return dg;
}

// One pass of R <= 4 weight rows (wr) against JC <= 4 virtual rows of digits (xd: a row of x's plane)
// over k0 .. k1 (64 bytes a step), adding into acc[r * JC + j] (in memory between passes; in a pass the
// R x JC accumulators, the JC digit vectors and a weight vector are registers). PF: the weight
// prefetch's hint (prefetch.h; -1: none, the later passes over a block find its weight rows in L1).
// Named variables, not arrays: gcc 12 keeps a [R][JC] array of accumulators in registers only by
// copying each one to another register and back around every vpdpbusd, and spills some.
template <int R, int JC, int PF>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dpass(const int8_t* const* wr, const int8_t* const* xd, int64_t k0,
                                                                   int64_t k1, __m512i* acc, int64_t dist) {
  static_assert(R >= 1 && R <= 4 && JC >= 1 && JC <= 4, "a pass is at most 4 x 4 accumulators");
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512i z = _mm512_setzero_si512();
#define LOWBIT_ACC_LOAD(r, j) __m512i c##r##j = (r < R && j < JC) ? _mm512_load_si512(acc + r * JC + j) : z;
  LOWBIT_ACC_LOAD(0, 0) LOWBIT_ACC_LOAD(0, 1) LOWBIT_ACC_LOAD(0, 2) LOWBIT_ACC_LOAD(0, 3)
  LOWBIT_ACC_LOAD(1, 0) LOWBIT_ACC_LOAD(1, 1) LOWBIT_ACC_LOAD(1, 2) LOWBIT_ACC_LOAD(1, 3)
  LOWBIT_ACC_LOAD(2, 0) LOWBIT_ACC_LOAD(2, 1) LOWBIT_ACC_LOAD(2, 2) LOWBIT_ACC_LOAD(2, 3)
  LOWBIT_ACC_LOAD(3, 0) LOWBIT_ACC_LOAD(3, 1) LOWBIT_ACC_LOAD(3, 2) LOWBIT_ACC_LOAD(3, 3)
#undef LOWBIT_ACC_LOAD
  const int8_t* w0 = wr[0];
  const int8_t* w1 = R > 1 ? wr[1] : w0;
  const int8_t* w2 = R > 2 ? wr[2] : w0;
  const int8_t* w3 = R > 3 ? wr[3] : w0;
  const int8_t* x0 = xd[0];
  const int8_t* x1 = JC > 1 ? xd[1] : x0;
  const int8_t* x2 = JC > 2 ? xd[2] : x0;
  const int8_t* x3 = JC > 3 ? xd[3] : x0;
  for (int64_t k = k0; k < k1; k += 64) {
    lowbit::prefetch_at<PF>(w0 + k, dist);
    if constexpr (R > 1) lowbit::prefetch_at<PF>(w1 + k, dist);
    if constexpr (R > 2) lowbit::prefetch_at<PF>(w2 + k, dist);
    if constexpr (R > 3) lowbit::prefetch_at<PF>(w3 + k, dist);
    const __m512i d0 = _mm512_loadu_si512(x0 + k);
    const __m512i d1 = JC > 1 ? _mm512_loadu_si512(x1 + k) : z;
    const __m512i d2 = JC > 2 ? _mm512_loadu_si512(x2 + k) : z;
    const __m512i d3 = JC > 3 ? _mm512_loadu_si512(x3 + k) : z;
#define LOWBIT_ROW(r)                                                        \
  if constexpr (r < R) {                                                     \
    const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w##r + k), flip); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, u, d0);                           \
    if constexpr (JC > 1) c##r##1 = _mm512_dpbusd_epi32(c##r##1, u, d1);     \
    if constexpr (JC > 2) c##r##2 = _mm512_dpbusd_epi32(c##r##2, u, d2);     \
    if constexpr (JC > 3) c##r##3 = _mm512_dpbusd_epi32(c##r##3, u, d3);     \
  }
    LOWBIT_ROW(0) LOWBIT_ROW(1) LOWBIT_ROW(2) LOWBIT_ROW(3)
#undef LOWBIT_ROW
  }
#define LOWBIT_ACC_STORE(r, j) \
  if constexpr (r < R && j < JC) _mm512_store_si512(acc + r * JC + j, c##r##j);
  LOWBIT_ACC_STORE(0, 0) LOWBIT_ACC_STORE(0, 1) LOWBIT_ACC_STORE(0, 2) LOWBIT_ACC_STORE(0, 3)
  LOWBIT_ACC_STORE(1, 0) LOWBIT_ACC_STORE(1, 1) LOWBIT_ACC_STORE(1, 2) LOWBIT_ACC_STORE(1, 3)
  LOWBIT_ACC_STORE(2, 0) LOWBIT_ACC_STORE(2, 1) LOWBIT_ACC_STORE(2, 2) LOWBIT_ACC_STORE(2, 3)
  LOWBIT_ACC_STORE(3, 0) LOWBIT_ACC_STORE(3, 1) LOWBIT_ACC_STORE(3, 2) LOWBIT_ACC_STORE(3, 3)
#undef LOWBIT_ACC_STORE
}

template <int R, int PF>
void dpass_jc(int jc, const int8_t* const* wr, const int8_t* const* xd, int64_t k0, int64_t k1, __m512i* acc, int64_t dist) {
  switch (jc) {
    case 1: return dpass<R, 1, PF>(wr, xd, k0, k1, acc, dist);
    case 2: return dpass<R, 2, PF>(wr, xd, k0, k1, acc, dist);
    case 3: return dpass<R, 3, PF>(wr, xd, k0, k1, acc, dist);
    default: return dpass<R, 4, PF>(wr, xd, k0, k1, acc, dist);
  }
}

// The first pass over a block prefetches with the run-time setting; later passes do not.
template <int R>
void dpass_any(bool first, int jc, const int8_t* const* wr, const int8_t* const* xd, int64_t k0, int64_t k1, __m512i* acc) {
  const lowbit::Prefetch& p = lowbit::prefetch_setting();
  if (!first) return dpass_jc<R, -1>(jc, wr, xd, k0, k1, acc, 0);
  switch (p.hint) {
    case lowbit::kT1: return dpass_jc<R, lowbit::kT1>(jc, wr, xd, k0, k1, acc, p.distance);
    case lowbit::kT0: return dpass_jc<R, lowbit::kT0>(jc, wr, xd, k0, k1, acc, p.distance);
    default: return dpass_jc<R, lowbit::kNta>(jc, wr, xd, k0, k1, acc, p.distance);
  }
}

constexpr int kMaxVirtual = 8 * kMaxPlanes;  // rows of x (kMaxM in int8.py's _EXT_MAX_M) x planes
constexpr int64_t kBlockK = 1024;             // k per block when the virtual rows take several passes

// Weight rows n0 .. n0 + R against every row of x. The virtual rows (row m, plane p) go 4 at a time over a
// block of k while the block's R weight rows stay in L1 (the first pass streams them from memory); with
// at most 4 virtual rows a block is the whole group.
template <int R>
void dtile(const Args& a, const Digits& dg, int64_t n0) {
  const int P = dg.P;
  const int J = int(a.M) * P;
  const int64_t K = a.K, G = a.G, gs = a.gs;
  const int64_t kb = J <= 4 ? gs : std::min<int64_t>(kBlockK, gs);
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * K;
  const int8_t* xd[kMaxVirtual];
  const int32_t* in[kMaxVirtual];
  for (int j = 0; j < J; ++j) {
    xd[j] = dg.d + int64_t(j) * K;  // virtual row j = m * P + p
    in[j] = dg.init + int64_t(j) * G;
  }
  alignas(64) __m512i acc[R * kMaxVirtual];  // pass jc's block: acc + R * jc, [r * JC + j]
  __m512 tot[R][8];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < a.M; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int jc = 0; jc < J; jc += 4) {
      const int jn = std::min(4, J - jc);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < jn; ++j) acc[R * jc + r * jn + j] = _mm512_maskz_set1_epi32(1, in[jc + j][g]);
    }
    for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += kb) {
      const int64_t k1 = std::min(k0 + kb, (g + 1) * gs);
      for (int jc = 0; jc < J; jc += 4) {
        const int jn = std::min(4, J - jc);
        dpass_any<R>(jc == 0, jn, wr, xd + jc, k0, k1, acc + R * jc);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = a.s[(n0 + r) * a.ss0 + g * a.ss1];
      for (int j = 0; j < J; ++j) {
        const int jc = j / 4 * 4, jn = std::min(4, J - jc);
        const __m512 f = _mm512_cvtepi32_ps(acc[R * jc + r * jn + (j - jc)]);
        tot[r][j / P] = _mm512_fmadd_ps(f, _mm512_set1_ps(std::ldexp(s, -8 * (j % P))), tot[r][j / P]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < a.M; ++m) store_out(a, m * a.N + n0 + r, std::ldexp(_mm512_reduce_add_ps(tot[r][m]), dg.e[m]));
}

template <int R>
void drun(const Args& a, const Digits& dg) {
  const int64_t blocks = a.N / R, tail = a.N % R;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < blocks) dtile<R>(a, dg, i * R);
      else dtile<1>(a, dg, blocks * R + (i - blocks));
    }
  };
  if (a.N * a.K < kSerialBytes) body(0, blocks + tail);
  else lowbit::par_for(0, blocks + tail, 4, body);
}

bool scales_in_range(const Args& a) {
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t g = 0; g < a.G; ++g) {
      const float s = std::fabs(a.s[n * a.ss0 + g * a.ss1]);
      if (!(s == 0.0f || (s >= 0x1p-100f && s <= 0x1p90f))) return false;
    }
  return true;
}

void run_float(const Args& a) {
  if (a.M <= 3) run<4>(a);
  else run<3>(a);
}

void run_digits(const Args& a) {
  thread_local DigitBuf buf;
  const Digits dg = make_digits(a, buf);
  drun<4>(a, dg);
  const int64_t bytes = a.ot == at::kFloat ? 4 : 2;
  for (int64_t m = 0; m < a.M; ++m)
    if (!dg.ok[m]) {  // a NaN or an infinity: this row through the float tile, alone
      Args b = a;
      b.x = a.x + m * a.K;
      b.M = 1;
      b.out = static_cast<char*>(a.out) + m * a.N * bytes;
      run_float(b);
    }
}

void run_all(const Args& a) {
  if (digits_enabled() && a.M <= 8 && a.gs % 64 == 0 && a.gs <= 65536 && scales_in_range(a)) run_digits(a);
  else run_float(a);
}

bool digits_available() { return cpu_vnni(); }
bool digits_enabled() { return cpu_vnni() && g_digits.load(); }
void set_digits(bool on) { g_digits.store(on); }

}  // namespace
