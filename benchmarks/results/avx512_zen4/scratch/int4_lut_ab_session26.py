# Session 26 (2026-12-06): int4 weight-only, bf16 x, 8 x 4096^2: REV's gemv_bf16 / gemm_small_bf16 (nibbles as bf16 128 + q,
# the offset removed after the sums) against the working tree's (nibbles looked up as bf16 q - zp), both built here,
# interleaved rounds, medians; zero points: "asym" int8 in [0, 16), "sym" none, "fzp" float32.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_lut_ab_session26.py REV
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
mods = {}
for tag, src in ((rev, old), ("tree", Path("lowbit/kernels/csrc").resolve())):
    d = Path(f"/tmp/ab_int4lut_{tag}"); d.mkdir(exist_ok=True)
    mods[tag] = load(f"lowbit_int4lut_{tag}", [str(src / f"{build.source}.cpp")], extra_include_paths=[str(src)],
                     extra_cflags=flags, build_directory=str(d))
gen = torch.Generator().manual_seed(0)
MS = [int(v) for v in os.environ.get("MS", "1,2,4,8,12,16").split(",")]
GS = [int(v) for v in os.environ.get("GS", "32,64,128").split(",")]
KINDS = os.environ.get("KINDS", "asym,sym").split(",")
ROUNDS = int(os.environ.get("ROUNDS", "7"))
print("threads", torch.get_num_threads(), "rev", rev, flush=True)
def weight(g, kind):
    q = torch.randint(0, 256, (4096, 2048), dtype=torch.uint8, generator=gen)
    s = torch.rand(4096, 4096 // g, generator=gen) / 100 + 1e-3
    z = {"asym": lambda: torch.randint(0, 16, (4096, 4096 // g), dtype=torch.int8, generator=gen), "sym": lambda: None,
         "fzp": lambda: torch.rand(4096, 4096 // g, generator=gen) * 15}[kind]()
    return q, s, z
def call(mod, x, ws):
    f = mod.gemv_bf16 if x.shape[0] <= 8 else mod.gemm_small_bf16
    return [f(x, q, s, z, None) for q, s, z in ws]
def sqnr(a, b):
    a, b = a.float(), b.float()
    return (10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean().clamp_min(1e-30))).item()
for kind in KINDS:
    for g in GS:
        ws = [weight(g, kind) for _ in range(8)]
        for m in MS:
            x = torch.randn(m, 4096, dtype=torch.bfloat16, generator=gen)
            outs = {k: torch.cat(call(mod, x, ws)) for k, mod in mods.items()}
            agree = sqnr(outs[rev], outs["tree"])
            r = {k: [] for k in mods}
            for _ in range(ROUNDS):
                for k, mod in mods.items():
                    t0 = time.perf_counter(); call(mod, x, ws); r[k].append(time.perf_counter() - t0)
            meds = {k: st.median(v) * 1e3 for k, v in r.items()}
            print(f"{kind:4} g{g:<3} M={m:<2} {'gemv' if m <= 8 else 'small'}: " + "  ".join(f"{k} {v:6.2f}" for k, v in meds.items())
                  + f"  ms; tree/rev {meds['tree'] / meds[rev]:.3f}; SQNR tree vs rev {agree:.1f} dB", flush=True)
