// Int8 dynamic activations x int4 weights ("8da4w") with integer arithmetic, for small M.
// AVX2 + FMA + F16C: the build of kernel "int8_int4" for CPUs without AVX-512 VNNI (the other one is
// int8_int4.cpp); the entry points and their checks are in int8_int4_entry.h.
//
//   out[m, n] = s_x[m] * sum_g s_w[n, g] * I[m, n, g]  (+ bias[n])
//   I[m, n, g] = sum_{k in group g} (xq[m, k] - zp_x[m]) * w[n, k]      exact, int32
//
// xq int8 (M, K), s_x float32 and zp_x int32 per row, as the primitives made them; the weight in
// lowbit's canonical int4 layout: qdata uint8 (N, K/2), element 2j in the low nibble of byte j, int4
// two's complement in [-8, 7] (no zero point); scale float32 (N, G), group size gs = K / G a
// multiple of 32, at most 256.
//
// Inner loop: vpmaddubsw of the unsigned nibbles u = w + 8 in [0, 15] by the signed int8 xq, so no
// product needs more than 8 bits per operand. A 16-byte block of qdata (32 weights) becomes one
// 256-bit vector: the 16 low nibbles (even k) in lane 0, the 16 high nibbles (odd k) in lane 1; xq
// is permuted once per call into the same order. Each maddubs pair sum is at most 2 * 15 * 128 =
// 3840 in magnitude, so the int16 sums of a group's (at most 8) blocks stay below 32768: no
// saturation, and one vpmaddwd per group widens them to int32. With P = sum u * xq, SU = sum u and
// SX = sum xq over the group, the exact group sum is
//   I = P - zp * SU - 8 * (SX - zp * gs)
// (SX per row and group once per call; SU per weight group from vpsadbw of the unpacked nibbles).
// Eight groups at a time are reduced to one int32 vector (vphaddd tree), corrected in int32,
// converted to float32 exactly (|I| <= 255 * 8 * 256 < 2^24) and multiplied by their 8 scales with
// one FMA into a float32 accumulator per row of x; one horizontal sum and the s_x multiply at the
// end. The packed weight is streamed once (parallel over N); each block is unpacked once into an
// L1 buffer and used for every row of x. A K that is not a multiple of 8 groups is padded with zero
// groups (xq = 0, scale 0) whose lanes are set to 0 without being computed, so they add exactly
// nothing (K = 576 at g32: 18 groups; skipping the 6 padded ones took 1.06-1.20x less CPU time on
// SmolLM2's K = 576 layers at M = 1, 1 thread, /tmp A/B of the two builds in one process).
//
// M <= 4 with a group of 32 or a multiple of 64 takes rows_small instead (below): the weight unpacked in
// registers and used from there, the activation's zero point taken out inside the int16 sums.
//
// Entry points: int8_int4_linear (xq, its scale and zero point given), quantize_act_asym, and
// int8_int4_dynamic_linear (the two in one call: x quantized into thread-local buffers, then the
// same kernel; what an eager decode step calls).
//
// A row of x whose scale is not finite (NaN or inf in the input) gives NaN outputs, as the float
// reference does.
#include "int8_int4_entry.h"
#include "parallel.h"

