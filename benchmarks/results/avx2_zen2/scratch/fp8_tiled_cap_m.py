# The float8 kernel's tiled path against the chunked path above M = 32, weight-only and with dynamic float8
# activations (one call each, the cap passed as tiled_max_m = 32 or 256; above the cap x goes in as float32 and
# the output comes back to bf16, as _fp8_cpu's wrapper does on a CPU without native bf16 matmul): ms per call set,
# medians of interleaved rounds, bf16 x; llama1b-like 2 x 4096^2, SmolLM2-like 8 x (1536, 576) + 8 x (576, 1536).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/fp8_tiled_cap_m.py [threads] [rounds]
import statistics as st, sys, time

import torch

from lowbit.kernels import _ext, _fp8_cpu

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
torch.set_num_threads(threads)
ext = _ext.load("fp8_cpu")
print("threads", torch.get_num_threads(), "isa", _ext.active_isa("fp8_cpu"))
gen = torch.Generator().manual_seed(0)
shapes = {"2 x 4096^2": [(4096, 4096)] * 2, "8 x 1536x576 + 8 x 576x1536": [(1536, 576)] * 8 + [(576, 1536)] * 8}
for name, shp in shapes.items():
    ws = [((torch.randn(n, k, generator=gen) * 8).to(torch.float8_e4m3fn), torch.rand(n, 1) / 100) for n, k in shp]
    for m in (33, 48, 64, 96, 128, 192):
        res = {}
        for kind in ("wo", "act"):
            xs = {k: torch.randn(m, k, generator=gen).bfloat16() for k in {k for _, k in shp}}

            def call(cap, kind=kind, xs=xs):
                for q, s in ws:
                    x = xs[q.shape[1]]
                    if cap < m:
                        x = x.float()
                    if kind == "wo":
                        y = ext.fp8_linear(x, q, s, None, 4, cap, 256, False)
                    else:
                        y = ext.fp8_linear_act(x, q, s, None, 4, cap, 256, True, 1e-12, False, False)
                    y.bfloat16()
            t = {32: [], 256: []}
            for i in range(rounds):
                for cap in ((32, 256) if i % 2 == 0 else (256, 32)):
                    t0 = time.perf_counter(); call(cap); t[cap].append(time.perf_counter() - t0)
            res[kind] = (st.median(t[32]) * 1e3, st.median(t[256]) * 1e3)
        print(f"{name} M={m}: weight-only chunked {res['wo'][0]:.2f} tiled {res['wo'][1]:.2f} ms ({res['wo'][0] / res['wo'][1]:.2f}x)"
              f" | dynamic act chunked {res['act'][0]:.2f} tiled {res['act'][1]:.2f} ms ({res['act'][0] / res['act'][1]:.2f}x)")
