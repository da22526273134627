# Int8 weight-only GEMV (the extension's int8_weight_only_mm) at M = 1, 2, 4 on 128 MiB of int8 weights split as
# 8 x (N, K) for K = 512 .. 4096: does x (M rows of K float32) spilling from L1 slow M = 4? 2 threads, medians of 7.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int8_gemv_k_sweep.py
import torch, time, statistics
from lowbit.kernels import _ext
torch.set_num_threads(2)
op = _ext.load("int8_gemv").int8_weight_only_mm
total = 128 * 2**20
for K in (512, 1024, 2048, 4096):
    N = total // K // 8
    ws = [torch.randint(-127, 127, (N, K), dtype=torch.int8) for _ in range(8)]
    ss = [torch.rand(N, 1) for _ in range(8)]
    for M in (1, 2, 4):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for w, s in zip(ws, ss): op(x, w, s)
            ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        print(f"K={K} N={N} M={M}: {med*1e3:.2f} ms {total/med/1e9:.1f} GB/s", flush=True)
