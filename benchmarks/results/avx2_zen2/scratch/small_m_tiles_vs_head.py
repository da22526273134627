# A/B in one process on an AVX2 host: the AVX2 fp8_cpu and int4_cpu builds from REV's (default HEAD)
# lowbit/kernels/csrc against the working tree's (other module names), at M = 5..32 on 8 x Linear(4096, 4096)
# (fp8 e4m3 per-row weights through fp8_linear's tiled path; int4 g128 with int8 zero points through
# gemm_small_bf16), bf16 x; GFLOP/s beside float32 F.linear's on 1024^3 in the same rounds; medians of
# interleaved rounds; the largest relative difference of the two builds' outputs.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/small_m_tiles_vs_head.py [threads] [rounds] [REV]
import statistics as st, sys, time

import torch
import torch.nn.functional as F

from _ab import args, builds
from lowbit.primitives.packing import pack_int4

threads, rounds, rev = args(sys.argv[1:])
mods = {(kern, side): m for kern in ("fp8_cpu", "int4_cpu") for side, m in builds(kern, rev).items()}
gen = torch.Generator().manual_seed(0)
w8 = [((torch.randn(4096, 4096, generator=gen) * 8).to(torch.float8_e4m3fn).view(torch.uint8), torch.rand(4096) / 100)
      for _ in range(8)]
w4 = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
       torch.rand(4096, 32) / 100, torch.randint(-8, 8, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)


def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


print("threads", torch.get_num_threads(), "rounds", rounds, "head =", rev)
for m in (5, 8, 16, 32):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    calls = {
        "fp8": lambda mod, x=x: [mod.fp8_linear(x, q.view(torch.float8_e4m3fn), s, None, 4, 32, 256) for q, s in w8],
        "int4": lambda mod, x=x: [mod.gemm_small_bf16(x, q, s, z, None) for q, s, z in w4],
    }
    for name, f in calls.items():
        kern = "fp8_cpu" if name == "fp8" else "int4_cpu"
        pair = {t: mods[(kern, t)] for t in ("head", "tree")}
        outs = [f(mod) for mod in pair.values()]
        maxrel = max(float(((p.float() - q.float()).abs().max() / q.float().abs().max())) for p, q in zip(outs[0], outs[1]))
        r = {k: [] for k in pair}; pk = []
        for _ in range(rounds):
            pk.append(one(lambda: F.linear(a, b)))
            for k, mod in pair.items():
                r[k].append(one(lambda: f(mod)))
        peak = 2 * 1024**3 / st.median(pk) / 1e9
        flop = 2 * m * 4096 * 4096 * 8
        line = "  ".join(f"{k} {st.median(v) * 1e3:.2f} ms {flop / st.median(v) / 1e9:.0f} GFLOP/s ({flop / st.median(v) / 1e9 / peak:.2f})"
                         for k, v in r.items())
        print(f"{name} M={m}: {line}  fp32 peak {peak:.0f}  tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x  max rel diff {maxrel:.1e}")
