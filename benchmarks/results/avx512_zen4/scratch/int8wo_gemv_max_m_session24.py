# Session 24 (2026-12-06, Zen 4, 2 threads): int8 weight-only's route at M = 9..64 on the AVX-512 build: the C++
# GEMV's tiles (int8._EXT_MAX_M and _EXT_MAX_M_FLOAT = 64, "gemv") against what ran above M = 8 before (both 8, "old":
# bf16 x -> gemm_bf16, float32 / float16 x -> the chunked path), through quantize_ + nn.Linear, interleaved, medians
# of 6 rounds after a warm-up round. Usage: .venv/bin/python <this file> > int8wo_gemv_max_m_session24.txt
import time, statistics, torch
from torch import nn
from lowbit import quantize_
from lowbit.configs import Int8WeightOnlyConfig
from lowbit.kernels import int8 as k8
torch.manual_seed(0)
print("threads", torch.get_num_threads())
keep = (k8._EXT_MAX_M, k8._EXT_MAX_M_FLOAT)
@torch.no_grad()
def run(ls, x, mm):
    k8._EXT_MAX_M = k8._EXT_MAX_M_FLOAT = mm
    t = time.perf_counter()
    for l in ls: l(x)
    return (time.perf_counter() - t) * 1e3
for (n, k, count) in [(4096, 4096, 8), (576, 576, 30), (1536, 576, 30), (576, 1536, 30)]:
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        ls = [nn.Linear(k, n, bias=False).to(dtype) for _ in range(count)]
        for l in ls: quantize_(l, Int8WeightOnlyConfig())
        for M in (9, 12, 16, 32, 64):
            if dtype == torch.float16 and M not in (16, 64):
                continue
            x = torch.randn(M, k).to(dtype)
            r = {8: [], 64: []}
            for i in range(7):
                for mm in (8, 64): r[mm].append(run(ls, x, mm))
            a, b = (statistics.median(r[mm][1:]) for mm in (8, 64))
            print(f"{count} x ({n}, {k}) {str(dtype)[6:]} M={M}: old {a:7.3f} ms  gemv {b:7.3f} ms  {a / b:.2f}x", flush=True)
k8._EXT_MAX_M, k8._EXT_MAX_M_FLOAT = keep
