// Per-instruction throughput on this core: 12 independent chains of one AVX2 instruction (inline asm, so the
// compiler can neither merge nor drop them), reported per cycle at 3.25 GHz (clock_estimate below: a dependent
// scalar add chain runs one add a cycle, so iterations / s is a lower bound on the clock).
// build and run: g++ -O2 -mavx2 -mfma -o /tmp/zp zen2_port_throughput.cpp && /tmp/zp
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#define OP(name, ins) \
 { __m256i c0=_mm256_set1_epi32(1),c1=_mm256_set1_epi32(2),c2=_mm256_set1_epi32(3),c3=_mm256_set1_epi32(4),c4=_mm256_set1_epi32(5),c5=_mm256_set1_epi32(6),c6=_mm256_set1_epi32(7),c7=_mm256_set1_epi32(8),c8=_mm256_set1_epi32(9),c9=_mm256_set1_epi32(10),c10=_mm256_set1_epi32(11),c11=_mm256_set1_epi32(12); \
   __m256i b=_mm256_set1_epi32(0x01020304); long n=20000000; auto t0=std::chrono::steady_clock::now(); \
   for(long i=0;i<n;++i){ asm volatile(ins " %%ymm12, %0, %0\n\t" ins " %%ymm12, %1, %1\n\t" ins " %%ymm12, %2, %2\n\t" ins " %%ymm12, %3, %3\n\t" ins " %%ymm12, %4, %4\n\t" ins " %%ymm12, %5, %5\n\t" ins " %%ymm12, %6, %6\n\t" ins " %%ymm12, %7, %7\n\t" ins " %%ymm12, %8, %8\n\t" ins " %%ymm12, %9, %9\n\t" ins " %%ymm12, %10, %10\n\t" ins " %%ymm12, %11, %11\n\t" \
     : "+x"(c0),"+x"(c1),"+x"(c2),"+x"(c3),"+x"(c4),"+x"(c5),"+x"(c6),"+x"(c7),"+x"(c8),"+x"(c9),"+x"(c10),"+x"(c11) :: "ymm12"); } \
   double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count(); printf("%-12s %.2f per cycle @3.25GHz\n", name, n*12.0/s/3.25e9); }
#define OP1(name, ins) \
 { __m256i c0=_mm256_set1_epi32(1),c1=_mm256_set1_epi32(2),c2=_mm256_set1_epi32(3),c3=_mm256_set1_epi32(4),c4=_mm256_set1_epi32(5),c5=_mm256_set1_epi32(6),c6=_mm256_set1_epi32(7),c7=_mm256_set1_epi32(8),c8=_mm256_set1_epi32(9),c9=_mm256_set1_epi32(10),c10=_mm256_set1_epi32(11),c11=_mm256_set1_epi32(12); \
   long n=20000000; auto t0=std::chrono::steady_clock::now(); \
   for(long i=0;i<n;++i){ asm volatile(ins " %0, %0\n\t" ins " %1, %1\n\t" ins " %2, %2\n\t" ins " %3, %3\n\t" ins " %4, %4\n\t" ins " %5, %5\n\t" ins " %6, %6\n\t" ins " %7, %7\n\t" ins " %8, %8\n\t" ins " %9, %9\n\t" ins " %10, %10\n\t" ins " %11, %11\n\t" \
     : "+x"(c0),"+x"(c1),"+x"(c2),"+x"(c3),"+x"(c4),"+x"(c5),"+x"(c6),"+x"(c7),"+x"(c8),"+x"(c9),"+x"(c10),"+x"(c11)); } \
   double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count(); printf("%-12s %.2f per cycle @3.25GHz\n", name, n*12.0/s/3.25e9); }
static void clock_estimate() {
  long n = 2000000000, x = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) asm volatile("add $1, %0" : "+r"(x));
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  printf("clock >= %.2f GHz (one dependent add per iteration)\n", n / s / 1e9);
}
int main() {
  clock_estimate();
  OP("vpmaddubsw", "vpmaddubsw") OP("vpmaddwd", "vpmaddwd") OP("vfmadd231ps", "vfmadd231ps") OP("vpand", "vpand")
  OP("vpor", "vpor") OP("vpaddd", "vpaddd") OP("vpaddw", "vpaddw") OP("vpshufb", "vpshufb") OP("vaddps", "vaddps")
  OP("vsubps", "vsubps") OP("vmulps", "vmulps") OP("vpsubw", "vpsubw") OP("vpsrlvd", "vpsrlvd") OP("vpsllvd", "vpsllvd")
  OP1("vcvtdq2ps", "vcvtdq2ps") OP1("vcvtps2dq", "vcvtps2dq") OP1("vpsrld4", "vpsrld $4,") OP1("vpslld4", "vpslld $4,")
  OP1("vpsrlw4", "vpsrlw $4,")
}
