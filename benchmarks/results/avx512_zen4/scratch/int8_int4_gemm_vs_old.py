# 8da4w's large-M path: the 64-row-panel 3 x 64 tile GEMM (csrc/int8_int4.cpp as committed with this script)
# against the 16-row-panel 8 x 16 one it replaced (git show 58a6440:lowbit/kernels/csrc/int8_int4.cpp, built
# here under another module name), and bf16 F.linear, in one process: medians of 3 interleaved rounds of 5-call
# medians. Run from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int8_int4_gemm_vs_old.py
import os, subprocess, statistics as st, time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4

CSRC = Path("lowbit/kernels/csrc").resolve()
old_dir = Path("/tmp/old44")
old_dir.mkdir(exist_ok=True)
(old_dir / "int8_int4_old.cpp").write_text(subprocess.run(["git", "show", "58a6440:lowbit/kernels/csrc/int8_int4.cpp"],
                                                         capture_output=True, text=True, check=True).stdout)
old = load("lowbit_int8_int4_old", [str(old_dir / "int8_int4_old.cpp")], extra_include_paths=[str(CSRC)],
           extra_cflags=["-O3", "-std=c++20", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
           build_directory=str(old_dir), verbose=False)
new = _ext.load("int8_int4")
import sys
variants = {}
for rv in sys.argv[1:]:  # e.g. 3x4 4x2: tiles of rows x zmm, built from the working tree's source
    r, v = rv.split("x")
    d = Path(f"/tmp/i44_{rv}")
    d.mkdir(exist_ok=True)
    variants[rv] = load(f"lowbit_int8_int4_{r}_{v}", [str(CSRC / "int8_int4.cpp")], extra_include_paths=[str(CSRC)],
                        extra_cflags=["-O3", "-std=c++20", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                      f"-DLOWBIT_I4_ROWS={r}", f"-DLOWBIT_I4_VECS={v}"], build_directory=str(d))
print("threads", torch.get_num_threads())


def t(f, n=5):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3


mods = {"new": new, "old": old, **variants}
for g in (32, 128):
    for (m, n, k, layers) in [(32, 4096, 4096, 8), (64, 4096, 4096, 4), (256, 4096, 4096, 1), (256, 576, 576, 1),
                              (256, 1536, 576, 1), (256, 576, 1536, 1), (256, 192, 576, 1)]:
        if k % g:
            continue
        gen = torch.Generator().manual_seed(0)
        ws = [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)), torch.rand(n, k // g) / 100)
              for _ in range(layers)]
        wb = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(layers)]
        x = torch.randn(m, k, dtype=torch.bfloat16)
        args = (-128, 127, 1e-5)
        outs = {name: [mod.int8_int4_dynamic_linear(x, q, s, None, *args) for q, s in ws] for name, mod in mods.items()}
        same = all(all(torch.equal(u, v) for u, v in zip(o, outs["old"])) for o in outs.values())
        r = {name: [] for name in [*mods, "bf16"]}
        for _ in range(3):
            for name, mod in mods.items():
                r[name].append(t(lambda: [mod.int8_int4_dynamic_linear(x, q, s, None, *args) for q, s in ws]))
            r["bf16"].append(t(lambda: [F.linear(x, w) for w in wb]))
        ms = {name: st.median(v) for name, v in r.items()}
        print(f"g{g} {layers} x M={m} N={n} K={k}: " + "  ".join(
            f"{name} {v:.3f} ms ({ms['bf16'] / v:.2f}x)" for name, v in ms.items()) + f"; outputs equal: {same}")
