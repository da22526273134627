# A/B in one process on an AVX2 host: one C++ kernel's AVX2 build from REV's (default HEAD) lowbit/kernels/csrc against the
# working tree's, on SmolLM2-135M's four decode shapes (N x K: 576x576 q/o, 192x576 k/v, 1536x576 gate/up,
# 576x1536 down), M = 1, bf16 x, 30 weights of each shape (cold-ish: 7.6 MB of int8 in all) called in turn like
# a model's layers; microseconds per call, medians of interleaved rounds (which build goes first alternates).
# usage: .venv/bin/python benchmarks/results/avx2_zen2/scratch/small_layer_calls_vs_head.py KERNEL [threads] [rounds] [REV]
#   KERNEL: fp8_cpu (fp8_linear, e4m3 per row, finite_weight=True) or int4_cpu (gemv_bf16, g64 int8 zero points)
import statistics as st, sys, time

import torch

from _ab import args, builds
from lowbit.primitives.packing import pack_int4

kern = sys.argv[1]
threads, rounds, rev = args(sys.argv[2:], rounds=9)
mods = builds(kern, rev, "_small")
gen = torch.Generator().manual_seed(0)
shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def weights(n, k):
    if kern == "fp8_cpu":
        return [((torch.randn(n, k, generator=gen) * 8).to(torch.float8_e4m3fn), torch.rand(n) / 100) for _ in range(30)]
    return [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)).view(torch.uint8),
             torch.rand(n, k // 64) / 100, torch.randint(-8, 8, (n, k // 64), dtype=torch.int8, generator=gen)) for _ in range(30)]


def call(mod, x, w):
    if kern == "fp8_cpu":
        return mod.fp8_linear(x, w[0], w[1], None, 4, 32, 256, True)
    return mod.gemv_bf16(x, w[0], w[1], w[2], None)


print("kernel", kern, "threads", torch.get_num_threads(), "rounds", rounds, "head =", rev)
for n, k in shapes:
    ws = weights(n, k)
    x = torch.randn(1, k, dtype=torch.bfloat16, generator=gen)
    same = all(torch.equal(call(mods["head"], x, w), call(mods["tree"], x, w)) for w in ws)
    r = {t: [] for t in mods}
    for i in range(rounds):
        for t in (("head", "tree") if i % 2 == 0 else ("tree", "head")):
            t0 = time.perf_counter()
            for w in ws:
                call(mods[t], x, w)
            r[t].append((time.perf_counter() - t0) / len(ws) * 1e6)
    print(f"{n}x{k}: head {st.median(r['head']):.1f} us  tree {st.median(r['tree']):.1f} us  "
          f"tree/head {st.median(r['head']) / st.median(r['tree']):.2f}x  bit-equal {same}")
