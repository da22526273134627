# Per-call us of one SmolLM2-shaped linear (no bias) at M = 1, bf16, per config (eager, through nn.Linear: the decode
# plan where one applies), interleaved rounds of 2000 calls, medians of 15. Run from the repo root with .venv/bin/python.
import statistics, sys, time, torch
from torch import nn
import torch.nn.functional as F
from lowbit import quantize_, Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, Int8WeightOnlyConfig, PerRow
from lowbit.static import StaticQuantConfig, prepare, convert
torch.manual_seed(0)
shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
def static(lin, x):
    m = nn.Sequential(lin); prepare(m, StaticQuantConfig("float8_e4m3fn"))
    with torch.no_grad(): m(x.float().expand(8, -1))
    return convert(m)[0]
res = {}
for n, k in shapes:
    base = nn.Linear(k, n, bias=False)
    x = torch.randn(1, k)
    mods = {"bf16": nn.Sequential(nn.Linear(k, n, bias=False))}
    mods["bf16"][0].weight.data.copy_(base.weight.data)
    import copy
    mods["fp8_wo"] = quantize_(nn.Sequential(copy.deepcopy(base)), Float8WeightOnlyConfig())
    mods["fp8_dyn"] = quantize_(nn.Sequential(copy.deepcopy(base)), Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    mods["fp8_static"] = nn.Sequential(static(copy.deepcopy(base), x))
    mods["int8_wo"] = quantize_(nn.Sequential(copy.deepcopy(base)), Int8WeightOnlyConfig())
    mods = {kk: m.to(torch.bfloat16) for kk, m in mods.items()}
    xb = x.bfloat16()
    t = {kk: [] for kk in mods}
    reps = 2000
    with torch.no_grad():
        for kk, m in mods.items():
            for _ in range(200): m(xb)
        for r in range(15):
            for kk, m in mods.items():
                t0 = time.perf_counter()
                for _ in range(reps): m(xb)
                t[kk].append((time.perf_counter() - t0) / reps * 1e6)
    res[(n, k)] = {kk: statistics.median(v) for kk, v in t.items()}
    print(f"{n}x{k}: " + "  ".join(f"{kk} {v:.1f}" for kk, v in res[(n, k)].items()), flush=True)
print("threads", torch.get_num_threads())
