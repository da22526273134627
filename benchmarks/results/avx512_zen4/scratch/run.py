import torch, time, sys
from torch.utils.cpp_extension import load
m = load("pf_i8", ["benchmarks/results/avx512_zen4/scratch/pf.cpp"], extra_cflags=["-O3","-mavx512f","-mavx512bw","-mavx512vl","-mavx512dq"], verbose=False)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 1)
n,k = 4096*8, 4096
ws = [torch.randint(-127,127,(n,k),dtype=torch.int8) for _ in range(2)]; s=torch.rand(n,1); x=torch.randn(1,k).bfloat16()
big = torch.ones(256*1024*1024)
cfgs = [(32768,0),(0,-1),(4096,1),(8192,1),(16384,1),(32768,1),(8192,2),(16384,2),(32768,2),(65536,2),(16384,0)]
res = {c:[] for c in cfgs}; probe=[]
for r in range(7):
    s0=time.perf_counter(); big.sum(); probe.append(big.numel()*4/(time.perf_counter()-s0)/1e9)
    for c in cfgs:
        m.set_pf(*c)
        w = ws[r%2]
        t0=time.perf_counter(); m.int8_weight_only_mm(x,w,s); res[c].append(n*k/(time.perf_counter()-t0)/1e9)
import statistics as st
print("threads", torch.get_num_threads(), "probe GB/s", round(st.median(probe),1))
for c,v in res.items(): print(c, round(st.median(v),1))
