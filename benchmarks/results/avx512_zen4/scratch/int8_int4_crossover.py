import sys, time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Int8DynamicActivationInt4WeightConfig
from lowbit.kernels import _ext, _int8_int4_cpu as k8
torch.manual_seed(0)
g = int(sys.argv[1]); Ms = [int(v) for v in sys.argv[2].split(',')]
def make():
    q = [nn.Linear(4096, 4096, bias=False).bfloat16() for _ in range(8)]
    for l in q: quantize_(l, Int8DynamicActivationInt4WeightConfig(group_size=g))
    return q
qi, qf = make(), make()
print("isa", _ext.status()["int8_int4"], "threads", torch.get_num_threads())
@torch.no_grad()
def run(ls, x, mm):
    k8.MAX_M = mm
    t = time.perf_counter()
    for l in ls: l(x)
    return (time.perf_counter() - t) * 1e3
for M in Ms:
    x = torch.randn(M, 4096).bfloat16()
    r = {"int": [], "float": []}
    for i in range(6):
        r["int"].append(run(qi, x, 4096)); r["float"].append(run(qf, x, 0))
    a, b = (statistics.median(r[k][1:]) for k in ("int", "float"))
    print(f"M={M:4d} integer {a:7.2f} ms  fake-quant+int4 kernel {b:7.2f} ms  int/float {b/a:5.2f}x")
