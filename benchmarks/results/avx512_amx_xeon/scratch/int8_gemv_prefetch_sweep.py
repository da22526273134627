# The int8 GEMV (M = 1, 16 x 4096^2 int8, 2 threads) under several weight-stream prefetch settings (hint 0 nta, 1 t0,
# 2 t1; bytes ahead), interleaved, with the torch.sum DRAM probe in the same rounds. Output of the 23:16 run: *.txt
import torch, time, statistics
from lowbit.kernels import _ext
torch.set_num_threads(2)
e8=_ext.load("int8_gemv"); e4=_ext.load("int4_cpu")
L=16; K=N=4096
ws=[torch.randint(-127,128,(N,K),dtype=torch.int8) for _ in range(L)]; s=torch.rand(N,1)*0.01
x=torch.randn(1,K).bfloat16()
def run8(): 
    for w in ws: e8.int8_weight_only_mm(x,w,s)
t=torch.ones(2**28)
def probe():
    a=time.perf_counter(); t.sum(); return t.nbytes/(time.perf_counter()-a)/1e9
settings=[(2,65536),(2,131072),(2,262144),(1,65536),(1,131072),(2,32768),(0,32768)]
res={k:[] for k in settings}; bw=[]
run8()
for r in range(7):
    bw.append(probe())
    for k in settings:
        e8.set_prefetch(*k); run8()
        a=time.perf_counter(); run8(); res[k].append(time.perf_counter()-a)
print("probe GB/s", round(statistics.median(bw),1), round(max(bw),1))
for k,v in res.items():
    ms=statistics.median(v)*1e3; print(k, "%.2f ms %.1f GB/s"%(ms, L*N*K/ms/1e6))
