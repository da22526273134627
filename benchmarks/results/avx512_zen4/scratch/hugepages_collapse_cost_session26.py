# Session 26 (2026-12-06): what lowbit.kernels.hugepages.advise costs: 512 MiB of touched memory advised and collapsed
# (MADV_HUGEPAGE + MADV_COLLAPSE), then again (already huge), three times in fresh tensors, seconds.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/hugepages_collapse_cost_session26.py
import os, time
import torch
from lowbit.kernels import hugepages
for _ in range(3):
    t = torch.ones(512 << 20, dtype=torch.uint8)
    t0 = time.perf_counter(); n = hugepages.advise(t); t1 = time.perf_counter(); hugepages.advise(t); t2 = time.perf_counter()
    print(f"{n >> 20} MiB advised in {t1 - t0:.3f} s ({n / (t1 - t0) / 1e6:.0f} MB/s); again {t2 - t1:.4f} s", flush=True)
    del t
