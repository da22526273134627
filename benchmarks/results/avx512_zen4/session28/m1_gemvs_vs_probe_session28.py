# Session 28: the M = 1 GEMVs (8 x 4096^2, bf16 x, through quantize_ + nn.Linear, 2 threads; medians of 7 interleaved
# rounds) against two DRAM probes in the same process: 1 GiB of float32 summed on 4 KiB pages (before the GEMVs) and
# benchmarks/roofline.py dram_bandwidth, on 2 MiB pages as the weights are (after).
# usage, from the repo root: LOWBIT_ISA=avx2|avx512 .venv/bin/python <this>
import time, statistics as st, torch, torch.nn as nn, lowbit
from lowbit.kernels import _ext
torch.manual_seed(0)
def stack(cfg):
    m = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(8)]).bfloat16().eval()
    if cfg is not None: lowbit.quantize_(m, cfg)
    return m
ms = {"bf16": stack(None), "int8wo": stack(lowbit.Int8WeightOnlyConfig()), "int4 g128": stack(lowbit.Int4WeightOnlyConfig(group_size=128)),
      "8da4w": stack(lowbit.Int8DynamicActivationInt4WeightConfig())}
print({k: _ext.active_isa(k) for k in ("int8_gemv", "int4_cpu", "int8_int4")})
x = torch.randn(1, 4096).bfloat16()
def run(m):
    with torch.inference_mode():
        for l in m: l(x)
def probe_4k():
    t = torch.ones(2**28); t.sum(); ts = []
    for _ in range(5):
        t0 = time.perf_counter(); t.sum(); ts.append(time.perf_counter() - t0)
    return round(t.nbytes / st.median(ts) / 1e9, 1)
probe4k = probe_4k()
r = {k: [] for k in ms}
for _ in range(7):
    for k, m in ms.items():
        run(m); t0 = time.perf_counter(); run(m); r[k].append(time.perf_counter() - t0)
def wbytes(m):
    tot = 0
    for l in m:
        w = l.weight
        names = getattr(w, "tensor_data_names", ()) + getattr(w, "optional_tensor_data_names", ())
        tot += sum(getattr(w, n).nbytes for n in names if getattr(w, n) is not None) if names else w.nbytes
    return tot
import sys; sys.path.insert(0, "benchmarks"); from roofline import dram_bandwidth
print("probe GB/s (4 KiB pages, before)", probe4k, " roofline probe (2 MiB pages, after)", round(dram_bandwidth(torch.get_num_threads()), 1))
for k in ms:
    med = st.median(r[k]); print(k, round(med * 1e3, 2), "ms", round(wbytes(ms[k]) / med / 1e9, 1), "GB/s")
