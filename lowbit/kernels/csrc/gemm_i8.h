// gemm_i8: exact int8 x int8 -> int32 GEMM for M above the small-M mm_i8 (AVX-512 VNNI), included by
// int8_act.cpp's AVX-512 build. c (M, N) = a (M, K) @ b (N, K).T, the contract of torch._int_mm.
//
// The weight stays in its canonical (N, K) row-major layout in memory (nothing is kept between calls):
// each call packs one panel of 64 weight rows by up to kKC columns at a time into a per-thread
// buffer, and the panel, which stays in L2, serves every row of a. In the panel, k-quad q of the 64
// rows is 256 contiguous bytes: zmm v holds rows 16v..16v+15, lane l the four bytes
// b[16v + l, 4q .. 4q + 3] + 128 (as unsigned: b ^ 0x80). The microkernel keeps a 6 x 64 tile of
// int32 accumulators in 24 zmm; per k-quad it loads the panel's 4 vectors once and, per row of a,
// broadcasts that row's 4 bytes (signed) into 4 vpdpbusd (unsigned panel byte x signed a byte).
// So each accumulator sums (b + 128) a = b a + 128 a over its k: it starts at -128 * sum_k a[m, k],
// which makes the sum exactly a @ b.T, in int32 arithmetic mod 2^32 like torch._int_mm's (vpdpbusd
// adds four products of at most 255 * 128 without saturating). Packing is a 16 x 16 transpose of
// 32-bit words per 16 rows x 64 bytes (64 shuffles per KiB): at M = 256 the panel is read 43 times
// per packing.
//
// A K that is not a multiple of 4 reads a from a copy padded with zero bytes (0 x anything = 0); the
// panel's bytes past K are packed as b = 0. Columns past N in the last panel are packed as b = 0 and
// never stored.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx.h"
#include "panel.h"
#include "parallel.h"

namespace gemm_i8 {

constexpr int kMR = 6;          // rows of a per microkernel call
constexpr int64_t kNR = 64;     // weight rows (output columns) per panel: 4 zmm
constexpr int64_t kKC = 4096;   // columns of k per packed panel (a multiple of 64): 64 x 4096 = 256 KiB
constexpr int64_t kQuadBytes = kNR * 4;

#define LOWBIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

using lowbit::transpose16;

// Pack b[n0 : n0 + rows, k0 : k0 + kc] (rows <= 64) into dst: quads = ceil(kc / 4) k-quads of 256 bytes,
// dst holding at least ceil(kc / 64) * 16 quads (the last 64-byte chunk is stored whole).
LOWBIT_VNNI inline void pack_panel(const int8_t* b, int64_t K, int64_t n0, int64_t rows, int64_t k0, int64_t kc,
                                   uint8_t* dst) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  // 16 rows at a time along the whole block: 16 read streams instead of 64 (M=16: 13.8 -> 9.8 ms for 8 x
  // 4096^2, scratch/ab_head_csrc.py)
  for (int v = 0; v < 4; ++v) {
    for (int64_t k = 0; k < kc; k += 64) {
      const int64_t left = kc - k;
      const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      uint8_t* out = dst + (k / 4) * kQuadBytes;
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 16 * v + i;
        r[i] = row < rows ? _mm512_maskz_loadu_epi8(mask, b + (n0 + row) * K + k0 + k) : _mm512_setzero_si512();
        r[i] = _mm512_xor_si512(r[i], flip);
      }
      transpose16(r);
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(out + q * kQuadBytes + v * 64, r[q]);
    }
  }
}

// acc + vpdpbusd(a unsigned, b signed), in place. gcc 12 compiles _mm512_dpbusd_epi32 on this many live
// accumulators into copies and stack spills around every call (3x slower here); the asm's "+v"
// operand keeps each accumulator in its register.
LOWBIT_VNNI inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// c[0:MR, 0:64] (ldc) = (first ? init[m] : c) + sum over `quads` k-quads of panel x a[0:MR] (lda, from
// the block's first column). Stores the first `cols` columns.
#define LB_ACC(i)                                                                                            \
  __m512i c##i##0, c##i##1, c##i##2, c##i##3;                                                                \
  if constexpr (MR > i) {                                                                                    \
    if (first) {                                                                                             \
      c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm512_set1_epi32(init[i]);                                    \
    } else {                                                                                                 \
      c##i##0 = _mm512_maskz_loadu_epi32(m0, c + i * ldc);                                                   \
      c##i##1 = _mm512_maskz_loadu_epi32(m1, c + i * ldc + 16);                                              \
      c##i##2 = _mm512_maskz_loadu_epi32(m2, c + i * ldc + 32);                                              \
      c##i##3 = _mm512_maskz_loadu_epi32(m3, c + i * ldc + 48);                                              \
    }                                                                                                        \
  }
