# The integer int4 GEMV (M = 1, 8 x 4096^2 g128, 2 threads) under several weight-prefetch settings of the int4_cpu
# extension (hint 0 nta, 1 t0, 2 t1; distance in bytes), interleaved, beside a DRAM probe.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int4_integer_prefetch_sweep.py
import statistics as st, time, torch
from lowbit.kernels import _ext, prefetch
from lowbit.primitives.packing import pack_int4
torch.set_num_threads(2)
e = _ext.load("int4_cpu")
gen = torch.Generator().manual_seed(0)
w4 = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
       torch.rand(4096, 32) / 100, torch.randint(-8, 8, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
x = torch.randn(1, 4096, dtype=torch.bfloat16)
nbytes = sum(q.numel() + 5 * s.numel() for q, s, _ in w4)
probe = torch.ones(2**28)
print("default", prefetch.choice(), e.get_prefetch())
settings = [(2, 65536), (2, 32768), (2, 16384), (2, 8192), (0, 32768), (0, 16384), (1, 16384)]
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
res = {s: [] for s in settings}; pr = []
for i in range(int(__import__('sys').argv[1]) if len(__import__('sys').argv) > 1 else 9):
    pr.append(one(lambda: probe.sum()))
    for s in (settings if i % 2 == 0 else settings[::-1]):
        e.set_prefetch(*s)
        res[s].append(one(lambda: [e.gemv_bf16(x, q, sc, z, None) for q, sc, z in w4]))
p = 2**30 / st.median(pr) / 1e9
for s, v in res.items():
    print(f"hint {s[0]} dist {s[1]}: {st.median(v)*1e3:.2f} ms ({nbytes / st.median(v) / 1e9 / p:.2f} of {p:.1f} GB/s)")
