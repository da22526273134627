# gemm_i8 (csrc/gemm_i8.h) against torch._int_mm, mm_i8 and bf16 F.linear: medians of 3 interleaved rounds of
# 7-call medians, random operands. Run from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/gemm_i8_vs_int_mm.py
import torch, time, statistics as st
from lowbit.kernels import _ext
ext=_ext.load("int8_act")
torch.manual_seed(0)
print("threads", torch.get_num_threads())
def t(f, n=7):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)*1e3
for (M,N,K) in [(256,4096,4096),(64,4096,4096),(256,576,576),(256,1536,576),(256,576,1536),(256,192,576),(100,576,576),(17,576,576)]:
    a=torch.randint(-128,128,(M,K),dtype=torch.int8); b=torch.randint(-128,128,(N,K),dtype=torch.int8)
    xb=torch.randn(M,K,dtype=torch.bfloat16); wb=torch.randn(N,K,dtype=torch.bfloat16)
    r=[]
    for _ in range(3):
        r.append((t(lambda: ext.gemm_i8(a,b)), t(lambda: torch._int_mm(a,b.t())), t(lambda: torch.nn.functional.linear(xb,wb))))
    g,i,bf=[st.median(x) for x in zip(*r)]
    print(f"{M}x{N}x{K}: gemm_i8 {g:.3f} ms  _int_mm {i:.3f}  bf16 {bf:.3f}  -> ours {bf/g:.2f}x bf16, _int_mm {bf/i:.2f}x; GOP/s ours {2*M*N*K/g/1e6:.0f}")
print("small M, 8 x 4096^2 distinct weights (DRAM)")
ws=[torch.randint(-128,128,(4096,4096),dtype=torch.int8) for _ in range(8)]
for M in [1,2,4,8,12,16,24,32]:
    a=torch.randint(-128,128,(M,4096),dtype=torch.int8)
    r=[]
    for _ in range(3):
        r.append((t(lambda: [ext.gemm_i8(a,w) for w in ws]), t(lambda: [ext.mm_i8(a,w) for w in ws]), t(lambda: [torch._int_mm(a,w.t()) for w in ws]) if M>16 else 0))
    g,i,j=[st.median(x) for x in zip(*r)]
    print(f"M={M}: gemm_i8 {g:.2f} ms  mm_i8 {i:.2f}  _int_mm {j:.2f}")