#define LB_ROW(i)                                                                                            \
  if constexpr (MR > i) {                                                                                    \
    const __m512i x = _mm512_set1_epi32(load4(a + i * lda + 4 * q));                                         \
    dpbusd(c##i##0, w0, x);                                                                                    \
    dpbusd(c##i##1, w1, x);                                                                                    \
    dpbusd(c##i##2, w2, x);                                                                                    \
    dpbusd(c##i##3, w3, x);                                                                                    \
  }
#define LB_STORE(i)                                                                                          \
  if constexpr (MR > i) {                                                                                    \
    _mm512_mask_storeu_epi32(c + i * ldc, m0, c##i##0);                                                      \
    _mm512_mask_storeu_epi32(c + i * ldc + 16, m1, c##i##1);                                                 \
    _mm512_mask_storeu_epi32(c + i * ldc + 32, m2, c##i##2);                                                 \
    _mm512_mask_storeu_epi32(c + i * ldc + 48, m3, c##i##3);                                                 \
  }

template <int MR>
LOWBIT_VNNI void micro(const int8_t* a, int64_t lda, const uint8_t* panel, int64_t quads, int32_t* c, int64_t ldc,
                       int64_t cols, bool first, const int32_t* init) {
  static_assert(MR >= 1 && MR <= kMR, "micro: 1 to 6 rows");
  auto lane_mask = [&](int64_t v) -> __mmask16 {
    const int64_t n = cols - 16 * v;
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
  };
  const __mmask16 m0 = lane_mask(0), m1 = lane_mask(1), m2 = lane_mask(2), m3 = lane_mask(3);
  LB_ACC(0) LB_ACC(1) LB_ACC(2) LB_ACC(3) LB_ACC(4) LB_ACC(5)
  for (int64_t q = 0; q < quads; ++q) {
    const uint8_t* p = panel + q * kQuadBytes;
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
    const __m512i w2 = _mm512_loadu_si512(p + 128), w3 = _mm512_loadu_si512(p + 192);
    LB_ROW(0) LB_ROW(1) LB_ROW(2) LB_ROW(3) LB_ROW(4) LB_ROW(5)
  }
  LB_STORE(0) LB_STORE(1) LB_STORE(2) LB_STORE(3) LB_STORE(4) LB_STORE(5)
}
#undef LB_ACC
#undef LB_ROW
#undef LB_STORE

inline void micro_any(int mr, const int8_t* a, int64_t lda, const uint8_t* panel, int64_t quads, int32_t* c,
                      int64_t ldc, int64_t cols, bool first, const int32_t* init) {
  static_assert(kMR == 6, "micro_any dispatches 1..6 rows");
  switch (mr) {
    case 6: return micro<6>(a, lda, panel, quads, c, ldc, cols, first, init);
    case 5: return micro<5>(a, lda, panel, quads, c, ldc, cols, first, init);
    case 4: return micro<4>(a, lda, panel, quads, c, ldc, cols, first, init);
    case 3: return micro<3>(a, lda, panel, quads, c, ldc, cols, first, init);
    case 2: return micro<2>(a, lda, panel, quads, c, ldc, cols, first, init);
    default: return micro<1>(a, lda, panel, quads, c, ldc, cols, first, init);
  }
}

// sum_k r[k] (mod 2^32): vpdpbusd of ones (unsigned) by r (signed).
LOWBIT_VNNI inline int32_t row_sum(const int8_t* r, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mask, r + k));
  }
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, acc);
  uint32_t s = 0;
  for (uint32_t v : lanes) s += v;
  return int32_t(s);
}

// The per-thread panel buffer, kept between calls (a fresh 256 KiB block per call paid page faults).
inline uint8_t* panel_buffer() {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < size_t(kKC / 4 * kQuadBytes)) buf.resize(kKC / 4 * kQuadBytes);
  return buf.data();
}

using lowbit::m_splits;

constexpr int64_t kAmxMR = 32;  // rows of a per AMX block: 2 tiles of 16

#define LOWBIT_AMX_I8 __attribute__((target("avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))

// On a CPU with AMX (amx.h): 32 rows of a (lda; every row readable for 4 * quads columns, zero past K) by
// the panel's `quads` k-quads (a multiple of 16; the panel is the tiles' B layout, each byte b + 128) into
// c, a running int32 tile of 32 x 64 (ldc 64): zeroed when `first`, else added to. tdpbsud multiplies a
// signed byte of a by an unsigned one of the panel and adds 4 products to a lane, exactly (mod 2^32), so
// c gets sum_k a (b + 128); finish_amx adds -128 sum_k a per row. The calling thread configured the tiles.
LOWBIT_AMX_I8 inline void amx_block(const int8_t* a, int64_t lda, const uint8_t* panel, int64_t quads, int32_t* c,
                                    bool first, int64_t cols) {
  for (int h = 0; h < 2; ++h) {
    if (h == 1 && cols <= 32) break;  // the half past the last panel's columns: never stored
    int32_t* ch = c + 32 * h;
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, ch, kNR * 4);
      _tile_loadd(1, ch + 16, kNR * 4);
      _tile_loadd(2, ch + 16 * kNR, kNR * 4);
      _tile_loadd(3, ch + 16 * kNR + 16, kNR * 4);
    }
    const uint8_t* ph = panel + 128 * h;
    // each tile loaded right after its last use in the step before (gemm_bf16.h's amx_block)
    _tile_loadd(4, a, lda);
    _tile_loadd(6, ph, kQuadBytes);
    for (int64_t q = 0; q < quads; q += 16) {
      const bool more = q + 16 < quads;
      _tile_loadd(7, ph + q * kQuadBytes + 64, kQuadBytes);
      _tile_dpbsud(0, 4, 6);
      _tile_loadd(5, a + 16 * lda + 4 * q, lda);
      _tile_dpbsud(1, 4, 7);
      if (more) _tile_loadd(4, a + 4 * (q + 16), lda);
      _tile_dpbsud(2, 5, 6);
      if (more) _tile_loadd(6, ph + (q + 16) * kQuadBytes, kQuadBytes);
      _tile_dpbsud(3, 5, 7);
    }
    _tile_stored(0, ch, kNR * 4);
    _tile_stored(1, ch + 16, kNR * 4);
    _tile_stored(2, ch + 16 * kNR, kNR * 4);
    _tile_stored(3, ch + 16 * kNR + 16, kNR * 4);
  }
}

// Rows 0 .. rows of an AMX block's finished int32 tile (ldc 64) plus init[i] (mod 2^32).
LOWBIT_VNNI inline void finish_amx(int32_t* c, int64_t rows, const int32_t* init) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m512i v = _mm512_set1_epi32(init[i]);
    for (int j = 0; j < 4; ++j) {
      int32_t* p = c + i * kNR + 16 * j;
      _mm512_store_si512(p, _mm512_add_epi32(_mm512_load_si512(p), v));
    }
  }
}

