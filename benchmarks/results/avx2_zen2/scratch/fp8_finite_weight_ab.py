# A/B in one process: the float8 GEMV (this build) with finite_weight False (the per-call NaN/inf byte check) and True,
# e4m3fn per-row weights, 8 x Linear(4096, 4096), bf16 x, M = 1..4, beside a DRAM read probe; medians of 9 interleaved rounds.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/fp8_finite_weight_ab.py
import statistics as st, time, torch
torch.set_num_threads(2)
from lowbit.kernels import _ext
mod = _ext.load("fp8_cpu")
gen = torch.Generator().manual_seed(0)
w8 = [((torch.randn(4096, 4096, generator=gen) * 8).to(torch.float8_e4m3fn), torch.rand(4096) / 100) for _ in range(8)]
probe = torch.ones(2**28)
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
for m in (1, 2, 3, 4):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    r = {k: [] for k in (False, True)}; pr = []
    for _ in range(9):
        pr.append(one(lambda: probe.sum()))
        for k in r:
            r[k].append(one(lambda: [mod.fp8_linear(x, q, s, None, 4, 32, 256, k) for q, s in w8]))
    p = 2**30 / st.median(pr) / 1e9
    print(m, f"probe {p:.1f}", "  ".join(f"finite={k} {st.median(v)*1e3:.2f} ms ({128*2**20/st.median(v)/1e9/p:.2f})" for k, v in r.items()))
