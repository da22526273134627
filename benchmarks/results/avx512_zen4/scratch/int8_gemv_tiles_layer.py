import time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Int8WeightOnlyConfig
from lowbit.kernels import int8 as k8
torch.manual_seed(0)
def make(mm):
    k8._EXT_MAX_M = mm
    q = [nn.Linear(4096, 4096, bias=False).bfloat16() for _ in range(8)]
    for l in q: quantize_(l, Int8WeightOnlyConfig())
    with torch.no_grad():
        for l in q: l(torch.randn(4, 4096).bfloat16()); l(torch.randn(1, 4096).bfloat16())
    return q
new, old = make(8), make(1)
k8._EXT_MAX_M = 8
@torch.no_grad()
def run(ls, x):
    t = time.perf_counter()
    for l in ls: l(x)
    return (time.perf_counter() - t) * 1e3
for M in (1, 2, 4, 8):
    x = torch.randn(M, 4096).bfloat16()
    r = {"new": [], "old": []}
    for i in range(9):
        r["new"].append(run(new, x)); r["old"].append(run(old, x))
    a, b = (statistics.median(r[k][1:]) for k in ("new", "old"))
    print(f"M={M} tiles(M<=8) {a:6.2f} ms  int8pack route {b:6.2f} ms  {b/a:.2f}x")
