# Session 25: int4 g64 (asymmetric, int8 zero points: SmolLM2's demo config) on SmolLM2-135M's four linear shapes x 30
# layers, bf16 x, M = 2..16: gemv_bf16 (the tree's, M <= 16) against gemm_small_bf16 and gemm_bf16, interleaved, medians.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_gemv_m16_smollm2.py
import statistics as st, time, torch
from lowbit.kernels import _ext
ext = _ext.load("int4_cpu")
gen = torch.Generator().manual_seed(0)
SHAPES = {"q/o 576<-576": (576, 576), "k/v 192<-576": (192, 576), "up/gate 1536<-576": (1536, 576), "down 576<-1536": (576, 1536)}
G = 64
print("threads", torch.get_num_threads())
ws = {k: [(torch.randint(0, 256, (n, kk // 2), dtype=torch.uint8, generator=gen), torch.rand(n, kk // G, generator=gen) / 100 + 1e-3,
           torch.randint(0, 16, (n, kk // G), dtype=torch.int8, generator=gen)) for _ in range(30)] for k, (n, kk) in SHAPES.items()}
paths = {"gemv": ext.gemv_bf16, "small": ext.gemm_small_bf16, "gemm_bf16": ext.gemm_bf16}
for name, (n, kk) in SHAPES.items():
    for m in (2, 4, 5, 8, 12, 16):
        x = torch.randn(m, kk, dtype=torch.bfloat16, generator=gen)
        r = {p: [] for p in paths}
        for _ in range(9):
            for p, f in paths.items():
                t0 = time.perf_counter()
                for q, s, z in ws[name]: f(x, q, s, z, None)
                r[p].append(time.perf_counter() - t0)
        print(f"{name:18} M={m:<2} " + "  ".join(f"{p} {st.median(v)*1e6/30:7.1f}" for p, v in r.items()) + "  us/layer", flush=True)
