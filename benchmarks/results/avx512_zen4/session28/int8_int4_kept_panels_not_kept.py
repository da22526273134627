# Session 28 scratch: what 8da4w's VNNI panels would run at if they were made once (at load) instead of per call.
# Needs int8_int4_kept_panels_not_kept.patch (git apply): LOWBIT_I4_PANEL_CACHE=0 packs per call (the shipped path), =1 keeps
# the transposed packed bytes (the canonical bytes' size) and splits nibbles per call, =2 keeps the split panels
# (2x the bytes). 8 x Linear(4096, 4096), bf16 x, through int8_int4_dynamic_linear; one process, interleaved, medians, ms.
# usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python benchmarks/results/avx512_zen4/session28/int8_int4_kept_panels.py [Ms]
import os, statistics as st, sys, time
import torch, torch.nn.functional as F
from lowbit.kernels import _ext, hugepages
from lowbit.primitives.packing import pack_int4
ext = _ext.load("int8_int4")
torch.manual_seed(0)
print("threads", torch.get_num_threads(), "isa", _ext.active_isa("int8_int4"), flush=True)
Ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [9, 16, 32, 256]
def tm(f, n=3):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
for gs in (32, 128):
    ws = [(pack_int4(torch.randint(-8, 8, (4096, 4096), dtype=torch.int8)), torch.rand(4096, 4096 // gs) / 50,
           torch.randn(4096, 4096).bfloat16()) for _ in range(8)]
    hugepages.advise_all([q for q, _, _ in ws] + [b for _, _, b in ws])
    for M in Ms:
        xs = [torch.randn(M, 4096, dtype=torch.bfloat16) for _ in ws]
        def run(way):
            if way == "bf16":
                return [F.linear(x, b) for x, (_, _, b) in zip(xs, ws)]
            os.environ["LOWBIT_I4_PANEL_CACHE"] = way[-1]
            return [ext.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-5) for x, (q, s, _) in zip(xs, ws)]
        outs = {w: run(w) for w in ("mode0", "mode1", "mode2")}
        same = all(torch.equal(a, b) for w in ("mode1", "mode2") for a, b in zip(outs["mode0"], outs[w]))
        r = {k: [] for k in ("mode0", "mode1", "mode2", "bf16")}
        for _ in range(5):
            for k in r:
                r[k].append(tm(lambda: run(k)))
        med = {k: st.median(v) for k, v in r.items()}
        print(f"g{gs} M={M}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
              + "  | vs bf16: " + " ".join(f"{k} {med['bf16']/med[k]:.2f}x" for k in ("mode0", "mode1", "mode2"))
              + f"  equal {same}", flush=True)
