import time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Int8DynamicActivationInt4WeightConfig
torch.manual_seed(0)
shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
for k, n in shapes:
    b = [nn.Linear(k, n, bias=False).bfloat16() for _ in range(30)]
    q = [nn.Linear(k, n, bias=False).bfloat16() for _ in range(30)]
    for l in q: quantize_(l, Int8DynamicActivationInt4WeightConfig(group_size=32))
    x = torch.randn(256, k).bfloat16()
    def run(ls):
        with torch.no_grad():
            t = time.perf_counter()
            for l in ls: l(x)
            return (time.perf_counter() - t) * 1e3 / len(ls)
    r = {"bf16": [], "8da4w": []}
    for i in range(7):
        r["bf16"].append(run(b)); r["8da4w"].append(run(q))
    a, c = statistics.median(r["bf16"][1:]), statistics.median(r["8da4w"][1:])
    print(f"K={k} N={n} M=256: bf16 {a*1e3:7.1f} us  8da4w {c*1e3:7.1f} us  {a/c:.2f}x")