namespace {

using lowbit::par_for;

// kMaxGroup (int8_int4_entry.h) = 256: the int16 partial sums of a group hold 8 blocks x 3840 = 30720 < 32768
constexpr int64_t kSuper = 8;  // groups reduced together (one int32 vector)

// 32 weights from 16 packed bytes as unsigned u = w + 8 in [0, 15]: lane 0 = low nibbles (elements
// 0, 2, .., 30), lane 1 = high nibbles (elements 1, 3, .., 31).
inline __m256i unpack32(const uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sh = _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_xor_si256(_mm256_and_si256(sh, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(0x08));
}

// Lane i of the result = horizontal sum of the int32 lanes of v[i].
inline __m256i hsum8(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(v[0], v[1]);
  const __m256i b = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i c = _mm256_hadd_epi32(v[4], v[5]);
  const __m256i d = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i ab = _mm256_hadd_epi32(a, b);  // v0..v3: low-lane sums | high-lane sums
  const __m256i cd = _mm256_hadd_epi32(c, d);
  return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Problem {
  int64_t M, N, K, G, gs, Gp, Kp, rb;
  const int8_t* xp;     // (Gp / 8, M, 8 * gs): xq permuted per 32-block, zero-padded to Gp groups
  const int32_t* sxc;   // (Gp / 8, M, 8): 8 * (SX - zp * gs), 0 in padded groups
  const int32_t* zp;    // (M,)
  const float* sx;      // (M,)
  const uint8_t* q;     // (N, K/2)
  const float* s;       // (N, G)
  const void* bias;     // (N,) or nullptr
  at::ScalarType bias_t;
  void* out;            // (M, N)
  at::ScalarType out_t;
};

// Rows [n0, n1) of W against every row of x; BPG = blocks of 32 weights per group.
template <int BPG>
void rows(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t gs = BPG * kBlock;
  const int64_t M = p.M, G = p.G;
  alignas(32) uint8_t ubuf[kSuper * gs];
  alignas(32) float spad[kSuper];
  std::vector<float> acc(M * 8);
  const __m256i ones16 = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = p.q + n * p.rb;
    const float* sr = p.s + n * G;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g0 = 0; g0 < p.Gp; g0 += kSuper) {
      const int64_t ng = std::min<int64_t>(kSuper, G - g0);
      // unpack 8 groups once; per group SU via vpsadbw of the byte sums (at most 8 * 15 = 120 per byte)
      __m256i su[kSuper];
      for (int64_t gi = 0; gi < kSuper; ++gi) {
        if (gi >= ng) {  // a padded group: its lanes are 0 (its ubuf bytes are never read)
          su[gi] = zero;
          continue;
        }
        const uint8_t* src = qr + (g0 + gi) * gs / 2;
        lowbit::prefetch_stream(src);
        if (BPG > 2) lowbit::prefetch_stream(src + 64);
        __m256i t = zero;
        for (int b = 0; b < BPG; ++b) {
          const __m256i u = unpack32(src + b * 16);
          _mm256_store_si256(reinterpret_cast<__m256i*>(ubuf + gi * gs + b * kBlock), u);
          t = _mm256_add_epi8(t, u);
        }
        su[gi] = _mm256_sad_epu8(t, zero);  // 4 x 64-bit sums < 2^16: the hsum8 tree reads them as int32
      }
      const __m256i SU = hsum8(su);
      __m256 sv;
      if (ng == kSuper) {
        sv = _mm256_loadu_ps(sr + g0);
      } else {
        for (int64_t gi = 0; gi < kSuper; ++gi) spad[gi] = gi < ng ? sr[g0 + gi] : 0.f;
        sv = _mm256_load_ps(spad);
      }
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = p.xp + ((g0 / kSuper) * M + m) * (kSuper * gs);
        auto group_sum = [&](int gi) {
          __m256i a = zero;
          for (int b = 0; b < BPG; ++b) {
            const int64_t o = gi * gs + b * kBlock;
            const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(ubuf + o));
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + o))));
          }
          return _mm256_madd_epi16(a, ones16);
        };
        __m256i v[kSuper];
        if (ng == kSuper) {
          for (int gi = 0; gi < kSuper; ++gi) v[gi] = group_sum(gi);
        } else {  // the last, partial block of groups: the padded ones sum to 0 without being computed
          for (int gi = 0; gi < kSuper; ++gi) v[gi] = gi < ng ? group_sum(gi) : zero;
        }
        const __m256i P = hsum8(v);
        const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.sxc + ((g0 / kSuper) * M + m) * kSuper));
        const __m256i I = _mm256_sub_epi32(_mm256_sub_epi32(P, _mm256_mullo_epi32(_mm256_set1_epi32(p.zp[m]), SU)), corr);
        float* am = acc.data() + m * 8;
        _mm256_storeu_ps(am, _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), sv, _mm256_loadu_ps(am)));
      }
    }
    const float b = p.bias ? load_float(p.bias, p.bias_t, n) : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float total = hsum_ps(_mm256_loadu_ps(acc.data() + m * 8));
      const float v = std::isfinite(p.sx[m]) ? p.sx[m] * total + b : std::numeric_limits<float>::quiet_NaN();
      store_float(p.out, p.out_t, m * p.N + n, v);
    }
  }
}

