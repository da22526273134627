// amx.h: Intel AMX tiles for the AVX-512 builds' GEMMs (gemm_bf16.h, gemm_i8.h), used only where the CPU
// has them and Linux grants this process the tile state.
//
// A CPU with AMX (Sapphire Rapids and later Xeons) multiplies a 16 x 32 bf16 tile by a 32 x 16 one (or
// 16 x 64 by 64 x 16 int8) into a 16 x 16 float32 (int32) tile in one instruction: several times the
// AVX-512 dot products' rate. oneDNN runs torch's bf16 matmul on them, so on such a CPU a GEMM of ours on
// AVX-512 dot products alone is several times slower than bf16 F.linear (measured on a 2-core Xeon guest:
// 1.4 TFLOP/s for F.linear against ~0.2 for our vdpbf16ps GEMM at M = 256).
//
// The B operand of both instructions is "VNNI" packed: row r of the tile holds, for each of its 16 columns
// n, the 2 (bf16) or 4 (int8) consecutive k values 2r.. / 4r.. of column n. The panels gemm_bf16.h and
// gemm_i8.h already pack (k-pair / k-quad p of 64 weight rows: 256 bytes, 16 rows per 64) are that layout:
// the 16 x 64-byte rows at p = p0 .. p0 + 15, offset 64 v, stride 256, are the B tile of rows 16v .. 16v + 15.
// The A operand is x's rows as they are (16 rows of 64 bytes, stride of x's rows).
//
// Linux gives a process the tiles' 8 KiB of state only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM);
// without that, the first tile instruction kills it (SIGILL). `usable_*()` asks once and is false where
// the CPU lacks the feature, the kernel refuses, or `set_enabled(false)` switched the tiles off (tests
// and benchmarks compare both paths).
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace lowbit::amx {

// CPUID leaf 7, sub-leaf 0, EDX: AMX-BF16 22, AMX-TILE 24, AMX-INT8 25.
inline bool cpuid7_edx(int bit) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> bit) & 1u;
}

inline bool granted() {
#ifdef __linux__
  static const bool ok = [] {
    if (!cpuid7_edx(24)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;  // the permission request is Linux's; elsewhere the AVX-512 paths run
#endif
}

inline std::atomic<bool>& enabled() {
  static std::atomic<bool> on{true};
  return on;
}

inline void set_enabled(bool on) { enabled().store(on); }

inline bool usable_bf16() {
  static const bool hw = cpuid7_edx(22) && granted();
  return hw && enabled().load(std::memory_order_relaxed);
}

inline bool usable_int8() {
  static const bool hw = cpuid7_edx(25) && granted();
  return hw && enabled().load(std::memory_order_relaxed);
}

// A per-thread buffer of at least n elements kept between calls (a fresh block over ~128 KiB is new pages from
// glibc: page faults on every call, as gemm_bf16.h's panel buffer notes). Tag: one buffer per use. Contents
// are what the last call left.
template <typename Tag, typename T>
inline T* kept(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Palette 1 with tiles 0..7 all 16 rows x 64 bytes: the 2 x 2 blocking of both GEMMs (C tiles 0-3, A
// tiles 4-5, B tiles 6-7). Loaded per thread before its first tile instruction; `release` afterwards
// returns the state (the kernel then skips saving it on context switches).
struct alignas(64) Config {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) inline void configure() {
  Config cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // gcc 12's _tile_loadconfig does not tell the optimizer it reads cfg: at -O3 it dropped the stores above
  // (ldtilecfg read palette 1 with no rows: the first tile instruction raised SIGILL). An asm operand does.
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

}  // namespace lowbit::amx
