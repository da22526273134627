# A/B with a control: REV's (default HEAD) AVX2 build of a kernel loaded twice under two names ("head_a", "head_b": the
# same code, so their ratio is this harness's own bias) beside the working tree's ("tree"), one process, interleaved
# rounds in rotating order, medians beside a DRAM read probe. M = 1..4 on 8 x Linear(4096, 4096) bf16 x: int4 g128 int8
# zero points (gemv_bf16), fp8 e4m3 per row (fp8_linear, finite weight), int8 weight-only, W8A8 dynamic. Each build's prefetch set as lowbit chooses it
# for that kernel (prefetch.choice(kernel)).
# usage, from the repo root: PYTHONPATH=benchmarks/results/avx2_zen2/scratch .venv/bin/python <this> KERNEL [threads] [rounds] [REV]
#   KERNEL: int4_cpu, int4_cpu_fzp (float32 zero points), fp8_cpu, int8_gemv (int8 weight-only, per-row scales) or int8_act (W8A8 dynamic, per-row scales)
import statistics as st, sys, time
from pathlib import Path
import torch
from torch.utils.cpp_extension import load
from _ab import args, head_sources, FLAGS
from lowbit.kernels import prefetch
from lowbit.primitives.packing import pack_int4

kern = sys.argv[1]
src_kern = "int4_cpu" if kern == "int4_cpu_fzp" else kern
threads, rounds, rev = args(sys.argv[2:], 7)
hint, dist, _ = prefetch.choice(src_kern)
mods = {}
for side, src in (("head_a", head_sources(rev)), ("tree", Path("lowbit/kernels/csrc").resolve()), ("head_b", head_sources(rev))):
    d = Path(f"/tmp/ab_region_{kern}_{side}_{rev}"); d.mkdir(exist_ok=True)
    mods[side] = load(f"lowbit_{kern}_region_{side}", [str(src / f"{src_kern}_avx2.cpp")], extra_include_paths=[str(src)],
                      extra_cflags=FLAGS, build_directory=str(d))
    mods[side].set_prefetch(prefetch.HINTS[hint], dist)
gen = torch.Generator().manual_seed(0)
if kern == "int4_cpu":
    ws = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
           torch.rand(4096, 32) / 100, torch.randint(-8, 8, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
    nbytes = sum(q.numel() + 5 * s.numel() for q, s, _ in ws)
    call = lambda mod, x: [mod.gemv_bf16(x, q, s, z, None) for q, s, z in ws]
elif kern == "int4_cpu_fzp":  # float32 zero points (HQQ's domain): the float GEMV at every M
    ws = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
           torch.rand(4096, 32) / 100, torch.rand(4096, 32) * 15) for _ in range(8)]
    nbytes = sum(q.numel() + 8 * s.numel() for q, s, _ in ws)
    call = lambda mod, x: [mod.gemv_bf16(x, q, s, z, None) for q, s, z in ws]
elif kern == "int8_gemv":
    ws = [(torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, generator=gen), torch.rand(4096, 1) / 100) for _ in range(8)]
    nbytes = sum(w.numel() + 4 * s.numel() for w, s in ws)
    call = lambda mod, x: [mod.int8_weight_only_mm(x, w, s) for w, s in ws]
elif kern == "int8_act":
    ws = [(torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, generator=gen), torch.rand(4096, 1) / 100) for _ in range(8)]
    nbytes = sum(w.numel() + 4 * s.numel() for w, s in ws)
    call = lambda mod, x: [mod.w8a8_dynamic_linear(x, w, s, None, 1e-5) for w, s in ws]
else:
    ws = [((torch.randn(4096, 4096, generator=gen) * 8).to(torch.float8_e4m3fn), torch.rand(4096) / 100) for _ in range(8)]
    nbytes = sum(q.numel() + 4 * s.numel() for q, s in ws)
    call = lambda mod, x: [mod.fp8_linear(x, q, s, None, 4, 32, 256, True) for q, s in ws]
probe = torch.ones(2**28)
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
print(kern, "threads", torch.get_num_threads(), "rounds", rounds, "head =", rev, "prefetch", hint, dist)
names = list(mods)
for m in (1, 2, 3, 4):
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    outs = {k: call(mod, x) for k, mod in mods.items()}
    same = all(torch.equal(a, b) for a, b in zip(outs["head_a"], outs["tree"]))
    r = {k: [] for k in names}; pr = []
    for i in range(rounds):
        pr.append(one(lambda: probe.sum()))
        for k in names[i % 3:] + names[:i % 3]:
            r[k].append(one(lambda: call(mods[k], x)))
    p = 2**30 / st.median(pr) / 1e9
    med = {k: st.median(v) for k, v in r.items()}
    line = "  ".join(f"{k} {v * 1e3:.2f} ms ({nbytes / v / 1e9 / p:.2f})" for k, v in med.items())
    print(f"M={m}: {line}  probe {p:.1f} GB/s  tree vs heads {2 * med['tree'] / (med['head_a'] + med['head_b']):.3f}  "
          f"head_b/head_a {med['head_b'] / med['head_a']:.3f}  tree equals head {same}")
