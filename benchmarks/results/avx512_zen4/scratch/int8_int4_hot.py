import sys, time, statistics, torch
from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
e = _ext.load("int8_int4"); print(_ext.status()["int8_int4"], torch.get_num_threads())
g = 32
for N, K, label in [(256, 4096, "hot 512KB"), (32768, 4096, "cold 64MB")]:
    q = pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8))
    s = torch.rand(N, K // g) + 0.1
    for M in (1, 4):
        x = torch.randn(M, K).bfloat16()
        reps = 200 if N == 256 else 5
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(reps): e.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-9)
            ts.append((time.perf_counter() - t) / reps)
        t = statistics.median(ts)
        print(f"{label} M={M} {t*1e6:8.1f} us  {q.numel()/t/1e9:6.1f} GB/s (qdata)")
