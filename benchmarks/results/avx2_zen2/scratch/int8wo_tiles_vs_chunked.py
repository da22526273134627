# Int8 weight-only on the AVX2 build at M = 16..256: the C++ GEMV's register tiles (the cap _EXT_MAX_M_AVX2 raised
# to 256) against the chunked path (cap 16: the weight converted in chunks, float32 at::mm), bf16 x, 64 MiB of int8
# weights per shape, 2 threads, medians of 7, both through int8_weight_only_linear_any as the tensor layer calls it.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int8wo_tiles_vs_chunked.py
import torch, time, statistics, lowbit, torch.nn as nn, sys
from lowbit.configs import Int8WeightOnlyConfig
from lowbit.kernels import int8 as k8
torch.set_num_threads(2); torch.set_grad_enabled(False)
def t(f, n=7):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
for K, N in ((2048, 2048), (4096, 4096), (576, 1536), (1536, 576)):
    torch.manual_seed(0)
    L = max(1, (64 << 20) // (K * N))
    layers = [nn.Linear(K, N, bias=False, dtype=torch.bfloat16) for _ in range(L)]
    for l in layers: lowbit.quantize_(l, Int8WeightOnlyConfig())
    for M in (16, 24, 32, 48, 64, 128, 192, 256):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        res = []
        for cap in (16, 256):
            k8._EXT_MAX_M_AVX2 = cap
            for l in layers: l.weight.__dict__.pop("_lowbit_plan", None)
            res.append(t(lambda: [k8.int8_weight_only_linear_any(x, l.weight.qdata, l.weight.scale, None, None, l.weight.spec, "auto") for l in layers]))
        print(f"{L} x ({N},{K}) M={M}: chunked {res[0]:.2f} ms  tiles {res[1]:.2f} ms  ratio {res[0]/res[1]:.2f}", flush=True)
