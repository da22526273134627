# Per-linear cost at SmolLM2's 576 x 576, M = 1, eager, 16 linears in a row, 2 threads: each config's whole call, then
# the int8 and float8 kernels alone (fp8 with and without the finite-weight flag).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/smollm2_linear_call_us.py
import time, statistics, torch
from torch import nn
from lowbit import quantize_, Int8WeightOnlyConfig, Float8WeightOnlyConfig, Float8DynamicActivationFloat8WeightConfig, PerRow, Int4WeightOnlyConfig
torch.set_num_threads(2); torch.set_grad_enabled(False)
def t(f, n=200):
    f(); f(); ts=[]
    for _ in range(7):
        t0=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t0)/n)
    return statistics.median(ts)*1e6
x = torch.randn(1, 576, dtype=torch.bfloat16)
for name, cfg in (("bf16", None), ("int8wo", Int8WeightOnlyConfig()), ("int4", Int4WeightOnlyConfig()), ("fp8wo", Float8WeightOnlyConfig()), ("fp8dq", Float8DynamicActivationFloat8WeightConfig(PerRow()))):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(576, 576, bias=False) for _ in range(16)]).to(torch.bfloat16)
    if cfg is not None: quantize_(m, cfg)
    print(name, f"{t(lambda: m(x)) / 16:.1f} us per 576x576 linear")

from lowbit.kernels import _ext
e8 = _ext.load("int8_gemv"); ef = _ext.load("fp8_cpu")
ws8 = [(torch.randint(-127, 127, (576, 576), dtype=torch.int8), torch.rand(576, 1)) for _ in range(16)]
wsf = [((torch.randn(576, 576) * 8).to(torch.float8_e4m3fn), torch.rand(576, 1)) for _ in range(16)]
print("int8 ext", t(lambda: [e8.int8_weight_only_mm(x, w, s) for w, s in ws8]) / 16)
print("fp8 ext finite", t(lambda: [ef.fp8_linear(x, w, s, None, 4, 192, 256, True) for w, s in wsf]) / 16)
print("fp8 ext checked", t(lambda: [ef.fp8_linear(x, w, s, None, 4, 192, 256, False) for w, s in wsf]) / 16)
xs = torch.randn(1, 576, dtype=torch.bfloat16)
print("empty op call (torch.empty)", t(lambda: [torch.empty(1, 576, dtype=torch.bfloat16) for _ in range(16)]) / 16)
