# Int4 weight-only (g128, asymmetric int8 zero point: Int4WeightOnlyConfig's default), bf16 x, M = 9..96: gemm_rows_bf16
# (4 weight rows dequantized once into a scratch for every row of x) against gemm_small_bf16 (M <= 64), gemm_bf16 and
# bf16 F.linear, in one process, interleaved, medians; and what the route runs (int4_weight_only_linear through the
# module). usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_rows_gemm_session27.py [Ms]
import statistics as st, sys, time
import torch, torch.nn.functional as F
from lowbit.kernels import _ext, hugepages
from lowbit.configs import Int4WeightOnlyConfig
from lowbit.quantize import quantize_
ext = _ext.load("int4_cpu")
torch.manual_seed(0)
print("threads", torch.get_num_threads(), "cpu", open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t"))
shapes = {"8x4096^2": [(4096, 4096)] * 8, "smollm2 x4": [(1536, 576), (576, 1536), (576, 576)] * 4}
Ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [9, 12, 16, 20, 24, 32, 48, 64]
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
for name, sh in shapes.items():
    mods = []
    for n, k in sh:
        lin = torch.nn.Linear(k, n, bias=False).bfloat16()
        ref = torch.nn.Linear(k, n, bias=False).bfloat16()
        ref.weight.data.copy_(lin.weight.data)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128))
        mods.append((lin, ref))
    ws = [(m.weight.qdata, m.weight.scale, m.weight.zero_point) for m, _ in mods]
    hugepages.advise_all([r.weight for _, r in mods])
    for M in Ms:
        xs = [torch.randn(M, k, dtype=torch.bfloat16) for n, k in sh]
        runs = {"rows": lambda: [ext.gemm_rows_bf16(x, q, s, z, None) for x, (q, s, z) in zip(xs, ws)],
                "gemm_bf16": lambda: [ext.gemm_bf16(x, q, s, z, None) for x, (q, s, z) in zip(xs, ws)],
                "route": lambda: [m(x) for x, (m, _) in zip(xs, mods)],
                "bf16": lambda: [r(x) for x, (_, r) in zip(xs, mods)]}
        if M <= 64:
            runs["small"] = lambda: [ext.gemm_small_bf16(x, q, s, z, None) for x, (q, s, z) in zip(xs, ws)]
        with torch.inference_mode():
            a, b, c = runs["rows"](), runs["gemm_bf16"](), runs["bf16"]()
            err = max(((p.float() - q.float()).norm() / q.float().norm()).item() for p, q in zip(a, b))
            r = {k: [] for k in runs}
            for _ in range(5):
                for k, f in runs.items():
                    r[k].append(t(f))
        med = {k: st.median(v) for k, v in r.items()}
        print(f"{name} M={M}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f"  | bf16/rows {med['bf16']/med['rows']:.2f}x bf16/gemm {med['bf16']/med['gemm_bf16']:.2f}x bf16/route {med['bf16']/med['route']:.2f}x"
              + (f" bf16/small {med['bf16']/med['small']:.2f}x" if "small" in med else "") + f"  rel.diff rows-gemm {err:.1e}", flush=True)
