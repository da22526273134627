# A/B in one process: a quantized nn.Linear's eager no-grad CPU call above the GEMV, with the session 27 path (the
# custom op's CPU body called directly) and without it (the module's wants_grad patched to True for the "op" runs,
# which sends the call through the custom op as before). us per call, medians of 7 interleaved runs of 400 calls.
# usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python benchmarks/results/avx512_zen4/scratch/custom_op_skip_ab_session27.py
import statistics as st, time, warnings
import torch
import lowbit.kernels.int4 as k4
import lowbit.kernels.int8 as k8
from lowbit.configs import Int4WeightOnlyConfig, Int8WeightOnlyConfig
from lowbit.quantize import quantize_
warnings.filterwarnings("ignore")
print("threads", torch.get_num_threads())
def tm(f, n=400):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e6
real4, real8 = k4.wants_grad, k8.wants_grad
for k, n in [(576, 576), (576, 1536), (1536, 576)]:
    for M in (24, 64):
        x = torch.randn(M, k, dtype=torch.bfloat16)
        mods = {"int4 g64": quantize_(torch.nn.Linear(k, n, bias=False).bfloat16(), Int4WeightOnlyConfig(group_size=64)),
                "int8": quantize_(torch.nn.Linear(k, n, bias=False).bfloat16(), Int8WeightOnlyConfig())}
        r = {(name, way): [] for name in mods for way in ("direct", "op")}
        with torch.inference_mode():
            for _ in range(7):
                for (name, way) in r:
                    k4.wants_grad = k8.wants_grad = (lambda *a: True) if way == "op" else real4
                    r[(name, way)].append(tm(lambda: mods[name](x)))
                    k4.wants_grad, k8.wants_grad = real4, real8
        print(f"{k}->{n} M={M}: " + "  ".join(f"{name} {way} {st.median(v):.1f}" for (name, way), v in r.items()), flush=True)
