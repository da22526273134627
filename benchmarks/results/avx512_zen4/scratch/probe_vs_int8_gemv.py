# The DRAM probe (roofline.dram_bandwidth) and the int8 GEMV at M=1 (8 x 4096^2, bf16 x) on 1 and 2 threads, alternately.
# Run from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/probe_vs_int8_gemv.py
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
ws=[torch.randint(-127,127,(4096,4096),dtype=torch.int8) for _ in range(8)]; s=torch.rand(4096,1)
x=torch.randn(1,4096).bfloat16()
for th in (1,2,1,2):
    torch.set_num_threads(th)
    p=dram_bandwidth(th)
    t=bench(lambda: [e8.int8_weight_only_mm(x,w,s) for w in ws], 7)
    print(f"threads {th}: probe {p:.1f} GB/s, int8 GEMV M=1 {8*4096*4096/t/1e9:.1f} GB/s ({8*4096*4096/t/1e9/p:.2f})")
