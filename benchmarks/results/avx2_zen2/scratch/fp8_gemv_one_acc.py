# The AVX2 fp8 GEMV (M = 1..4) with one float32 accumulator per (weight row, row of x) pair instead of two, which
# frees registers for more weight rows per pass and lets M = 4 run in one pass over the weight: REV's build (default
# HEAD) beside the working tree's built with -DLOWBIT_FP8_ONE_ACC=1 and weight rows per pass at M = 2 / 3 / 4 of
# 4 / 3 / 3 ("one_acc") or 4 / 4 / 4 ("one_acc_b"; a first run had 4 / 3 / 2 and 2 / 2 / 3), one process, interleaved rounds in rotating order, medians
# beside a DRAM probe. 8 x Linear(4096, 4096) float8_e4m3fn per-row scales, finite weight, bf16 x.
# The macros come from fp8_gemv_one_acc.patch (beside this script; not adopted, so not in the tree): apply it to
# lowbit/kernels/csrc/fp8_cpu_avx2.cpp first (git apply benchmarks/results/avx2_zen2/scratch/fp8_gemv_one_acc.patch).
# usage, from the repo root: PYTHONPATH=benchmarks/results/avx2_zen2/scratch .venv/bin/python <this> [threads] [rounds] [REV]
import statistics as st, sys, time
from pathlib import Path
import torch
from torch.utils.cpp_extension import load
from _ab import args, head_sources, FLAGS
from lowbit.kernels import prefetch

threads, rounds, rev = args(sys.argv[1:], 9)
hint, dist, _ = prefetch.choice("fp8_cpu")
builds = {"head": (head_sources(rev), []), "one_acc": (Path("lowbit/kernels/csrc").resolve(), ["-DLOWBIT_FP8_ONE_ACC=1"]),
          "one_acc_b": (Path("lowbit/kernels/csrc").resolve(), ["-DLOWBIT_FP8_ONE_ACC=1", "-DLOWBIT_FP8_R3=4", "-DLOWBIT_FP8_R4=4"])}
mods = {}
for side, (src, extra) in builds.items():
    d = Path(f"/tmp/ab_fp8onacc_{side}_{rev}"); d.mkdir(exist_ok=True)
    mods[side] = load(f"lowbit_fp8_oneacc_{side}", [str(src / "fp8_cpu_avx2.cpp")], extra_include_paths=[str(src)],
                      extra_cflags=FLAGS + extra, build_directory=str(d))
    mods[side].set_prefetch(prefetch.HINTS[hint], dist)
gen = torch.Generator().manual_seed(0)
ws = [((torch.randn(4096, 4096, generator=gen) * 8).to(torch.float8_e4m3fn), torch.rand(4096) / 100) for _ in range(8)]
nbytes = sum(q.numel() + 4 * s.numel() for q, s in ws)
call = lambda mod, x: [mod.fp8_linear(x, q, s, None, 4, 32, 256, True) for q, s in ws]
probe = torch.ones(2**28)
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev)
names = list(mods)
for m in (1, 2, 3, 4):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
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
    print(f"M={m}: {line}  probe {p:.1f} GB/s  head/one_acc {med['head'] / med['one_acc']:.3f}  head/b {med['head'] / med['one_acc_b']:.3f}  "
          f"max rel diff {diff['one_acc']:.1e}")
