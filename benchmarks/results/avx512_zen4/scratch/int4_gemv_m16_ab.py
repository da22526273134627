# Session 25 (2026-12-06): int4 weight-only, bf16 x, M = 1..16 on 8 x 4096^2 (asymmetric int8 zero points, g32 / g128).
# REV's build (its routes: gemv_bf16 M <= 4, gemm_small_bf16 above) against the working tree's gemv_bf16 built once per
# VARIANTS entry ("tag:-DX=1 -DY=2,..."), interleaved rounds, medians; outputs compared within each M.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_gemv_m16_ab.py REV
import os, statistics as st, subprocess, sys, time
from pathlib import Path
import torch
from torch.utils.cpp_extension import load
from lowbit.kernels import _ext
rev = sys.argv[1]
build = next(b for b in _ext.BUILDS["int4_cpu"] if b.isa == "avx512")
flags = [*_ext._COMMON_CFLAGS, *build.cflags] + [f"-m{_ext._GCC_FLAG.get(f, f)}" for f in build.features]
old = Path(f"/tmp/rev_csrc_{rev}"); old.mkdir(exist_ok=True)
for f in subprocess.run(["git", "ls-tree", "--name-only", rev, "lowbit/kernels/csrc/"], capture_output=True, text=True).stdout.split():
    (old / Path(f).name).write_text(subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, text=True).stdout)
variants = [(v.split(":")[0], v.split(":")[1].split()) for v in os.environ.get("VARIANTS", "tree:").split(",")]
mods = {}
for tag, src, extra in ((rev, old, []), *((t, Path("lowbit/kernels/csrc").resolve(), e) for t, e in variants)):
    d = Path(f"/tmp/ab_int4m_{tag}"); d.mkdir(exist_ok=True)
    mods[tag] = load(f"lowbit_int4m_{tag}", [str(src / f"{build.source}.cpp")], extra_include_paths=[str(src)],
                     extra_cflags=flags + extra, build_directory=str(d))
# PREBUILT="tag:DIR:MODULE,...": also a module built earlier (a variant of an earlier working tree)
for v in filter(None, os.environ.get("PREBUILT", "").split(",")):
    tag, d, modname = v.split(":")
    sys.path.insert(0, d); mods[tag] = __import__(modname)
gen = torch.Generator().manual_seed(0)
MS = [int(v) for v in os.environ.get("MS", "1,2,3,4,5,6,8,12,16").split(",")]
GS = [int(v) for v in os.environ.get("GS", "32,128").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "7"))
print("threads", torch.get_num_threads(), "variants", variants, flush=True)
ws = {g: [(torch.randint(0, 256, (4096, 2048), dtype=torch.uint8, generator=gen), torch.rand(4096, 4096 // g, generator=gen) / 100 + 1e-3,
           torch.randint(0, 16, (4096, 4096 // g), dtype=torch.int8, generator=gen)) for _ in range(8)] for g in GS}
def call(tag, mod, x, g):
    f = mod.gemv_bf16 if (tag != rev or x.shape[0] <= 4) else mod.gemm_small_bf16
    return [f(x, q, s, z, None) for q, s, z in ws[g]]
def sqnr(a, b):
    a, b = a.float(), b.float()
    return (10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean().clamp_min(1e-30))).item()
for g in GS:
    for m in MS:
        x = torch.randn(m, 4096, dtype=torch.bfloat16, generator=gen)
        outs = {k: call(k, mod, x, g) for k, mod in mods.items()}
        ref = outs[rev]
        agree = min(sqnr(torch.cat(ref), torch.cat(o)) for k, o in outs.items() if k != rev) if len(outs) > 1 else 0
        r = {k: [] for k in mods}
        for _ in range(ROUNDS):
            for k, mod in mods.items():
                t0 = time.perf_counter(); call(k, mod, x, g); r[k].append(time.perf_counter() - t0)
        print(f"g{g} M={m:<2}: " + "  ".join(f"{k} {st.median(v)*1e3:6.2f}" for k, v in r.items()) + f"  ms; min SQNR vs {rev} {agree:.1f} dB", flush=True)
