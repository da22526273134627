import torch, time, statistics
torch.set_num_threads(2)
from lowbit.kernels import _ext
ext = _ext.load("int8_act")
def bench(fn, reps=15):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)*1e3
M,K,N=256,4096,4096
x=torch.randn(M,K).bfloat16(); q=torch.randint(-127,127,(N,K),dtype=torch.int8); s=torch.rand(N)
xq, sx = ext.quantize_i8(x, -1.0, 0, 1e-12)
acc = torch._int_mm(xq, q.t())
wb = q.bfloat16()
for r in range(2):
    print({"bf16 mm": round(bench(lambda: torch.mm(x, wb.t())),2),
       "quantize_i8": round(bench(lambda: ext.quantize_i8(x, -1.0, 0, 1e-12)),2),
       "_int_mm": round(bench(lambda: torch._int_mm(xq, q.t())),2),
       "_int_mm contiguous-T": round(bench(lambda: torch._int_mm(xq, q.t().contiguous())),2),
       "epilogue": round(bench(lambda: ext.w8a8_epilogue(acc, sx.contiguous(), s, None, None, x)),2)})
