"""Float8 weight-only, bf16 x above M = 32: the working tree's fp8_cpu (gemm_bf16: panels converted inside the
GEMM) against HEAD's (the chunked convert + at::mm path), both built here under other module names, and bf16
F.linear, one process, interleaved medians. Run from the repo root before committing the change:
  .venv/bin/python benchmarks/results/avx512_zen4/scratch/fp8_gemm_bf16_vs_head.py [reps]"""
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from lowbit.eval.demo import _paired_medians

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
head = Path("/tmp/head_csrc_fp8")
head.mkdir(exist_ok=True)
for f in subprocess.run(["git", "ls-files", "lowbit/kernels/csrc"], capture_output=True, text=True).stdout.split():
    (head / Path(f).name).write_text(subprocess.run(["git", "show", f"HEAD:{f}"], capture_output=True, text=True).stdout)
flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi"]
mods = {}
for tag, src in (("head", head), ("tree", Path("lowbit/kernels/csrc").resolve())):
    d = Path(f"/tmp/ab_fp8_cpu_{tag}")
    d.mkdir(exist_ok=True)
    mods[tag] = load(f"lowbit_fp8_cpu_{tag}", [str(src / "fp8_cpu.cpp")], extra_include_paths=[str(src)], extra_cflags=flags,
                     build_directory=str(d))
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
cases = {"4096x4096": [(4096, 4096)],
         "SmolLM2 layer (q,k,v,o,gate,up,down)": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]}
torch.manual_seed(0)
for name, shapes in cases.items():
    ws, wb = [], []
    for n, k in shapes:
        w = torch.randn(n, k)
        s = w.abs().amax(1, keepdim=True) / 448
        q = (w / s).to(torch.float8_e4m3fn)
        ws.append((q, s))
        wb.append((q.float() * s).bfloat16())
    for m in (64, 128, 256):
        xs = [torch.randn(m, k).bfloat16() for _, k in shapes]
        fns = {tag: (lambda mod=mod: [mod.fp8_linear(x, q, s, None, 4, 32, 256) for x, (q, s) in zip(xs, ws)]) for tag, mod in mods.items()}
        fns["bf16"] = lambda: [F.linear(x, w) for x, w in zip(xs, wb)]
        med = {k: v * 1e3 for k, v in _paired_medians(fns, reps).items()}  # make demo's interleaved medians
        print(f"{name:38s} M={m:4d}  " + "  ".join(f"{k} {v:7.3f} ({med['bf16'] / v:.2f}x)" for k, v in med.items()), flush=True)
