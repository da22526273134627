# W8A8 (dynamic and static) at M=256 on one Linear(4096, 4096), torch.compile with inductor freezing, against bf16
# compiled the same way, and eager against eager; medians of 3 interleaved rounds of 7-call medians.
# Run from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/w8a8_compiled_m256.py
import copy, statistics as st, time

import torch
from torch import nn

from lowbit.configs import Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig
from lowbit.quantize import quantize_

torch.manual_seed(0)
base = nn.Linear(4096, 4096, bias=False).bfloat16()
x = torch.randn(256, 4096, dtype=torch.bfloat16)
dyn = quantize_(copy.deepcopy(base), Int8DynamicActivationInt8WeightConfig())
stat = quantize_(copy.deepcopy(base), Int8StaticActivationInt8WeightConfig(act_scale=float(x.abs().amax().float()) / 127))


def t(f, n=7):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3


with torch.no_grad(), torch._inductor.config.patch(freezing=True):
    fns = {}
    for name, m in (("bf16", base), ("w8a8 dynamic", dyn), ("w8a8 static", stat)):
        fns[f"{name} eager"] = m
        c = torch.compile(m, fullgraph=True)
        c(x)
        fns[f"{name} compiled"] = c
    r = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            r[k].append(t(lambda: f(x)))
    ms = {k: st.median(v) for k, v in r.items()}
print("threads", torch.get_num_threads())
for k, v in ms.items():
    mode = k.rsplit(" ", 1)[1]
    print(f"{k}: {v:.2f} ms  ({ms['bf16 ' + mode] / v:.2f}x bf16 {mode})")
