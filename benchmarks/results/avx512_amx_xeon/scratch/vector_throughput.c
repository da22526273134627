#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec a; clock_gettime(CLOCK_MONOTONIC,&a); return a.tv_sec+a.tv_nsec*1e-9;}
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vnni"))) int main(){
  long n=100000000; double t;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
  __m512bh w=(__m512bh)_mm512_set1_epi16(0x3f80), x=(__m512bh)_mm512_set1_epi16(0x3f80);
  t=now();
  for(long i=0;i<n;i++){
    __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a0):"v"(w),"v"(x)); __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a1):"v"(w),"v"(x));
    __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a2):"v"(w),"v"(x)); __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a3):"v"(w),"v"(x));
    __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a4):"v"(w),"v"(x)); __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a5):"v"(w),"v"(x));
    __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a6):"v"(w),"v"(x)); __asm__ volatile("vdpbf16ps %1,%2,%0":"+v"(a7):"v"(w),"v"(x));
  }
  t=now()-t; printf("vdpbf16ps zmm: %.2f cycles each at 3.9 GHz\n", t*3.9e9/(8.0*n));
  __m512i b0=_mm512_setzero_si512(),b1=b0,b2=b0,b3=b0,b4=b0,b5=b0,b6=b0,b7=b0; __m512i u=_mm512_set1_epi8(1);
  t=now();
  for(long i=0;i<n;i++){
    __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b0):"v"(u),"v"(u)); __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b1):"v"(u),"v"(u));
    __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b2):"v"(u),"v"(u)); __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b3):"v"(u),"v"(u));
    __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b4):"v"(u),"v"(u)); __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b5):"v"(u),"v"(u));
    __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b6):"v"(u),"v"(u)); __asm__ volatile("vpdpbusd %1,%2,%0":"+v"(b7):"v"(u),"v"(u));
  }
  t=now()-t; printf("vpdpbusd zmm: %.2f cycles each\n", t*3.9e9/(8.0*n));
  t=now();
  for(long i=0;i<n;i++){
    __asm__ volatile("vfmadd231ps %1,%2,%0":"+v"(a0):"v"(a7),"v"(a6)); __asm__ volatile("vfmadd231ps %1,%2,%0":"+v"(a1):"v"(a7),"v"(a6));
    __asm__ volatile("vfmadd231ps %1,%2,%0":"+v"(a2):"v"(a7),"v"(a6)); __asm__ volatile("vfmadd231ps %1,%2,%0":"+v"(a3):"v"(a7),"v"(a6));
    __asm__ volatile("vfmadd231ps %1,%2,%0":"+v"(a4):"v"(a7),"v"(a6)); __asm__ volatile("vfmadd231ps %1,%2,%0":"+v"(a5):"v"(a7),"v"(a6));
  }
  t=now()-t; printf("vfmadd231ps zmm: %.2f cycles each\n", t*3.9e9/(6.0*n));
  __m512i c0=b0,c1=b1,c2=b2,c3=b3;
  t=now();
  for(long i=0;i<n;i++){
    __asm__ volatile("vpternlogd $0x6a,%1,%2,%0":"+v"(c0):"v"(u),"v"(u)); __asm__ volatile("vpternlogd $0x6a,%1,%2,%0":"+v"(c1):"v"(u),"v"(u));
    __asm__ volatile("vpternlogd $0x6a,%1,%2,%0":"+v"(c2):"v"(u),"v"(u)); __asm__ volatile("vpternlogd $0x6a,%1,%2,%0":"+v"(c3):"v"(u),"v"(u));
  }
  t=now()-t; printf("vpternlogd zmm: %.2f cycles each\n", t*3.9e9/(4.0*n));
  t=now();
  for(long i=0;i<n;i++){
    __asm__ volatile("vpsrlw $4,%0,%0":"+v"(c0)); __asm__ volatile("vpsrlw $4,%0,%0":"+v"(c1));
    __asm__ volatile("vpsrlw $4,%0,%0":"+v"(c2)); __asm__ volatile("vpsrlw $4,%0,%0":"+v"(c3));
  }
  t=now()-t; printf("vpsrlw zmm: %.2f cycles each\n", t*3.9e9/(4.0*n));
  return 0;
}
