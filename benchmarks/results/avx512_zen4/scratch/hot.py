import torch, time
from lowbit.kernels import _ext
torch.set_num_threads(1)
e8 = _ext.load("int8_gemv"); e4 = _ext.load("int4_cpu")
print([n for n in dir(e4) if not n.startswith("_")])
def bench(fn, reps):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    ts.sort(); return ts[len(ts)//2]
for n,k in [(128,4096),(2048,4096),(4096*8,4096)]:
    w = torch.randint(-127,127,(n,k),dtype=torch.int8); s=torch.rand(n,1); x=torch.randn(1,k).bfloat16()
    for _ in range(3): e8.int8_weight_only_mm(x,w,s)
    reps = 200 if n<4096 else 10
    t = bench(lambda: e8.int8_weight_only_mm(x,w,s), reps)
    print(f"int8 N={n} K={k} bytes={n*k/1e6:.1f}MB  {t*1e6:.1f}us  {n*k/t/1e9:.1f} GB/s  {n*k/t/2.6e9:.2f} B/cycle")
