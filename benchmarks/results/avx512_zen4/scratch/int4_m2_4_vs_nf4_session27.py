# Int4 g128 (asymmetric, Int4WeightOnlyConfig's default) at M = 1..8 through the module against bnb nf4 (blocks of 64)
# and bf16, 8 x 4096^2, and the int4 kernels directly (gemv_bf16, gemm_small_bf16, gemm_rows_bf16) on the same weights;
# one process, interleaved, medians, ms. usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python <this file> [Ms]
import statistics as st, sys, time, warnings
import torch
from torch import nn
import bitsandbytes as bnb
from lowbit.configs import Int4WeightOnlyConfig
from lowbit.kernels import _ext, hugepages
from lowbit.quantize import quantize_
warnings.filterwarnings("ignore")
torch.manual_seed(0)
e4 = _ext.load("int4_cpu")
print("threads", torch.get_num_threads())
K = N = 4096
base = [nn.Linear(K, N, bias=False).bfloat16() for _ in range(8)]
bf16 = nn.Sequential(*base).eval()
ours = nn.Sequential(*[quantize_(nn.Linear(K, N, bias=False).bfloat16(), Int4WeightOnlyConfig(group_size=128)) for _ in range(8)])
for o, b in zip(ours, base):
    o.weight  # quantized separately: same shapes and bytes, values do not matter for time
nf4 = []
for b in base:
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(b.weight.data.clone(), requires_grad=False, quant_type="nf4")
    nf4.append(q.to("cpu"))
nf4 = nn.Sequential(*nf4).eval()
hugepages.advise_all([b.weight for b in base])
ws = [(l.weight.qdata, l.weight.scale, l.weight.zero_point) for l in ours]
Ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 3, 4, 6, 8]
def tm(f, n=7):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
for M in Ms:
    x = torch.randn(M, K, dtype=torch.bfloat16)
    runs = {"bf16": lambda: bf16(x), "int4": lambda: ours(x), "nf4": lambda: nf4(x),
            "gemv": lambda: [e4.gemv_bf16(x, q, s, z, None) for q, s, z in ws],
            "small": lambda: [e4.gemm_small_bf16(x, q, s, z, None) for q, s, z in ws],
            "rows": lambda: [e4.gemm_rows_bf16(x, q, s, z, None) for q, s, z in ws]}
    r = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(5):
            for k, f in runs.items():
                r[k].append(tm(f))
    med = {k: st.median(v) for k, v in r.items()}
    print(f"M={M}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()) + f"  | int4/nf4 time {med['int4']/med['nf4']:.2f}", flush=True)
