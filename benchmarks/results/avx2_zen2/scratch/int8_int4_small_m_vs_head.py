# A/B in one process on an AVX2 host: the AVX2 int8_int4 build from REV's (default HEAD) lowbit/kernels/csrc against the
# working tree's (other module names), 8da4w at M = 1..8 on 8 x Linear(4096, 4096) (8 MiB int4 each, 64 MiB
# in all: over the 16 MiB L3), bf16 x, through int8_int4_dynamic_linear; GB/s of packed weight + scales
# beside a DRAM read probe (torch.sum over 1 GiB float32) in the same rounds; medians of interleaved rounds.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int8_int4_small_m_vs_head.py [threads] [rounds] [REV]
import statistics as st, sys, time

import torch

from _ab import args, builds
from lowbit.primitives.packing import pack_int4

threads, rounds, rev = args(sys.argv[1:])
mods = builds("int8_int4", rev)
gen = torch.Generator().manual_seed(0)
ws = {g: [(pack_int4(torch.randint(-8, 8, (4096, 4096), dtype=torch.int8, generator=gen)), torch.rand(4096, 4096 // g) / 100)
          for _ in range(8)] for g in (32, 128)}
probe = torch.ones(2**28)


def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


calls = {}
for g in (32, 128):
    nbytes = sum(q.numel() + 4 * s.numel() for q, s in ws[g])
    for m in (1, 2, 4, 8):
        x = torch.randn(m, 4096, dtype=torch.bfloat16)
        calls[(g, m)] = (nbytes, lambda mod, x=x, g=g: [mod.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-5) for q, s in ws[g]])
print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev)
for key, (nbytes, f) in calls.items():
    outs = [f(mod) for mod in mods.values()]
    maxrel = max(float(((a.float() - b.float()).abs().max() / b.float().abs().max())) for a, b in zip(outs[0], outs[1]))
    r = {k: [] for k in mods}; pr = []
    for _ in range(rounds):
        pr.append(one(lambda: probe.sum()))
        for k, mod in mods.items():
            f(mod); r[k].append(one(lambda: f(mod)))
    p = 2**30 / st.median(pr) / 1e9
    line = "  ".join(f"{k} {st.median(v) * 1e3:.2f} ms {nbytes / st.median(v) / 1e9:.1f} GB/s ({nbytes / st.median(v) / 1e9 / p:.2f})"
                     for k, v in r.items())
    print(f"g{key[0]} M={key[1]}: {line}  probe {p:.1f} GB/s  tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x  max rel diff {maxrel:.1e}")
