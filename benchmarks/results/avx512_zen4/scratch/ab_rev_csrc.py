# A/B in one process: a kernel built from an older commit's lowbit/kernels/csrc against the working tree's (both
# under other module names), interleaved, medians. Session 23 (2026-12-06): is the 8da4w / int8 slowdown on this
# Zen 4 in the roofline at 03:53 the code since session 13 (rev 67594df) or the host?
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/ab_rev_csrc.py REV int8_int4|int8_gemv|int4_cpu
import torch, time, statistics as st, sys, subprocess, os
from pathlib import Path
from torch.utils.cpp_extension import load
from lowbit.primitives.packing import pack_int4
from lowbit.kernels import _ext
rev, name = sys.argv[1], sys.argv[2]
build = next(b for b in _ext.BUILDS[name] if b.isa == "avx512")
flags = [*_ext._COMMON_CFLAGS, *build.cflags] + [f"-m{_ext._GCC_FLAG.get(f, f)}" for f in build.features]
old = Path(f"/tmp/rev_csrc_{rev}"); old.mkdir(exist_ok=True)
for f in subprocess.run(["git", "ls-tree", "--name-only", rev, "lowbit/kernels/csrc/"], capture_output=True, text=True).stdout.split():
    (old / Path(f).name).write_text(subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, text=True).stdout)
# VARIANTS="tag:-DNAME=V -DOTHER=W,tag2:..." builds the working tree once per entry with those flags (default: as is)
variants = [(v.split(":")[0], v.split(":")[1].split()) for v in os.environ.get("VARIANTS", "tree:").split(",")]
mods = {}
for tag, src, extra in ((rev, old, []), *((t, Path("lowbit/kernels/csrc").resolve(), e) for t, e in variants)):
    d = Path(f"/tmp/ab_{name}_{tag}"); d.mkdir(exist_ok=True)
    mods[tag] = load(f"lowbit_{name}_{tag}", [str(src / f"{build.source}.cpp")], extra_include_paths=[str(src)],
                     extra_cflags=flags + extra, build_directory=str(d))
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
print("threads", torch.get_num_threads(), "flags", flags)
gen = torch.Generator().manual_seed(0)
MS = [int(v) for v in os.environ.get("MS", "1,16,32,256").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
calls = {}
if name == "int8_int4":
    ws = {g: [(pack_int4(torch.randint(-8, 8, (4096, 4096), dtype=torch.int8, generator=gen)), torch.rand(4096, 4096 // g) / 100) for _ in range(8)] for g in (32, 128)}
    for g in (32, 128):
        for m in MS:
            calls[f"8da4w g{g} M={m}"] = (lambda mod, x=torch.randn(m, 4096, dtype=torch.bfloat16), g=g, m=m:
                                          [mod.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-5) for q, s in (ws[g] if m < 256 else ws[g][:2])])
if name == "int8_act":  # W8A8's GEMM (csrc/gemm_i8.h) alone
    ws8 = [torch.randint(-128, 128, (4096, 4096), dtype=torch.int8, generator=gen) for _ in range(8)]
    for m in MS:
        calls[f"gemm_i8 M={m}"] = (lambda mod, a=torch.randint(-128, 128, (m, 4096), dtype=torch.int8, generator=gen), m=m:
                                   [mod.gemm_i8(a, w) for w in (ws8 if m < 256 else ws8[:2])])
if name == "int4_cpu":
    ws = {g: [(pack_int4(torch.randint(-8, 8, (4096, 4096), dtype=torch.int8, generator=gen)), torch.rand(4096, 4096 // g) / 100) for _ in range(8)] for g in (32, 128)}
    for g in (32, 128):
        for m in (1, 4):
            calls[f"int4 gemv_bf16 g{g} M={m}"] = (lambda mod, x=torch.randn(m, 4096, dtype=torch.bfloat16), g=g:
                                                 [mod.gemv_bf16(x, q, s, None, None) for q, s in ws[g]])
for key, f in calls.items():
    outs = [f(mod) for mod in mods.values()]
    same = all(all(torch.equal(a, b) for a, b in zip(outs[0], o)) for o in outs[1:])
    r = {k: [] for k in mods}
    for _ in range(ROUNDS):
        for k, mod in mods.items(): r[k].append(t(lambda: f(mod)))
    print(f"{key}: " + "  ".join(f"{k} {st.median(v):.2f} ms" for k, v in r.items()) + f"  equal {same}", flush=True)