// ---- small M: the weight unpacked in registers, no L1 buffer ----------------------------------
//
// For M <= kSmallM and a group size of 32 or a multiple of 64 each 32-byte chunk of a row of qdata (64 weights) is XORed with 0x88 (u = w + 8 in
// both nibbles at once) and split into L = its low nibbles (elements 0, 2, .., 62) and H = its high
// nibbles (1, 3, .., 63), used straight from registers by every row of x. xq is laid out once per
// call to match (per chunk and row: the 32 even elements, then the 32 odd ones). The activation's
// zero point is taken out inside the int16 sums: maddubs(L, x_even) + maddubs(H, x_odd) -
// maddubs(L + H, zp) = sum of u * (xq - zp) over 4 elements, at most 4 * 15 * 255 = 15300 in
// magnitude (no int16 saturation; each maddubs pair is at most 2 * 30 * 128); vpmaddwd by ones then
// gives int32 sums of 8 consecutive elements. Per group (g >= 64: summed over its chunks; g = 32: a
// chunk's two 128-bit halves are two groups) the exact int32 correction -8 * (SX - zp * gs) is
// subtracted in lane 0 (and lane 4), the lanes converted to float32 exactly and multiplied by the
// group's scale with one FMA into a float32 accumulator per row of x. Per 64 weights at M = 1 that is
// 11 vector instructions plus 4 per group against the buffered path's 31 (g32): no store/load of
// the unpacked nibbles, no vpsadbw weight sums, no reduction tree.
constexpr int64_t kSmallM = 4;
constexpr int64_t kChunk = 64;  // weights per 32 packed bytes

// u = w + 8 of 64 weights: L = elements 0, 2, .., 62; H = 1, 3, .., 63. `half`: only 16 bytes are
// read (the last 32 weights of a row whose K is an odd multiple of 32); the rest is u = 0.
template <bool half>
inline void unpack64(const uint8_t* p, __m256i& L, __m256i& H) {
  const __m256i flip = _mm256_set1_epi8(char(0x88)), lo = _mm256_set1_epi8(0x0F);
  __m256i b;
  if constexpr (half)
    b = _mm256_inserti128_si256(flip, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), 0);
  else
    b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  b = _mm256_xor_si256(b, flip);
  L = _mm256_and_si256(b, lo);
  H = _mm256_and_si256(_mm256_srli_epi16(b, 4), lo);
}

// int32 lane i = sum over elements 8i .. 8i + 7 of the chunk of u * (xq - zp); xs = the chunk's 32 even
// then 32 odd xq of one row, LH = L + H, zpv = zp in every byte.
inline __m256i dot64(__m256i L, __m256i H, __m256i LH, const int8_t* xs, __m256i zpv, __m256i ones16) {
  const __m256i e = _mm256_maddubs_epi16(L, _mm256_load_si256(reinterpret_cast<const __m256i*>(xs)));
  const __m256i o = _mm256_maddubs_epi16(H, _mm256_load_si256(reinterpret_cast<const __m256i*>(xs + 32)));
  return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_add_epi16(e, o), _mm256_maddubs_epi16(LH, zpv)), ones16);
}

struct SmallProblem {
  int64_t M, N, K, G, gs, rb;
  const int8_t* xs;     // (chunks, M, 64), 32-byte aligned
  const int32_t* corr;  // 8 * (SX - zp * gs) per group, subtracted: g = 32 (chunks, M, 8) lanes 0, 4; else (G, M, 8) lane 0
  const int32_t* zp;
  const float* sx;
  const uint8_t* q;
  const float* s;
  const void* bias;
  at::ScalarType bias_t;
  void* out;
  at::ScalarType out_t;
};

