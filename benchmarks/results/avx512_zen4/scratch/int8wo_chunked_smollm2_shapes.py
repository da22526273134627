import time, statistics, torch
import lowbit.kernels.int8 as I8
from lowbit.spec import QuantSpec
from lowbit.granularity import PerRow
torch.set_num_threads(2)
def bench(fn, reps=60):
    for _ in range(5): fn()
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return round(statistics.median(ts)*1e6,1)
spec = QuantSpec("int8", PerRow())
for k, n in [(576,192),(576,576),(576,1536),(1536,576),(4096,4096)]:
    x = torch.randn(256, k).bfloat16()
    q = torch.randint(-127,127,(n,k),dtype=torch.int8); s = torch.rand(n,1)
    wb = q.bfloat16()
    r = {}
    for rnd in range(3):
        r.setdefault("F.linear", []).append(bench(lambda: torch.nn.functional.linear(x, wb), 10 if k == 4096 else 60))
        r.setdefault("int8wo", []).append(bench(lambda: I8._weight_only_chunked(x, q, s, None), 10 if k == 4096 else 60))
    a, b = min(r["F.linear"]), min(r["int8wo"])
    print(k, n, "F.linear", a, "int8wo chunked", b, f"{a/b:.2f}x")
