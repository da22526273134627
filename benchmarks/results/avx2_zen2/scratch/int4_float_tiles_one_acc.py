# The AVX2 int4 GEMV's float tiles (M = 2..4) with one float32 accumulator per (weight row, row of x) pair instead
# of two (even / odd elements), which frees registers for more weight rows per tile: REV's build (default HEAD)
# beside the working tree's built with -DLOWBIT_INT4_ONE_ACC=1 (weight rows per tile: 4 at M = 1..2, 3 at M = 3,
# 2 at M = 4; a first run took 2 or 3 at both M = 3 and 4) and with 2 rows at M = 2 (-DLOWBIT_INT4_R2=2); M = 1 is
# gemv_f32 (float32 x, the float tiles; bf16 x at M = 1 runs the integer GEMV), one process, interleaved rounds in rotating order, medians beside a DRAM probe.
# 8 x Linear(4096, 4096), int4 g128 int8 zero points (or float32 ones with "fzp"), bf16 x.
# usage, from the repo root: PYTHONPATH=benchmarks/results/avx2_zen2/scratch .venv/bin/python <this> [threads] [rounds] [REV] [fzp]
import statistics as st, sys, time
from pathlib import Path
import torch
from torch.utils.cpp_extension import load
from _ab import args, head_sources, FLAGS
from lowbit.kernels import prefetch
from lowbit.primitives.packing import pack_int4

fzp = "fzp" in sys.argv[1:]
threads, rounds, rev = args([a for a in sys.argv[1:] if a != "fzp"], 9)
hint, dist, _ = prefetch.choice("int4_cpu")
builds = {"head": (head_sources(rev), []), "one_acc": (Path("lowbit/kernels/csrc").resolve(), ["-DLOWBIT_INT4_ONE_ACC=1"]),
          "one_acc_m2r2": (Path("lowbit/kernels/csrc").resolve(), ["-DLOWBIT_INT4_ONE_ACC=1", "-DLOWBIT_INT4_R2=2"])}
mods = {}
for side, (src, extra) in builds.items():
    d = Path(f"/tmp/ab_onacc_{side}_{rev}"); d.mkdir(exist_ok=True)
    mods[side] = load(f"lowbit_int4_oneacc_{side}", [str(src / "int4_cpu_avx2.cpp")], extra_include_paths=[str(src)],
                      extra_cflags=FLAGS + extra, build_directory=str(d))
    mods[side].set_prefetch(prefetch.HINTS[hint], dist)
gen = torch.Generator().manual_seed(0)
ws = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
       torch.rand(4096, 32) / 100,
       torch.rand(4096, 32) * 15 if fzp else torch.randint(-8, 8, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
nbytes = sum(q.numel() + (8 if fzp else 5) * s.numel() for q, s, _ in ws)
call = lambda mod, x: [(mod.gemv_bf16 if x.dtype == torch.bfloat16 else mod.gemv_f32)(x, q, s, z, None) for q, s, z in ws]
probe = torch.ones(2**28)
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev, "zero points", "float32" if fzp else "int8")
names = list(mods)
for m in (1, 2, 3, 4):
    x = torch.randn(m, 4096, dtype=torch.bfloat16 if m > 1 else torch.float32)
    outs = {k: call(mod, x) for k, mod in mods.items()}
    ref = [o.float() for o in outs["head"]]
    diff = {k: max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(v, ref)) for k, v in outs.items()}
    r = {k: [] for k in names}; pr = []
    for i in range(rounds):
        pr.append(one(lambda: probe.sum()))
        for k in names[i % 3:] + names[:i % 3]:
            r[k].append(one(lambda: call(mods[k], x)))
    p = 2**30 / st.median(pr) / 1e9
    med = {k: st.median(v) for k, v in r.items()}
    line = "  ".join(f"{k} {v * 1e3:.2f} ms ({nbytes / v / 1e9 / p:.2f})" for k, v in med.items())
    print(f"M={m}: {line}  probe {p:.1f} GB/s  head/one_acc {med['head'] / med['one_acc']:.3f}  head/m2r2 {med['head'] / med['one_acc_m2r2']:.3f}  "
          f"max rel diff {diff['one_acc']:.1e}")