// CPG: chunks per group (a group of 32: 0).
template <int MR, int CPG>
void rows_small(const SmallProblem& p, int64_t n0, int64_t n1) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256i zpv[MR];
  for (int m = 0; m < MR; ++m) zpv[m] = _mm256_set1_epi8(static_cast<char>(p.zp[m]));
  const int64_t full = p.K / kChunk;  // whole chunks; g = 32 may leave a half one
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = p.q + n * p.rb;
    const float* sr = p.s + n * p.G;
    __m256 facc[MR];
    for (int m = 0; m < MR; ++m) facc[m] = _mm256_setzero_ps();
    if constexpr (CPG == 0) {
      auto chunk = [&](int64_t c, auto half_tag) {
        constexpr bool half = decltype(half_tag)::value;
        if ((c & 1) == 0) lowbit::prefetch_stream(qr + c * 32);
        __m256i L, H;
        unpack64<half>(qr + c * 32, L, H);
        const __m256i LH = _mm256_add_epi8(L, H);
        __m256 sv;  // the two groups' scales, 4 lanes each
        if constexpr (half)
          sv = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_set1_ps(sr[2 * c]), 0);
        else
          sv = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_castpd128_pd256(_mm_load_sd(reinterpret_cast<const double*>(sr + 2 * c)))), pair);
        for (int m = 0; m < MR; ++m) {
          const int64_t u = c * p.M + m;
          const __m256i v = _mm256_sub_epi32(dot64(L, H, LH, p.xs + u * kChunk, zpv[m], ones16),
                                             _mm256_load_si256(reinterpret_cast<const __m256i*>(p.corr + u * 8)));
          facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sv, facc[m]);
        }
      };
      for (int64_t c = 0; c < full; ++c) chunk(c, std::false_type{});
      if (full * kChunk < p.K) chunk(full, std::true_type{});
    } else {
      for (int64_t g = 0; g < p.G; ++g) {
        __m256i acc[MR];
        for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
        for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
          if ((c & 1) == 0) lowbit::prefetch_stream(qr + c * 32);
          __m256i L, H;
          unpack64<false>(qr + c * 32, L, H);
          const __m256i LH = _mm256_add_epi8(L, H);
          for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_epi32(acc[m], dot64(L, H, LH, p.xs + (c * p.M + m) * kChunk, zpv[m], ones16));
        }
        const __m256 sv = _mm256_broadcast_ss(sr + g);
        for (int m = 0; m < MR; ++m) {
          const __m256i v = _mm256_sub_epi32(acc[m], _mm256_load_si256(reinterpret_cast<const __m256i*>(p.corr + (g * p.M + m) * 8)));
          facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sv, facc[m]);
        }
      }
    }
    const float b = p.bias ? load_float(p.bias, p.bias_t, n) : 0.f;
    for (int m = 0; m < MR; ++m) {
      const float total = hsum_ps(facc[m]);
      const float v = std::isfinite(p.sx[m]) ? p.sx[m] * total + b : std::numeric_limits<float>::quiet_NaN();
      store_float(p.out, p.out_t, m * p.N + n, v);
    }
  }
}

template <int MR>
void run_small_m(const SmallProblem& p) {
  auto run = [&](auto cpg) { par_for(0, p.N, 16, [&](int64_t b, int64_t e) { rows_small<MR, decltype(cpg)::value>(p, b, e); }); };
  switch (p.gs / kChunk) {  // 32 or a multiple of 64 up to kMaxGroup = 256
    case 0: run(std::integral_constant<int, 0>{}); break;
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    default: run(std::integral_constant<int, 4>{}); break;
  }
}