// ---- AMX with the weight as it is in memory (K a multiple of 64) ----------------------------------------
//
// The tiles multiply A (16 rows of 64 bytes, any row stride) by B (VNNI: row q holds 16 columns' 4 bytes of
// k-quad q). So the weight's canonical rows, 16 at a time, are an A tile read straight from memory, with no
// per-call packing (which took ~1.1 ms of a 4096^2 call at every M, the whole cost at M <= 16), and x is the
// B operand, packed once per call: per block of 16 rows of x, k-quad q is 64 bytes (row i's 4 bytes at 4i).
// Both signed: tdpbssd, exact, no correction. The result tiles hold out.T: (32 weight rows) x (32 rows of x),
// turned round in L1 (transpose16) before the epilogue.
constexpr int64_t kDirectNR = 32;  // weight rows per block: 2 A tiles

// x (M, K; K a multiple of 64) as B tiles: Mp / 16 blocks of K / 4 quads x 64 bytes, rows past M zero.
LOWBIT_VNNI inline void pack_x_vnni(const int8_t* a, int64_t M, int64_t K, int64_t Mp, int8_t* dst) {
  const int64_t quads = K / 4;
  for (int64_t mb = 0; mb < Mp / 16; ++mb) {
    for (int64_t k = 0; k < K; k += 64) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = mb * 16 + i;
        r[i] = m < M ? _mm512_loadu_si512(a + m * K + k) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[q] lane i = row i's bytes 4q .. 4q + 3 of this 64-byte chunk
      int8_t* out = dst + (mb * quads + k / 4) * 64;
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(out + q * 64, r[q]);
    }
  }
}

