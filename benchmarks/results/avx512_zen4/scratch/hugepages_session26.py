# Session 26 (2026-12-06): the decode GEMVs at M = 1 and 4 (8 x 4096^2 through quantize_ + nn.Linear, bf16 x) on the same
# weights with their buffers on 4 KiB pages ("plain") and collapsed into 2 MiB huge pages (lowbit.kernels.hugepages.advise),
# bf16 F.linear likewise, one process, interleaved rounds, medians; the DRAM probe (roofline.dram_bandwidth, 2 threads)
# before and after. LOWBIT_HUGEPAGES=0 keeps quantize_ and the plans from advising the "plain" copies themselves.
# usage, from the repo root: LOWBIT_HUGEPAGES=0 .venv/bin/python benchmarks/results/avx512_zen4/scratch/hugepages_session26.py
import copy, os, statistics as st, sys, time
import torch
sys.path.insert(0, "benchmarks")
import roofline as R
import lowbit
from lowbit.kernels import hugepages
assert os.environ.get("LOWBIT_HUGEPAGES") == "0", "run with LOWBIT_HUGEPAGES=0 (the plain copies must stay plain)"
torch.manual_seed(0)
ROUNDS = int(os.environ.get("ROUNDS", "9"))
print("threads", torch.get_num_threads(), flush=True)
base = R._bf16_stack(8)
configs = {"bf16": None, "int4 g128": lowbit.Int4WeightOnlyConfig(group_size=128), "int8 weight-only": lowbit.Int8WeightOnlyConfig(),
           "float8 weight-only": lowbit.Float8WeightOnlyConfig(), "8da4w g32": lowbit.Int8DynamicActivationInt4WeightConfig(group_size=32),
           "W8A8 dynamic": lowbit.Int8DynamicActivationInt8WeightConfig()}
def advise_model(m):
    os.environ["LOWBIT_HUGEPAGES"] = "1"
    n = 0
    for p in m.parameters():
        n += hugepages.advise(p.data) if type(p.data) is torch.Tensor else hugepages.advise_quantized(p.data)
    os.environ["LOWBIT_HUGEPAGES"] = "0"
    return n
mods = {}
for name, cfg in configs.items():
    plain = copy.deepcopy(base) if cfg is None else R._lowbit(cfg)(copy.deepcopy(base))
    huge = copy.deepcopy(plain)
    print(f"{name}: advised {advise_model(huge) / 2**20:.0f} MiB", flush=True)
    mods[(name, "plain")], mods[(name, "huge")] = plain, huge
os.system(f"grep AnonHugePages /proc/{os.getpid()}/smaps_rollup")
print(f"DRAM probe before: {R.dram_bandwidth(2):.1f} GB/s", flush=True)
for M in [int(v) for v in os.environ.get("MS", "1,4").split(",")]:
    x = torch.randn(M, 4096, dtype=torch.bfloat16)
    fns = {k: R._stacked(m, x) for k, m in mods.items()}
    for f in fns.values(): f()
    r = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); r[k].append(time.perf_counter() - t0)
    for name in configs:
        p, h = st.median(r[(name, "plain")]) * 1e3, st.median(r[(name, "huge")]) * 1e3
        print(f"M={M} {name:20} plain {p:7.2f} ms  huge {h:7.2f} ms  huge/plain {h / p:.3f}", flush=True)
print(f"DRAM probe after: {R.dram_bandwidth(2):.1f} GB/s", flush=True)
