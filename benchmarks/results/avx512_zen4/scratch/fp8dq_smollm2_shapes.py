import time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Float8DynamicActivationFloat8WeightConfig
from lowbit.granularity import PerRow
torch.manual_seed(0)
for k, n in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:
    b = [nn.Linear(k, n, bias=False).bfloat16() for _ in range(30)]
    q = [nn.Linear(k, n, bias=False).bfloat16() for _ in range(30)]
    for l in q: quantize_(l, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    x = torch.randn(256, k).bfloat16()
    def run(ls):
        with torch.no_grad():
            t = time.perf_counter()
            for l in ls: l(x)
            return (time.perf_counter() - t) * 1e3 / len(ls)
    r = {"bf16": [], "fp8dq": []}
    for i in range(7):
        r["bf16"].append(run(b)); r["fp8dq"].append(run(q))
    a, c = statistics.median(r["bf16"][1:]), statistics.median(r["fp8dq"][1:])
    print(f"K={k} N={n} M=256: bf16 {a*1e3:7.1f} us  fp8dq {c*1e3:7.1f} us  {a/c:.2f}x")