// 32 weight rows w (ldw bytes apart) by 32 rows of x (B tiles bx0, bx1: quads of 64 bytes) over K / 64
// steps into t (int32, [32 weight rows][32 rows of x], ld 32). The calling thread configured the tiles.
// `two`: 32 rows of x; else at most 16 (bx1 unused, t's columns 16..31 left as they are).
LOWBIT_AMX_I8 inline void amx_direct_block(const int8_t* w, int64_t ldw, const int8_t* bx0, const int8_t* bx1,
                                           int64_t K, bool two, int32_t* t) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  // each tile loaded right after its last use in the step before (gemm_bf16.h's amx_block)
  _tile_loadd(4, w, ldw);
  _tile_loadd(6, bx0, 64);
  if (two) {
    for (int64_t k = 0; k < K; k += 64) {
      const bool more = k + 64 < K;
      _tile_loadd(7, bx1 + k * 16, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_loadd(5, w + 16 * ldw + k, ldw);
      _tile_dpbssd(1, 4, 7);
      if (more) _tile_loadd(4, w + k + 64, ldw);
      _tile_dpbssd(2, 5, 6);
      if (more) _tile_loadd(6, bx0 + (k + 64) * 16, 64);
      _tile_dpbssd(3, 5, 7);
    }
  } else {
    for (int64_t k = 0; k < K; k += 64) {
      const bool more = k + 64 < K;
      _tile_loadd(5, w + 16 * ldw + k, ldw);
      _tile_dpbssd(0, 4, 6);
      if (more) _tile_loadd(4, w + k + 64, ldw);
      _tile_dpbssd(2, 5, 6);
      if (more) _tile_loadd(6, bx0 + (k + 64) * 16, 64);
    }
  }
  _tile_stored(0, t, 128);
  _tile_stored(1, t + 16, 128);
  _tile_stored(2, t + 16 * 32, 128);
  _tile_stored(3, t + 16 * 32 + 16, 128);
}

// t [32 weight rows][32 rows of x] (ld 32) -> o [32 rows of x][32 weight rows] (ld 32).
LOWBIT_VNNI inline void turn_round(const int32_t* t, int32_t* o) {
  for (int bi = 0; bi < 2; ++bi) {
    for (int bj = 0; bj < 2; ++bj) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(t + (16 * bi + i) * 32 + 16 * bj);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(o + (16 * bj + i) * 32 + 16 * bi, r[i]);
    }
  }
}

// No epilogue: gemm's int32 result is the output.
struct NoEpilogue {
  void operator()(const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t) const {}
};

