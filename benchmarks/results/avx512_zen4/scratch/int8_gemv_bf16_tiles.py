"""int8 weight-only GEMV: bf16 x (the bf16 tiles at M >= 2) against the same values as float32 x (the float
tiles), GB/s of weight, 2048 x 4096 (L3) and 32768 x 4096 (DRAM), best of 3 medians, threads from argv."""
import statistics
import sys
import time

import torch

from lowbit.kernels import _ext

e8 = _ext.load("int8_gemv")
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


def bench(fn, reps):
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


for n in (2048, 32768):
    k = 4096
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    s = torch.rand(n, 1)
    for m in (1, 2, 4, 8):
        xb = torch.randn(m, k).bfloat16()
        xf = xb.float()
        res = {}
        for _ in range(3):
            for name, x in (("float32 x", xf), ("bf16 x", xb)):
                for _ in range(2):
                    e8.int8_weight_only_mm(x, w, s)
                res.setdefault(name, []).append(bench(lambda: e8.int8_weight_only_mm(x, w, s), 100 if n < 4096 else 5))
        print(f"threads {torch.get_num_threads()} {'L3  ' if n < 4096 else 'DRAM'} M={m}: "
              + "  ".join(f"{name} {n * k / min(v) / 1e9:.1f} GB/s" for name, v in res.items()))
