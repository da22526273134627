import time, statistics, torch
from lowbit.kernels import _ext
a8 = _ext.load("int8_act")
def bench(fn, reps=300):
    for _ in range(5): fn()
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return round(statistics.median(ts)*1e6,1)
x = torch.randn(256, 576).bfloat16()
for th in (1,2):
    torch.set_num_threads(th)
    print(th, "dynamic per-token", bench(lambda: a8.fake_quant_fp8(x, -1.0, True, 1e-12, False)),
          "static", bench(lambda: a8.fake_quant_fp8(x, 1.0, True, 1e-12, False)),
          "per-tensor dyn", bench(lambda: a8.fake_quant_fp8(x, -1.0, False, 1e-12, False)),
          "empty_like", bench(lambda: torch.empty_like(x)))
