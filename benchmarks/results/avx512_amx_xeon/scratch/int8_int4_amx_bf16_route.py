# 8da4w on one Linear(4096, 4096) bf16, eager, 2 threads: the AMX bf16 route (int8_int4's set_amx(True)) against
# the VNNI paths (set_amx(False)) and bf16 F.linear, interleaved rounds, medians; SQNR against the reference kernel.
# python benchmarks/results/avx512_amx_xeon/scratch/int8_int4_amx_bf16_route.py [M ...]
import copy, sys, time
import torch
import lowbit
from lowbit.eval import sqnr
from lowbit.kernels import _ext
from lowbit.kernels.preference import KernelPreference

torch.set_num_threads(2)
e = _ext.load("int8_int4")
K = N = 4096
lin = torch.nn.Linear(K, N, bias=True).bfloat16()
Ms = [int(a) for a in sys.argv[1:]] or [16, 32, 64, 128, 256]
mods = {}
for g in (32, 128):
    m = copy.deepcopy(lin); lowbit.quantize_(m, lowbit.Int8DynamicActivationInt4WeightConfig(group_size=g)); mods[g] = m
    r = copy.deepcopy(lin); lowbit.quantize_(r, lowbit.Int8DynamicActivationInt4WeightConfig(group_size=g, kernel=KernelPreference.REFERENCE)); mods[f"ref{g}"] = r


def once(f):
    a = time.perf_counter(); f(); return time.perf_counter() - a


print(time.strftime("%c"), "threads", torch.get_num_threads())
with torch.inference_mode():
    for M in Ms:
        x = torch.randn(M, K).bfloat16()
        runs = {"bf16": lambda: lin(x)}
        for g in (32, 128):
            runs[f"g{g} amx"] = (lambda g=g: (e.set_amx(True), mods[g](x)))
            runs[f"g{g} vnni"] = (lambda g=g: (e.set_amx(False), mods[g](x)))
        ts = {k: [] for k in runs}
        for f in runs.values(): f()
        for _ in range(9):
            for k, f in runs.items(): ts[k].append(once(f))
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
        line = f"M={M:4d} bf16 {med['bf16']:.2f} ms"
        for g in (32, 128):
            e.set_amx(True); ya = mods[g](x); e.set_amx(False); yv = mods[g](x); e.set_amx(True)
            ref = mods[f"ref{g}"](x)
            line += (f" | g{g} amx {med[f'g{g} amx']:.2f} ({med['bf16'] / med[f'g{g} amx']:.2f}x) vnni {med[f'g{g} vnni']:.2f}"
                     f" ({med['bf16'] / med[f'g{g} vnni']:.2f}x) sqnr vs ref {sqnr(ref, ya):.1f} / {sqnr(ref, yv):.1f}")
        print(line, flush=True)
