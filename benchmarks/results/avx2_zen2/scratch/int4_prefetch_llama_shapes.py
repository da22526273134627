# The integer int4 GEMV (M = 1, 2 threads) on llama1b's shapes (3 layers of q, k, v, o, gate, up, down; g128) under three
# weight-prefetch distances (t1), 11 interleaved rounds.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int4_prefetch_llama_shapes.py
import statistics as st, time, torch
from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4
torch.set_num_threads(2)
e = _ext.load("int4_cpu")
gen = torch.Generator().manual_seed(0)
shapes = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)] * 3
w4 = [(pack_int4(torch.randint(0, 16, (n, k), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
       torch.rand(n, k // 128) / 100, torch.randint(-8, 8, (n, k // 128), dtype=torch.int8, generator=gen)) for n, k in shapes]
xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (2048, 5632)}
nbytes = sum(q.numel() for q, _, _ in w4)
settings = [(2, 65536), (2, 32768), (2, 16384)]
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
res = {s: [] for s in settings}
for i in range(11):
    for s in (settings if i % 2 == 0 else settings[::-1]):
        e.set_prefetch(*s)
        res[s].append(one(lambda: [e.gemv_bf16(xs[q.shape[1] * 2], q, sc, z, None) for q, sc, z in w4]))
for s, v in res.items():
    print(f"llama1b shapes x3 layers, hint {s[0]} dist {s[1]}: {st.median(v)*1e3:.2f} ms ({nbytes / st.median(v) / 1e9:.1f} GB/s)")