// xq laid out for rows_small and the corrections; then the rows.
void run_small(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
               const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
               Scratch& ws) {
  const int64_t gs = K / G, chunks = (K + kChunk - 1) / kChunk;
  const bool g32 = gs == kBlock;
  const int64_t units = g32 ? chunks : G;
  // 32-byte alignment of the aligned loads: the vectors' storage is over-allocated and offset
  ws.xp.assign(chunks * M * kChunk + 32, 0);
  ws.sxc.assign(units * M * 8 + 8, 0);
  int8_t* xs = ws.xp.data() + ((32 - reinterpret_cast<uintptr_t>(ws.xp.data()) % 32) % 32);
  int32_t* corr = ws.sxc.data() + ((32 - reinterpret_cast<uintptr_t>(ws.sxc.data()) % 32) % 32) / 4;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = x + m * K;
    for (int64_t c = 0; c < chunks; ++c) {
      int8_t* dst = xs + (c * M + m) * kChunk;
      for (int64_t j = 0; j < kChunk / 2 && c * kChunk + 2 * j < K; ++j) {
        dst[j] = xr[c * kChunk + 2 * j];
        dst[kChunk / 2 + j] = xr[c * kChunk + 2 * j + 1];
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      int32_t sx = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) sx += xr[k];
      const int32_t c = 8 * (sx - zp[m] * int32_t(gs));
      if (g32) corr[((g / 2) * M + m) * 8 + 4 * (g % 2)] = c;
      else corr[(g * M + m) * 8] = c;
    }
  }
  SmallProblem p{M, N, K, G, gs, K / 2, xs, corr, zp, sxp, q, s, bias, bias_t, out, out_t};
  switch (M) {
    case 1: run_small_m<1>(p); break;
    case 2: run_small_m<2>(p); break;
    case 3: run_small_m<3>(p); break;
    default: run_small_m<4>(p); break;
  }
}

// The contract: int8_int4_entry.h.
void run_kernel(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
                const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
                Scratch& ws) {
  if (M == 0 || N == 0) return;
  if (M <= kSmallM && (K / G == kBlock || (K / G) % kChunk == 0)) {  // groups of 96, 160, 224: below
    run_small(x, sxp, zp, M, K, q, N, s, G, bias, bias_t, out, out_t, ws);
    return;
  }
  const int64_t gs = K / G;
  // xq permuted per block of 32 (the even elements, then the odd ones) and laid out by super-block
  // of 8 groups, then row: the rows of x one super-block reads are contiguous (rows of x at a
  // 4 KiB stride would share L1 sets). Zero-padded to whole super-blocks. Per row and group
  // 8 * (SX - zp * gs), 0 in the padding, in the same order.
  const int64_t Gp = (G + kSuper - 1) / kSuper * kSuper, Kp = Gp * gs, sb = kSuper * gs;
  ws.xp.assign(M * Kp, 0);
  ws.sxc.assign(M * Gp, 0);
  int8_t* xp = ws.xp.data();
  int32_t* sxc = ws.sxc.data();
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = x + m * K;
    for (int64_t c = 0, blk = 0; c < K; c += sb, ++blk) {  // K is a multiple of 32: whole blocks
      int8_t* dst = xp + (blk * M + m) * sb;
      const int64_t len = std::min(sb, K - c);
      for (int64_t j = 0; j < len; j += kBlock)
        for (int64_t i = 0; i < kBlock / 2; ++i) {
          dst[j + i] = xr[c + j + 2 * i];
          dst[j + kBlock / 2 + i] = xr[c + j + 2 * i + 1];
        }
    }
    for (int64_t g = 0; g < G; ++g) {
      int32_t sx = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) sx += xr[k];
      sxc[((g / kSuper) * M + m) * kSuper + g % kSuper] = 8 * (sx - zp[m] * int32_t(gs));
    }
  }
  Problem p{M, N, K, G, gs, Gp, Kp, K / 2, xp, sxc, zp, sxp, q, s, bias, bias_t, out, out_t};
  auto run = [&](int64_t b, int64_t e) {
    switch (gs / kBlock) {
      case 1: rows<1>(p, b, e); break;
      case 2: rows<2>(p, b, e); break;
      case 3: rows<3>(p, b, e); break;
      case 4: rows<4>(p, b, e); break;
      case 5: rows<5>(p, b, e); break;
      case 6: rows<6>(p, b, e); break;
      case 7: rows<7>(p, b, e); break;
      default: rows<8>(p, b, e); break;
    }
  };
  par_for(0, N, 16, run);
}

}  // namespace
