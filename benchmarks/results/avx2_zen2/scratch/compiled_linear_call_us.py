# Per-linear cost of a compiled graph against eager at decode: 32 x Linear(256, 256) bf16 in one nn.Sequential,
# M = 1, every lowbit decode config, torch.compile(fullgraph=True) (default inductor settings), 2 threads;
# median of 7 rounds of 100 calls, divided by 32. Small layers: what it measures is the per-call cost around
# the kernels (the op a compiled graph calls for each linear, and its Python), not their speed on weights.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/compiled_linear_call_us.py
import time, statistics, torch, torch.nn as nn, lowbit
torch.set_num_threads(2); torch.set_grad_enabled(False)
from lowbit.configs import Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationInt4WeightConfig, Float8WeightOnlyConfig, Float8DynamicActivationFloat8WeightConfig, Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig
from lowbit.granularity import PerRow
def t(f, n=100):
    f(); f(); ts=[]
    for _ in range(7):
        t0=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t0)/n)
    return statistics.median(ts)*1e6
x = torch.randn(1, 256, dtype=torch.bfloat16)
L = 32
for name, cfg in (("int4", Int4WeightOnlyConfig()), ("fp8wo", Float8WeightOnlyConfig()), ("fp8dq", Float8DynamicActivationFloat8WeightConfig(PerRow())), ("fp8xint4", Float8DynamicActivationInt4WeightConfig()), ("bf16", None), ("int8wo", Int8WeightOnlyConfig()), ("w8a8", Int8DynamicActivationInt8WeightConfig()), ("8da4w", Int8DynamicActivationInt4WeightConfig())):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(256, 256, bias=False, dtype=torch.bfloat16) for _ in range(L)])
    if cfg: lowbit.quantize_(m, cfg)
    c = torch.compile(m, fullgraph=True)
    e, cc = t(lambda: m(x)), t(lambda: c(x))
    print(name, f"per linear: eager {e/L:.1f} us  compiled {cc/L:.1f} us")
