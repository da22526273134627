# Session 26 (2026-12-06): int4 weight-only g128 through quantize_ + nn.Linear (8 x 4096^2, bf16 x), M = 8..32: this
# tree's route (GEMV to 12, gemm_small_bf16 to 16, gemm_bf16 above, for K >= 2048) against the route before it (GEMV
# to 8, gemm_small_bf16 to 32: _int4_cpu's limits patched while that copy runs), bitsandbytes nf4 (blocks of 64) and
# bf16, one process, 7 interleaved rounds, medians, ms (x bf16).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_route_m9_32_session26.py
import sys, time, statistics, copy, contextlib, torch
sys.path.insert(0, "benchmarks")
import roofline as R
import lowbit
from lowbit.kernels import _int4_cpu
torch.manual_seed(0)
print("threads", torch.get_num_threads())
base = R._bf16_stack(8)
mods = {"bf16": base,
        "int4 g128 new route": R._lowbit(lowbit.Int4WeightOnlyConfig(group_size=128))(copy.deepcopy(base)),
        "int4 g128 old route": R._lowbit(lowbit.Int4WeightOnlyConfig(group_size=128))(copy.deepcopy(base)),
        "bnb nf4": R._bnb("nf4")(copy.deepcopy(base))}
@contextlib.contextmanager
def route(name):
    if name != "int4 g128 old route":
        yield; return
    g, s = _int4_cpu.gemv_max_m, _int4_cpu.small_max_m
    _int4_cpu.gemv_max_m, _int4_cpu.small_max_m = (lambda k=None: 8), (lambda k=None: 32)
    try: yield
    finally: _int4_cpu.gemv_max_m, _int4_cpu.small_max_m = g, s
Ms = [8, 9, 10, 12, 14, 16, 20, 24, 32]
res = {(n, M): [] for n in mods for M in Ms}
xs = {M: torch.randn(M, 4096, dtype=torch.bfloat16) for M in Ms}
for n, m in mods.items():
    for M in Ms:
        with route(n): R._stacked(m, xs[M])()
for rnd in range(7):
    for M in Ms:
        for n, m in mods.items():
            f = R._stacked(m, xs[M])
            with route(n):
                t0 = time.perf_counter(); f(); res[(n, M)].append(time.perf_counter() - t0)
print("M    " + "  ".join(f"{n:>21}" for n in mods))
for M in Ms:
    b = statistics.median(res[("bf16", M)])
    print(f"{M:<4} " + "  ".join(f"{statistics.median(res[(n, M)])*1e3:11.2f} ({b/statistics.median(res[(n, M)]):4.2f}x)" for n in mods))
