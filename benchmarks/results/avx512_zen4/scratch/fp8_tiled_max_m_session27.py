# Float8 weight-only (e4m3fn, per-row scale), bf16 x, M = 24..96: the tiled path (4 weight rows converted once into a
# scratch for every row of x) against gemm_bf16 (the route above _fp8_cpu.TILED_MAX_M = 32), chosen per call by the
# kernel's tiled_max_m argument, and bf16 F.linear; one process, interleaved, medians, ms.
# usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python benchmarks/results/avx512_zen4/scratch/fp8_tiled_max_m_session27.py [Ms]
import statistics as st, sys, time
import torch, torch.nn.functional as F
from lowbit.kernels import _ext, _fp8_cpu, hugepages
ext = _ext.load("fp8_cpu")
torch.manual_seed(0)
print("threads", torch.get_num_threads())
shapes = {"8x4096^2": [(4096, 4096)] * 8, "smollm2 x4": [(1536, 576), (576, 1536), (576, 576)] * 4}
Ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [24, 32, 40, 48, 64, 96]
def tm(f, n=5):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
for name, sh in shapes.items():
    ws = []
    for n, k in sh:
        w = torch.randn(n, k) / 8
        s = w.abs().amax(1, keepdim=True) / 448
        ws.append(((w / s).to(torch.float8_e4m3fn), s, w.bfloat16()))
    hugepages.advise_all([q for q, _, _ in ws] + [b for _, _, b in ws])
    for M in Ms:
        xs = [torch.randn(M, k, dtype=torch.bfloat16) for _, k in sh]
        runs = {"tiled": lambda: [ext.fp8_linear(x, q, s, None, _fp8_cpu.GEMV_MAX_M, 10**6, _fp8_cpu.CHUNK_ROWS, False) for x, (q, s, _) in zip(xs, ws)],
                "gemm_bf16": lambda: [ext.fp8_linear(x, q, s, None, _fp8_cpu.GEMV_MAX_M, 1, _fp8_cpu.CHUNK_ROWS, False) for x, (q, s, _) in zip(xs, ws)],
                "bf16": lambda: [F.linear(x, b) for x, (_, _, b) in zip(xs, ws)]}
        r = {k: [] for k in runs}
        for _ in range(5):
            for k, f in runs.items():
                r[k].append(tm(f))
        med = {k: st.median(v) for k, v in r.items()}
        print(f"{name} M={M}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f"  | bf16/tiled {med['bf16']/med['tiled']:.2f}x bf16/gemm {med['bf16']/med['gemm_bf16']:.2f}x", flush=True)
