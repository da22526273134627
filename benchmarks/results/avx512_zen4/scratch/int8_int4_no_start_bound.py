"""Upper bound of what removing 8da4w's per-group accumulator start would buy at large M: the working tree's
int8_int4 against a copy whose LB_START zeroes the accumulators instead of the vpmaddwd start (wrong values,
timing only), both built here under other module names, one process, medians of 3 rounds of 5 calls.
  .venv/bin/python benchmarks/results/avx512_zen4/scratch/int8_int4_no_start_bound.py"""
import statistics
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from lowbit.primitives.packing import pack_int4

src = Path("lowbit/kernels/csrc").resolve()
patched = Path("/tmp/csrc_no_start")
patched.mkdir(exist_ok=True)
for f in src.iterdir():
    text = f.read_text()
    if f.name == "int8_int4.cpp":
        old = "#define LB_START(i, j) LB_ON(i, j) p##i##j = _mm512_madd_epi16(su##j, cr##i);"
        assert old in text
        text = text.replace(old, "#define LB_START(i, j) LB_ON(i, j) p##i##j = _mm512_setzero_si512();")
    (patched / f.name).write_text(text)
flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
mods = {}
for tag, d in (("tree", src), ("no_start", patched)):
    b = Path(f"/tmp/ab_i8i4_{tag}")
    b.mkdir(exist_ok=True)
    mods[tag] = load(f"lowbit_int8_int4_{tag}", [str(d / "int8_int4.cpp")], extra_include_paths=[str(d)], extra_cflags=flags,
                     build_directory=str(b))
gen = torch.Generator().manual_seed(0)
print("threads", torch.get_num_threads())
for g in (32, 128):
    ws = [(pack_int4(torch.randint(-8, 8, (4096, 4096), dtype=torch.int8, generator=gen)), torch.rand(4096, 4096 // g) / 100)
          for _ in range(2)]
    x = torch.randn(256, 4096, dtype=torch.bfloat16)
    wb = torch.randn(4096, 4096, dtype=torch.bfloat16)
    fns = {k: (lambda mod=mod: [mod.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-5) for q, s in ws]) for k, mod in mods.items()}
    fns["bf16 (2 layers)"] = lambda: [torch.nn.functional.linear(x, wb) for _ in range(2)]
    r = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            f()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            r[k].append(statistics.median(ts))
    med = {k: statistics.median(v) * 1e3 for k, v in r.items()}
    print(f"g{g} M=256, 2 x 4096^2: " + "  ".join(f"{k} {v:.2f} ms ({med['bf16 (2 layers)'] / v:.2f}x bf16)" for k, v in med.items()))
