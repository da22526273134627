# A/B in one process on an AVX2 host: the AVX2 int8_gemv build from REV's (default HEAD) lowbit/kernels/csrc against
# the working tree's (other module names), int8 weight-only per-row at M = 1..8 on 8 x Linear(4096, 4096) (16 MiB
# each, 128 MiB in all: over the 16 MiB L3), bf16 x, through int8_weight_only_mm; GB/s of weight + scales beside a
# DRAM read probe in the same rounds; medians of interleaved rounds; the largest output difference of the builds.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int8_gemv_m_vs_head.py [threads] [rounds] [REV]
import statistics as st, sys, time

import torch

from _ab import args, builds

threads, rounds, rev = args(sys.argv[1:])
mods = builds("int8_gemv", rev, "_m")
gen = torch.Generator().manual_seed(0)
ws = [(torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, generator=gen), torch.rand(4096, 1) / 100) for _ in range(8)]
nbytes = sum(w.numel() + 4 * s.numel() for w, s in ws)
probe = torch.ones(2**28)


def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev)
for m in (1, 2, 3, 4, 6, 8):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    f = lambda mod, x=x: [mod.int8_weight_only_mm(x, w, s) for w, s in ws]
    outs = [f(mod) for mod in mods.values()]
    maxrel = max(float(((p.float() - q.float()).abs().max() / q.float().abs().max())) for p, q in zip(*outs))
    r = {k: [] for k in mods}; pr = []
    for i in range(rounds):
        pr.append(one(lambda: probe.sum()))
        for k, mod in (list(mods.items()) if i % 2 == 0 else list(mods.items())[::-1]):
            r[k].append(one(lambda: f(mod)))
    p = 2**30 / st.median(pr) / 1e9
    line = "  ".join(f"{k} {st.median(v) * 1e3:.2f} ms ({nbytes / st.median(v) / 1e9 / p:.2f})" for k, v in r.items())
    print(f"M={m}: {line}  probe {p:.1f} GB/s  tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x  max rel diff {maxrel:.1e}")