// c (M, N) = a (M, K) @ b (N, K).T exactly; a and b contiguous int8, c int32 contiguous. Call only on a
// CPU with avx512_vnni. With an epilogue and c == nullptr (for K <= kKC, one block of K, or any K on AMX), each
// tile's int32 sums go to a per-thread 6 x 64 buffer instead and epi(tile, ld, m, rows, n0, cols) turns
// them into the output while they are in L1: no (M, N) int32 array at all.
template <typename Epi = NoEpilogue>
inline void gemm(const int8_t* a_in, const int8_t* b, int32_t* c, int64_t M, int64_t N, int64_t K,
                 const Epi& epi = Epi()) {
  // AMX where the CPU has it, for every row (as gemm_bf16: one way of summing per host)
  const bool amx = lowbit::amx::usable_int8();
  TORCH_CHECK(c != nullptr || K <= kKC || amx, "gemm_i8: an output-less call needs K <= ", kKC, " (any K on AMX)");
  if (amx && K % 64 == 0 && K > 0) {  // the weight read as it is (above)
    const int64_t Mp = (M + 31) / 32 * 32;
    struct XTiles;
    int8_t* bx = lowbit::amx::kept<XTiles, int8_t>(size_t(Mp * K));  // every byte written by pack_x_vnni
    pack_x_vnni(a_in, M, K, Mp, bx);
    // the last block of fewer than 32 weight rows: a zero padded copy (tiles read whole rows)
    const int64_t full = N / kDirectNR * kDirectNR;
    struct WTail;
    int8_t* wtail = lowbit::amx::kept<WTail, int8_t>(size_t(kDirectNR * K));
    if (full < N) {
      std::memcpy(wtail, b + full * K, size_t((N - full) * K));
      std::memset(wtail + (N - full) * K, 0, size_t((kDirectNR - (N - full)) * K));
    }
    const int64_t blocks = (N + kDirectNR - 1) / kDirectNR;
    lowbit::par_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      lowbit::amx::configure();
      alignas(64) int32_t t[32 * 32], o[32 * 32];
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t n0 = nb * kDirectNR, cols = std::min(kDirectNR, N - n0);
        const int8_t* w = n0 < full ? b + n0 * K : wtail;
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
          const int64_t rows = std::min<int64_t>(32, M - m0);
          const int8_t* bx0 = bx + (m0 / 16) * K * 16;
          amx_direct_block(w, K, bx0, bx0 + K * 16, K, rows > 16, t);
          turn_round(t, o);
          if (c == nullptr) {
            epi(o, 32, m0, rows, n0, cols);
          } else {
            for (int64_t i = 0; i < rows; ++i) std::memcpy(c + (m0 + i) * N + n0, o + i * 32, size_t(cols) * 4);
          }
        }
      }
      lowbit::amx::release();
    });
    return;
  }
  const int64_t unit = amx ? kAmxMR : kMR;
  // a, padded where needed (columns to a multiple of 4, or of 64 and rows to a multiple of 32 for the tiles)
  // with zero bytes, and each row's -128 * sum_k a (mod 2^32)
  const int64_t lda = amx ? (K + 63) / 64 * 64 : (K + 3) / 4 * 4;
  const int64_t Mp = (M + unit - 1) / unit * unit;
  std::vector<int8_t> padded;
  const int8_t* a = a_in;
  if (lda != K || (amx && Mp != M)) {
    padded.assign(size_t(Mp * lda), 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(padded.data() + m * lda, a_in + m * K, size_t(K));
    a = padded.data();
  }
  std::vector<int32_t> init(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) init[size_t(m)] = int32_t(uint32_t(row_sum(a_in + m * K, K)) * uint32_t(-128));
  const int64_t panels = (N + kNR - 1) / kNR;
  const int64_t tiles = Mp / unit;
  const int64_t splits = m_splits(panels, tiles, amx ? 4.0 : 1.0);
  const int64_t per_split = (tiles + splits - 1) / splits;
  lowbit::par_for(0, panels * splits, 1, [&](int64_t begin, int64_t end) {
    uint8_t* panel = panel_buffer();
    thread_local std::vector<int32_t> run_keep;
    if (amx) lowbit::amx::configure();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / splits, s = item % splits;
      const int64_t n0 = p * kNR, cols = std::min(kNR, N - n0);
      const int64_t t0 = s * per_split, t1 = std::min(tiles, t0 + per_split);
      if (t0 >= t1) continue;
      int32_t* running = nullptr;
      if (amx) {  // one 32 x 64 int32 tile per block of the run, 64-byte aligned
        run_keep.resize(size_t((t1 - t0) * kAmxMR * kNR + 16));
        running = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(run_keep.data()) + 63) & ~uintptr_t(63));
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0), quads = (kc + 3) / 4;
        const bool last = k0 + kc >= K;
        pack_panel(b, K, n0, cols, k0, kc, panel);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m = t * unit, mr = std::min<int64_t>(unit, M - m);
          if (amx) {
            int32_t* ct = running + (t - t0) * kAmxMR * kNR;
            amx_block(a + m * lda + k0, lda, panel, (quads + 15) / 16 * 16, ct, k0 == 0, cols);
            if (!last) continue;
            finish_amx(ct, mr, init.data() + m);
            if (c == nullptr) {
              epi(ct, kNR, m, mr, n0, cols);
            } else {
              for (int64_t i = 0; i < mr; ++i) std::memcpy(c + (m + i) * N + n0, ct + i * kNR, size_t(cols) * 4);
            }
          } else if (c == nullptr) {
            alignas(64) int32_t tile[kMR * kNR];
            micro_any(int(mr), a + m * lda + k0, lda, panel, quads, tile, kNR, cols, true, init.data() + m);
            epi(tile, kNR, m, mr, n0, cols);
          } else {
            micro_any(int(mr), a + m * lda + k0, lda, panel, quads, c + m * N + n0, N, cols, k0 == 0, init.data() + m);
          }
        }
      }
    }
    if (amx) lowbit::amx::release();
  });
}

// The int8 compute peak: vpdpbusd on registers alone, 24 independent accumulators (each instruction
// 16 lanes x 4 multiply-adds = 128 integer ops), `iters` rounds on each of `threads` threads at once.
// Returns the seconds the slowest thread took. What benchmarks/roofline.py holds the int8 kernels to.
LOWBIT_VNNI inline void vnni_spin(int64_t iters) {
  asm volatile(
      "1:\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm0\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm1\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm2\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm3\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm4\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm5\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm6\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm7\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm8\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm9\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm10\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm11\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm12\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm13\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm14\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm15\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm16\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm17\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm18\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm19\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm20\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm21\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm22\n"
      "vpdpbusd %%zmm30, %%zmm31, %%zmm23\n"
      "dec %0\n"
      "jnz 1b\n"
      : "+r"(iters)
      :
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18", "zmm19", "zmm20", "zmm21", "zmm22", "zmm23", "cc");
}

#undef LOWBIT_VNNI
#undef LOWBIT_AMX_I8

}  // namespace gemm_i8
