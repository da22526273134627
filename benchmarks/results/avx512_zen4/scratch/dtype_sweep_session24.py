# Session 24 (2026-12-06 ~07:54, Zen 4, 2 threads, at c119067: after the int4 float32 per-row GEMV): every config's route
# through quantize_ + nn.Linear on 8 x Linear(2048, 2048), float32 / float16 / bf16 x, medians of 3 runs after a warm-up.
# Usage: .venv/bin/python <this file>
import time, statistics, torch
from torch import nn
from lowbit import quantize_
import lowbit.configs as C
torch.manual_seed(0)
@torch.no_grad()
def run(ls, x):
    t = time.perf_counter()
    for l in ls: l(x)
    return (time.perf_counter() - t) * 1e3
names = [n for n in ("Int8WeightOnlyConfig", "Int4WeightOnlyConfig", "Float8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig",
         "Int8DynamicActivationInt4WeightConfig", "Float8DynamicActivationFloat8WeightConfig", "Float8DynamicActivationInt4WeightConfig") if hasattr(C, n)]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
  for name in names:
    try:
        ls = [nn.Linear(2048, 2048, bias=False).to(dtype) for _ in range(8)]
        for l in ls: quantize_(l, getattr(C, name)())
    except Exception as e:
        print(name, "skip", type(e).__name__, str(e)[:80]); continue
    row = []
    for M in (1, 2, 4, 16, 64):
        x = torch.randn(M, 2048).to(dtype)
        try:
            r = [run(ls, x) for _ in range(4)]
            row.append(f"M{M} {statistics.median(r[1:]):7.2f}")
        except Exception as e:
            row.append(f"M{M} ERR {type(e).__name__}")
    print(f"{str(dtype)[6:]:9s} {name:45s}", "  ".join(row), flush=True)
