# The AVX2 int4 and float8 small-M paths against the chunked ones at M = 32..128 (bf16 x; chunked: x widened to float32,
# as the routing does on a CPU without native bf16 matmul): int4 gemm_small_bf16 (C++ limit 64) / linear_chunked, fp8
# fp8_linear with tiled_max_m 256 / 0; 2 x 4096^2 weights each, 2 threads, medians of 7.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/int4_fp8_small_m_vs_chunked.py
import torch, time, statistics
from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4
torch.set_num_threads(2)
def t(f, n=7):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
e4, e8 = _ext.load("int4_cpu"), _ext.load("fp8_cpu")
g = torch.Generator().manual_seed(0)
W4 = [(pack_int4(torch.randint(0, 16, (4096, 4096), dtype=torch.int8, generator=g) - 8).view(torch.uint8), torch.rand(4096, 32) / 100, torch.randint(0, 16, (4096, 32), dtype=torch.int8, generator=g)) for _ in range(2)]
W8 = [((torch.randn(4096, 4096, generator=g) * 8).to(torch.float8_e4m3fn), torch.rand(4096, 1) / 100) for _ in range(2)]
for M in (32, 48, 64, 96, 128):
    x = torch.randn(M, 4096, dtype=torch.bfloat16)
    small = t(lambda: [e4.gemm_small_bf16(x, q, s, z, None) for q, s, z in W4]) if M <= 64 else float("nan")
    chunk = t(lambda: [e4.linear_chunked(x.float(), q, s, z, None, 1024).bfloat16() for q, s, z in W4])
    f_t = t(lambda: [e8.fp8_linear(x, q, s, None, 4, 256, 256, False) for q, s in W8])
    f_c = t(lambda: [e8.fp8_linear(x.float(), q, s, None, 4, 0, 256, False).bfloat16() for q, s in W8])
    print(f"M={M}: int4 small {small:.1f} chunked {chunk:.1f} | fp8 tiled {f_t:.1f} chunked {f_c:.1f}", flush=True)
