# Per-call time of one small quantized nn.Linear (192 x 576, bf16 x, M = 1, SmolLM2's k/v_proj shape) through the
# module, 2 threads, medians of 9 x 3000 calls: int8 weight-only, int4 g64, float8 weight-only.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/linear_call_us.py
import time, statistics, torch, torch.nn as nn, lowbit, sys
torch.set_num_threads(2)
from lowbit.configs.int4 import Int4WeightOnlyConfig
from lowbit.configs.int8 import Int8WeightOnlyConfig
from lowbit.configs.float8 import Float8WeightOnlyConfig
def t(f, n=3000):
    f(); ts=[]
    for _ in range(9):
        t0=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t0)/n)
    return statistics.median(ts)*1e6
x = torch.randn(1,576,dtype=torch.bfloat16)
for name, cfg in (("int8wo", Int8WeightOnlyConfig()), ("int4", Int4WeightOnlyConfig(group_size=64)), ("fp8wo", Float8WeightOnlyConfig())):
    torch.manual_seed(0)
    lin = nn.Linear(576,192,bias=False,dtype=torch.bfloat16); lowbit.quantize_(lin, cfg)
    with torch.no_grad():
        print(name, f"{t(lambda: lin(x)):.1f} us")
