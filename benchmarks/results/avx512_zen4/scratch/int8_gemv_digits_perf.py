import torch, time, statistics, sys
sys.path.insert(0, "benchmarks")
from roofline import dram_bandwidth
from lowbit.kernels import _ext
e8 = _ext.load("int8_gemv")
def bench(fn, reps):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)
for th in (1,2):
    print("threads", th, "probe", round(dram_bandwidth(th),1))
    torch.set_num_threads(th)
    for n in (2048, 4096*8):
        k=4096
        w = torch.randint(-127,127,(n,k),dtype=torch.int8); s=torch.rand(n,1)
        for m in (1,2,4,8):
            x=torch.randn(m,k).bfloat16()
            res = {}
            for rnd in range(3):
              for on in (False, True):
                e8.set_digits(on)
                for _ in range(2): e8.int8_weight_only_mm(x,w,s)
                reps = 100 if n<4096 else 5
                res.setdefault(on, []).append(bench(lambda: e8.int8_weight_only_mm(x,w,s), reps))
            t0 = min(res[False]); t1 = min(res[True])
            print(f"  M={m} {n*k/1e6:.1f}MB float {t0*1e6:.0f}us {n*k/t0/1e9:.1f} GB/s | digits {t1*1e6:.0f}us {n*k/t1/1e9:.1f} GB/s  x{t0/t1:.2f}")
