# mm_i8 (VNNI GEMV-like, M <= 4 route) against gemm_i8 on AMX (the weight read as it is, x packed as B tiles), 8 x 4096^2, M = 1..32.
# Before the direct AMX path (packed panels), gemm_i8 took 8.5-9.8 ms at every M here (see the commit message of 7956399).
import torch, time
from lowbit.kernels import _ext
torch.set_num_threads(2)
ext=_ext.load("int8_act")
def bench(f, n=21):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
ws=[torch.randint(-128,128,(4096,4096),dtype=torch.int8) for _ in range(8)]
for M in (1,2,3,4,5,6,8,12,16,32):
    a=torch.randint(-128,128,(M,4096),dtype=torch.int8)
    t1=bench(lambda: [ext.mm_i8(a,w) for w in ws]); t2=bench(lambda: [ext.gemm_i8(a,w) for w in ws])
    print(M, "mm_i8 %.2f gemm_i8(amx) %.2f ms (8 x 4096^2)"%(t1,t2))
