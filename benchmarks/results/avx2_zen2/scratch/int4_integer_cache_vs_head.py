# A/B in one process on an AVX2 host: the int4 integer GEMV (M = 1, g128, int8 zero points, bf16 randn x) of
# REV's build (default HEAD) against the working tree's, on weights that stay in cache (N x 4096 for small N,
# the kernel's compute speed) and on 8 x 4096^2 (DRAM); packed bytes per second, medians of interleaved rounds.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int4_integer_cache_vs_head.py [threads] [rounds] [REV]
import statistics as st, sys, time

import torch

from _ab import args, builds
from lowbit.primitives.packing import pack_int4

threads, rounds, rev = args(sys.argv[1:])
mods = builds("int4_cpu", rev, "_cache")
gen = torch.Generator().manual_seed(0)
print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev)
for n, layers, reps in ((64, 1, 2000), (512, 1, 300), (4096, 8, 3)):
    w = [(pack_int4(torch.randint(0, 16, (n, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
          torch.rand(n, 32, generator=gen) / 100, torch.randint(-8, 8, (n, 32), dtype=torch.int8, generator=gen))
         for _ in range(layers)]
    x = torch.randn(1, 4096, dtype=torch.bfloat16, generator=gen)
    r = {k: [] for k in mods}
    for i in range(rounds):
        for k, mod in (list(mods.items()) if i % 2 == 0 else list(mods.items())[::-1]):
            t0 = time.perf_counter()
            for _ in range(reps):
                for q, s, z in w:
                    mod.gemv_bf16(x, q, s, z, None)
            r[k].append((time.perf_counter() - t0) / reps)
    nbytes = sum(q.numel() for q, _, _ in w)
    line = "  ".join(f"{k} {st.median(v) * 1e6:.1f} us ({nbytes / st.median(v) / 1e9:.1f} GB/s)" for k, v in r.items())
    print(f"N={n} x {layers}: {line}  tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x")
