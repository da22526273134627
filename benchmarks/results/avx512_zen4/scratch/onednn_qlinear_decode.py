import torch, time, statistics
torch.set_num_threads(2)
from lowbit.kernels import _ext
ext = _ext.load("int8_act")
def bench(fn, reps=9):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)*1e3
ops = torch.ops.onednn
K,N,L=4096,4096,8
qs=[torch.randint(-127,127,(N,K),dtype=torch.int8) for _ in range(L)]
t=time.perf_counter(); packs=[ops.qlinear_prepack(q, [1, K]) for q in qs]; print("prepack s", time.perf_counter()-t)
ones = torch.ones(N); zeros = torch.zeros(N, dtype=torch.int64)
for M in (1,4,16):
    xq=torch.randint(-127,127,(M,K),dtype=torch.int8); xu=(xq.to(torch.int16)+128).to(torch.uint8)
    f1=lambda: [ops.qlinear_pointwise(xu, 1.0, 128, p, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "") for p in packs]
    f2=lambda: [ext.mm_i8(xq, q) for q in qs] if hasattr(ext,'mm_i8') else None
    f3=lambda: [torch._int_mm(xq if M>16 else torch.cat([xq, torch.zeros(17-M,K,dtype=torch.int8)]), q.t()) for q in qs]
    print(M, "qlinear 8 layers ms", round(bench(f1),2), "mm_i8", round(bench(f2),2), "_int_mm(padded 17)", round(bench(f3),2))
