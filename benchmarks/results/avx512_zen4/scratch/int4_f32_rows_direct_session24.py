# Session 24 (2026-12-06, Zen 4, 2 threads): int4 weight-only with float32 x at M = 2..32 on CPU: gemv_f32 once per
# row of x ("rows") against linear_chunked (rows of W dequantized to float32, then torch.mm: what M > 1 ran), the
# extension's functions called directly, interleaved, medians of 7 rounds. Usage: .venv/bin/python <this file>
import time, statistics, torch
from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4
ext = _ext.load("int4_cpu")
gen = torch.Generator().manual_seed(0)
print("threads", torch.get_num_threads())
def t(f):
    f(); t0 = time.perf_counter(); f(); return (time.perf_counter() - t0) * 1e3
for (n, k, count, g) in [(4096, 4096, 8, 128), (576, 576, 30, 64), (1536, 576, 30, 64), (576, 1536, 30, 64)]:
    ws = [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)), torch.rand(n, k // g) / 100) for _ in range(count)]
    for M in (2, 4, 8, 16, 32):
        x = torch.randn(M, k)
        fs = {"rows": lambda: [torch.cat([ext.gemv_f32(x[i : i + 1], q, s, None, None) for i in range(M)]) for q, s in ws],
              "chunked": lambda: [ext.linear_chunked(x, q, s, None, None, 1024) for q, s in ws]}
        r = {kk: [] for kk in fs}
        for _ in range(7):
            for kk, f in fs.items(): r[kk].append(t(f))
        a, b = (statistics.median(r[kk]) for kk in ("chunked", "rows"))
        print(f"{count} x ({n}, {k}) g{g} float32 M={M}: chunked {a:8.3f} ms  rows {b:8.3f} ms  {a / b:.2f}x", flush=True)
