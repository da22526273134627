# A/B of the integer GEMV's weight rows per tile (LOWBIT_INT4_IROWS, default 2, 4, 8): the working tree's AVX2 int4
# build once per value, M = 1 bf16 x on 8 x 4096^2 g128, 2 threads, interleaved medians beside a DRAM probe; then
# on one 512 x 4096 weight (1 MiB, in cache) on 1 thread, the loop's compute speed.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int4_integer_rows_ab.py [R ...]
import statistics as st, time, torch, sys
from pathlib import Path
from torch.utils.cpp_extension import load
from lowbit.kernels import prefetch
from lowbit.primitives.packing import pack_int4
torch.set_num_threads(2)
hint, dist, _ = prefetch.choice()
src = Path("lowbit/kernels/csrc").resolve()
mods = {}
for r in [int(a) for a in sys.argv[1:]] or (2, 4, 8):
    d = Path(f"/tmp/ab_rows_{r}"); d.mkdir(exist_ok=True)
    mods[r] = load(f"lowbit_int4_rows{r}", [str(src / "int4_cpu_avx2.cpp")], extra_include_paths=[str(src)],
                   extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", f"-DLOWBIT_INT4_IROWS={r}"], build_directory=str(d))
    mods[r].set_prefetch(prefetch.HINTS[hint], dist)
gen = torch.Generator().manual_seed(0)
w4 = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=gen) - 8).view(torch.uint8),
       torch.rand(4096, 32) / 100, torch.randint(-8, 8, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
x = torch.randn(1, 4096, dtype=torch.bfloat16)
nbytes = sum(q.numel() + 5 * s.numel() for q, s, _ in w4)
probe = torch.ones(2**28)
def one(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
res = {r: [] for r in mods}; pr = []
for i in range(9):
    pr.append(one(lambda: probe.sum()))
    order = list(mods.items()) if i % 2 == 0 else list(mods.items())[::-1]
    for r, m in order:
        res[r].append(one(lambda: [m.gemv_bf16(x, q, s, z, None) for q, s, z in w4]))
p = 2**30 / st.median(pr) / 1e9
for r, v in res.items():
    print(f"R={r}: {st.median(v)*1e3:.2f} ms ({nbytes / st.median(v) / 1e9 / p:.2f} of {p:.1f} GB/s)")
torch.set_num_threads(1)
q1, s1, z1 = w4[0][0][:512], w4[0][1][:512], w4[0][2][:512]
res = {r: [] for r in mods}
for i in range(9):
    for r, m in (list(mods.items()) if i % 2 == 0 else list(mods.items())[::-1]):
        res[r].append(one(lambda: [m.gemv_bf16(x, q1, s1, z1, None) for _ in range(200)]) / 200)
for r, v in res.items():
    print(f"R={r}: 512 x 4096 in cache, 1 thread: {st.median(v)*1e6:.1f} us ({q1.numel() / st.median(v) / 1e9:.1f} GB/s)")
