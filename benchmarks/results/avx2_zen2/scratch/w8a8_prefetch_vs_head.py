# A/B in one process on an AVX2 host: the AVX2 int8_act build from REV's (default HEAD) lowbit/kernels/csrc against
# the working tree's (other module names), W8A8 dynamic (w8a8_dynamic_linear: quantize, mm_i8, epilogue) at
# M = 1..16 on 8 x Linear(4096, 4096) int8 (16 MiB each, 128 MiB in all), bf16 x; the tree's weight prefetch set
# as lowbit chooses it (lowbit.kernels.prefetch.choice()); GB/s of weight beside a DRAM read probe (torch.sum
# over 1 GiB float32) in the same rounds; medians of interleaved rounds; outputs compared bit for bit.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/w8a8_prefetch_vs_head.py [threads] [rounds] [REV]
import statistics as st, sys, time

import torch

from _ab import args, builds
from lowbit.kernels import prefetch

threads, rounds, rev = args(sys.argv[1:])
mods = builds("int8_act", rev)
hint, dist, why = prefetch.choice()
gen = torch.Generator().manual_seed(0)
ws = [(torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, generator=gen), torch.rand(4096) / 100) for _ in range(8)]
probe = torch.ones(2**28)


def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev, "prefetch", hint, dist, f"({why})")
nbytes = sum(w.numel() for w, _ in ws)
for m in (1, 2, 4, 8, 16):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    f = lambda mod: [mod.w8a8_dynamic_linear(x, w, s, None, 1e-5) for w, s in ws]
    outs = [f(mod) for mod in mods.values()]
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    r = {k: [] for k in mods}; pr = []
    for _ in range(rounds):
        pr.append(one(lambda: probe.sum()))
        for k, mod in mods.items():
            r[k].append(one(lambda: f(mod)))
    p = 2**30 / st.median(pr) / 1e9
    line = "  ".join(f"{k} {st.median(v) * 1e3:.2f} ms {nbytes / st.median(v) / 1e9:.1f} GB/s ({nbytes / st.median(v) / 1e9 / p:.2f})"
                     for k, v in r.items())
    print(f"M={m}: {line}  probe {p:.1f} GB/s  tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x  bit-equal {same}")
