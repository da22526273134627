# The int4 GEMV (gemv_bf16, g128, M=1) on a weight in cache (2.1 MB) and from DRAM (8 x 4096^2), 1 and 2 threads, beside
# the DRAM probe. Run from the repo root.
import torch, time, statistics as st, sys
sys.path.insert(0,"benchmarks")
from roofline import dram_bandwidth
from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4
e=_ext.load("int4_cpu")
def t(f,n=7):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)
g=128
for th in (1,2):
    torch.set_num_threads(th)
    print("threads",th,"probe",round(dram_bandwidth(th),1))
    for n,layers in ((1024,1),(4096,8)):
        ws=[(pack_int4(torch.randint(-8,8,(n,4096),dtype=torch.int8)), torch.rand(n,4096//g)) for _ in range(layers)]
        x=torch.randn(1,4096,dtype=torch.bfloat16)
        s=t(lambda:[e.gemv_bf16(x,q,sc,None,None) for q,sc in ws])
        b=layers*n*4096/2
        print(f"  {b/1e6:.1f} MB int4: {s*1e3:.3f} ms  {b/s/1e9:.1f} GB/s")
