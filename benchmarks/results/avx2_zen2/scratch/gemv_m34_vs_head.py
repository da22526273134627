# A/B in one process on an AVX2 host: the AVX2 int4_cpu and fp8_cpu builds from REV's (default HEAD)
# lowbit/kernels/csrc against the working tree's (other module names), M = 1..4 on 8 x Linear(4096, 4096): int4 g128
# (int8 zero points) through gemv_bf16, fp8 e4m3 per-row through fp8_linear (finite_weight=True); bf16 x; GB/s of
# weight bytes beside a DRAM read probe in the same rounds; medians of interleaved rounds; the largest relative
# difference of the two builds' outputs; each build's weight prefetch set as lowbit chooses it.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/gemv_m34_vs_head.py [threads] [rounds] [REV]
import statistics as st, sys, time

import torch

from _ab import args, builds
from lowbit.kernels import prefetch
from lowbit.primitives.packing import pack_int4

threads, rounds, rev = args(sys.argv[1:])
hint, dist, _ = prefetch.choice()
mods = {(kern, side): m for kern in ("int4_cpu", "fp8_cpu") for side, m in builds(kern, rev, "_m34").items()}
gen = torch.Generator().manual_seed(0)
w8 = [((torch.randn(4096, 4096, generator=gen) * 8).to(torch.float8_e4m3fn), torch.rand(4096) / 100) for _ in range(8)]
w4 = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
       torch.rand(4096, 32) / 100, torch.randint(-8, 8, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
probe = torch.ones(2**28)


def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev, "prefetch", hint, dist)
for m in (1, 2, 3, 4):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    calls = {
        "int4": (sum(q.numel() + 5 * s.numel() for q, s, _ in w4),
                 lambda mod, x=x: [mod.gemv_bf16(x, q, s, z, None) for q, s, z in w4]),
        "fp8": (sum(q.numel() for q, _ in w8), lambda mod, x=x: [mod.fp8_linear(x, q, s, None, 4, 32, 256, True) for q, s in w8]),
    }
    for name, (nbytes, f) in calls.items():
        kern = "fp8_cpu" if name == "fp8" else "int4_cpu"
        pair = {t: mods[(kern, t)] for t in ("head", "tree")}
        outs = [f(mod) for mod in pair.values()]
        maxrel = max(float(((p.float() - q.float()).abs().max() / q.float().abs().max())) for p, q in zip(outs[0], outs[1]))
        r = {k: [] for k in pair}; pr = []
        for i in range(rounds):
            pr.append(one(lambda: probe.sum()))
            for k, mod in (list(pair.items()) if i % 2 == 0 else list(pair.items())[::-1]):  # alternate which goes first
                r[k].append(one(lambda: f(mod)))
        p = 2**30 / st.median(pr) / 1e9
        line = "  ".join(f"{k} {st.median(v) * 1e3:.2f} ms ({nbytes / st.median(v) / 1e9 / p:.2f})" for k, v in r.items())
        print(f"{name} M={m}: {line}  probe {p:.1f} GB/s  tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x  max rel diff {maxrel:.1e}")
