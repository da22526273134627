# NOT KEPT: needs int8_int4_xlanes_session27_not_kept.patch (git apply) for set_xlanes_min_m; results in _not_kept.txt.
# 8da4w (int8 dynamic activations x int4 weights) at M = 9..16: the x-lanes path (rows of x as the 16 lanes, the weight
# read as it lies; set_xlanes_min_m(9)) against the 64-row panels packed per call (set_xlanes_min_m(17)), and bf16
# F.linear, through the C++ entry int8_int4_dynamic_linear; one process, interleaved, medians, ms. Also: equal bits.
# usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python benchmarks/results/avx512_zen4/scratch/int8_int4_xlanes_session27.py
import statistics as st, sys, time
import torch, torch.nn.functional as F
from lowbit.kernels import _ext, hugepages
from lowbit.primitives.packing import pack_int4
ext = _ext.load("int8_int4")
torch.manual_seed(0)
print("threads", torch.get_num_threads())
shapes = {"8x4096^2": [(4096, 4096)] * 8, "smollm2 x4": [(1536, 576), (576, 1536), (576, 576)] * 4}
Ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [9, 12, 16]
def tm(f, n=5):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
keep = ext.get_xlanes_min_m()
for name, sh in shapes.items():
    for gs in (32, 128):
        if any(k % gs for _, k in sh):
            continue
        ws = [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8)), torch.rand(n, k // gs) / 50, torch.randn(n, k).bfloat16())
              for n, k in sh]
        hugepages.advise_all([q for q, _, _ in ws] + [b for _, _, b in ws])
        for M in Ms:
            xs = [torch.randn(M, k, dtype=torch.bfloat16) for _, k in sh]
            def run(way):
                if way == "bf16":
                    return [F.linear(x, b) for x, (_, _, b) in zip(xs, ws)]
                ext.set_xlanes_min_m(9 if way == "xlanes" else 17)
                return [ext.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-5) for x, (q, s, _) in zip(xs, ws)]
            same = all(torch.equal(a, b) for a, b in zip(run("xlanes"), run("panels")))
            r = {k: [] for k in ("xlanes", "panels", "bf16")}
            for _ in range(5):
                for k in r:
                    r[k].append(tm(lambda: run(k)))
            med = {k: st.median(v) for k, v in r.items()}
            print(f"{name} g{gs} M={M}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
                  + f"  | bf16/xlanes {med['bf16']/med['xlanes']:.2f}x bf16/panels {med['bf16']/med['panels']:.2f}x  equal {same}", flush=True)
ext.set_xlanes_min_m(keep)
