# Session 25 (2026-12-06): int4 weight-only g128 through quantize_ + nn.Linear (8 x 4096^2, bf16 x, each layer on the
# same x), bitsandbytes nf4 (blocks of 64) and bf16 in one process, M = 1..16, 7 interleaved rounds, medians, ms (x bf16).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_route_vs_bnb_session25.py
import sys, time, statistics, torch, torch.nn as nn
sys.path.insert(0, "benchmarks")
import roofline as R
import lowbit
torch.manual_seed(0)
L = 8
print("threads", torch.get_num_threads())
base = R._bf16_stack(L)
import copy
mods = {"bf16": base,
        "lowbit int4 g128": R._lowbit(lowbit.Int4WeightOnlyConfig(group_size=128))(copy.deepcopy(base)),
        "bnb nf4": R._bnb("nf4")(copy.deepcopy(base))}
if len(sys.argv) > 1 and sys.argv[1] == "8da4w":
    del mods["bnb nf4"]
    mods["8da4w"] = R._lowbit(lowbit.Int8DynActInt4WeightConfig(group_size=32))(copy.deepcopy(base))
Ms = [1, 2, 3, 4, 5, 6, 8, 12, 16]
res = {(n, M): [] for n in mods for M in Ms}
xs = {M: torch.randn(M, 4096, dtype=torch.bfloat16) for M in Ms}
for n, m in mods.items():
    for M in Ms: R._stacked(m, xs[M])()
for rnd in range(7):
    for M in Ms:
        for n, m in mods.items():
            f = R._stacked(m, xs[M]); t0 = time.perf_counter(); f(); res[(n, M)].append(time.perf_counter() - t0)
print("M    " + "  ".join(f"{n:>18}" for n in mods))
for M in Ms:
    b = statistics.median(res[("bf16", M)])
    print(f"{M:<4} " + "  ".join(f"{statistics.median(res[(n, M)])*1e3:8.2f} ({b/statistics.median(res[(n, M)]):4.2f}x)" for n in mods))
