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

// The contract: int8_int4_entry.h.
void run_kernel(const int8_t* x, const float* sxp, const int32_t* zp, int64_t M, int64_t K, const uint8_t* q, int64_t N,
                const float* s, int64_t G, const void* bias, at::ScalarType bias_t, void* out, at::ScalarType out_t,
                Scratch& ws) {
  if (M == 0 || N == 0) return;
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
