# The int4 GEMV (M = 1, 16 x 4096^2 g128 through nn.Linear, 2 threads) under weight-stream prefetch settings (hint 0
# nta, 1 t0, 2 t1; bytes ahead), interleaved, with the DRAM probe in the same rounds. Output: *.txt
import torch, time, statistics, lowbit, copy
from lowbit.kernels import _ext
torch.set_num_threads(2)
e4=_ext.load("int4_cpu")
L=16
m=torch.nn.Sequential(*[torch.nn.Linear(4096,4096,bias=False) for _ in range(L)]).bfloat16()
lowbit.quantize_(m, lowbit.Int4WeightOnlyConfig(group_size=128))
x=torch.randn(1,4096).bfloat16()
t=torch.ones(2**28)
def probe():
    a=time.perf_counter(); t.sum(); return t.nbytes/(time.perf_counter()-a)/1e9
settings=[(2,32768),(2,16384),(2,65536),(1,16384),(1,32768),(1,65536),(0,32768)]
res={k:[] for k in settings}; bw=[]
nbytes=L*(4096*2048+4096*32*2*2)
with torch.inference_mode():
  m(x)
  for r in range(7):
    bw.append(probe())
    for k in settings:
        e4.set_prefetch(*k); m(x)
        a=time.perf_counter(); m(x); res[k].append(time.perf_counter()-a)
print("probe GB/s", round(statistics.median(bw),1), round(max(bw),1))
for k,v in res.items():
    ms=statistics.median(v)*1e3; print(k, "%.2f ms %.1f GB/s"%(ms, nbytes/ms/1e6))
