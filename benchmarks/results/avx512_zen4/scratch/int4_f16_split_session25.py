# NOT KEPT (session 25): gemv_f16 is not in the tree. This records the experiment; its kernel is
# int4_f16_split_session25_not_kept.patch (against ba7a1e2; it also returns the GEMV to two horizontal sums).
# The tree's float16 x runs gemv_f32 once per row (README design note on the int4 bf16 GEMV).
# Session 25 (2026-12-06): int4 weight-only with float16 x at M = 1..8 on 8 x Linear(4096, 4096) g128 (asymmetric, int8
# zero points): gemv_f16 (x split exactly into two bf16 rows, the bf16 GEMV on 2M rows) against gemv_f32 once per row
# (what M <= 8 ran) and float16 F.linear on the dequantized weight (torch's own float16 matmul), interleaved, medians.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_f16_split_session25.py
import statistics as st, time, torch
import torch.nn.functional as F
from lowbit.kernels import _ext
ext = _ext.load("int4_cpu")
gen = torch.Generator().manual_seed(0)
print("threads", torch.get_num_threads())
ws = [(torch.randint(0, 256, (4096, 2048), dtype=torch.uint8, generator=gen), torch.rand(4096, 32, generator=gen) / 100 + 1e-3,
       torch.randint(0, 16, (4096, 32), dtype=torch.int8, generator=gen)) for _ in range(8)]
dense = [torch.randn(4096, 4096, generator=gen).half() for _ in range(8)]
for m in (1, 2, 4, 8):
    x = torch.randn(m, 4096, generator=gen).half()
    calls = {"gemv_f16": lambda: [ext.gemv_f16(x, q, s, z, None) for q, s, z in ws],
             "gemv_f32 per row": lambda: [torch.cat([ext.gemv_f32(x[i:i + 1], q, s, z, None) for i in range(m)]) for q, s, z in ws],
             "fp16 F.linear": lambda: [F.linear(x, d) for d in dense]}
    r = {k: [] for k in calls}
    for f in calls.values(): f()
    for _ in range(9):
        for k, f in calls.items():
            t0 = time.perf_counter(); f(); r[k].append(time.perf_counter() - t0)
    print(f"M={m}: " + "  ".join(f"{k} {st.median(v)*1e3:6.2f}" for k, v in r.items()) + " ms", flush=True)
