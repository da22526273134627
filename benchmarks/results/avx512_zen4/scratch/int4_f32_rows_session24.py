# Session 24 (2026-12-06, Zen 4, 2 threads): int4 weight-only with float32 / float16 x at M = 2..16 through quantize_ +
# nn.Linear (Int4WeightOnlyConfig's default spec), _int4_cpu.F32_ROWS_MAX_M = 1 ("before": M > 1 ran linear_chunked, or
# _chunked_float32 for float16) against 64 ("rows": gemv_f32 once per row), interleaved, medians of 5 rounds after a
# warm-up. Usage: .venv/bin/python <this file>
import time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Int4WeightOnlyConfig
from lowbit.kernels import _int4_cpu as k4
torch.manual_seed(0)
print("threads", torch.get_num_threads())
@torch.no_grad()
def run(ls, x, lim):
    k4.F32_ROWS_MAX_M = lim
    t = time.perf_counter()
    for l in ls: l(x)
    return (time.perf_counter() - t) * 1e3
for (n, k, count, g) in [(4096, 4096, 8, 128), (576, 576, 30, 64), (1536, 576, 30, 64), (576, 1536, 30, 64)]:
    for dtype in (torch.float32, torch.float16):
        ls = [nn.Linear(k, n, bias=False).to(dtype) for _ in range(count)]
        for l in ls: quantize_(l, Int4WeightOnlyConfig(group_size=g))
        for M in (2, 4, 8, 16):
            if dtype == torch.float16 and M not in (2, 8): continue
            x = torch.randn(M, k).to(dtype)
            r = {1: [], 64: []}
            for i in range(6):
                for lim in (1, 64): r[lim].append(run(ls, x, lim))
            a, b = (statistics.median(r[lim][1:]) for lim in (1, 64))
            print(f"{count} x ({n}, {k}) g{g} {str(dtype)[6:]} M={M}: before {a:8.3f} ms  rows {b:8.3f} ms  {a / b:.2f}x", flush=True)
k4.F32_ROWS_MAX_M = 8
