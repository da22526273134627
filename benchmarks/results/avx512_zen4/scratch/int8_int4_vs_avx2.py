# scratch: 8da4w kernel vs bf16 on 8 x Linear(4096,4096), interleaved medians
import sys, time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Int8DynamicActivationInt4WeightConfig
from lowbit.kernels import _ext
torch.manual_seed(0)
g = int(sys.argv[1]) if len(sys.argv) > 1 else 32
Ms = [int(v) for v in sys.argv[2].split(',')] if len(sys.argv) > 2 else [1, 4, 16, 64]
layers = [nn.Linear(4096, 4096, bias=False).bfloat16() for _ in range(8)]
q = [nn.Linear(4096, 4096, bias=False).bfloat16() for _ in range(8)]
for l in q: quantize_(l, Int8DynamicActivationInt4WeightConfig(group_size=g))
print("isa", _ext.status()["int8_int4"], "threads", torch.get_num_threads())
buf = torch.empty(256 << 20, dtype=torch.uint8)
def dram():
    t = time.perf_counter(); buf.sum(dtype=torch.int64) if False else buf.view(torch.int64).sum(); return buf.numel() / (time.perf_counter() - t) / 1e9
@torch.no_grad()
def run(ls, x):
    t = time.perf_counter()
    for l in ls: l(x)
    return (time.perf_counter() - t) * 1e3
for M in Ms:
    x = torch.randn(M, 4096).bfloat16()
    r = {"bf16": [], "8da4w": [], "dram": []}
    for _ in range(3): run(layers, x); run(q, x)
    for _ in range(7):
        r["bf16"].append(run(layers, x)); r["8da4w"].append(run(q, x)); r["dram"].append(dram())
    b, a, d = (statistics.median(r[k]) for k in ("bf16", "8da4w", "dram"))
    wbytes = 8 * 4096 * 4096 * (0.5 + 4 / g)
    print(f"M={M:3d} bf16 {b:7.2f} ms  8da4w {a:7.2f} ms  ratio {b/a:5.2f}x  8da4w {wbytes/a/1e6:5.1f} GB/s  dram {d:5.1f} GB/s")
