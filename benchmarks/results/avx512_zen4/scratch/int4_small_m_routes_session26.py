# Session 26 (2026-12-06): int4 weight-only, bf16 x, M = 8 .. 32: the three bf16 kernels of the AVX-512 build
# (gemv_bf16 up to 16, gemm_small_bf16, gemm_bf16) on 8 x 4096^2 (weights from DRAM) and on SmolLM2-135M's layer
# shapes and llama1b's (4 layers, 122 MB) (hot: its 4 shapes once, ~1.5 MB, in L2/L3; DRAM: its 30 layers' 7 linears, 53 MB > L3), interleaved rounds, medians.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_small_m_routes_session26.py
import os, statistics as st, time
import torch
from lowbit.kernels import _ext
ext = _ext.load("int4_cpu")
gen = torch.Generator().manual_seed(0)
ROUNDS = int(os.environ.get("ROUNDS", "7"))
MS = [int(v) for v in os.environ.get("MS", "8,9,12,16,24,32").split(",")]
print("threads", torch.get_num_threads(), "isa", _ext.active_isa("int4_cpu"), flush=True)
def weight(n, k, g, kind):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    s = torch.rand(n, k // g, generator=gen) / 100 + 1e-3
    z = torch.randint(0, 16, (n, k // g), dtype=torch.int8, generator=gen) if kind == "asym" else torch.rand(n, k // g, generator=gen) * 15
    return q, s, z
stacks = {
    "4096x4096 x8 g128 asym": [weight(4096, 4096, 128, "asym") for _ in range(8)],
    "4096x4096 x8 g32 asym": [weight(4096, 4096, 32, "asym") for _ in range(8)],
    "smollm2 hot (576x576, 192x576, 1536x576, 576x1536) g32 fzp": [weight(n, k, 32, "fzp") for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536))],
    "smollm2 DRAM (30 x 7 linears) g32 fzp": [weight(n, k, 32, "fzp") for _ in range(30) for n, k in ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))],
    "llama1b DRAM (4 x 7 linears) g128 asym": [weight(n, k, 128, "asym") for _ in range(4) for n, k in ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))],
    "smollm2 DRAM asym (30 x 7 linears) g32 asym": [weight(n, k, 32, "asym") for _ in range(30) for n, k in ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))],
    "llama1b DRAM fzp (4 x 7 linears) g32 fzp": [weight(n, k, 32, "fzp") for _ in range(4) for n, k in ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))],
}
only = os.environ.get("ONLY")
if only: stacks = {k: v for k, v in stacks.items() if only in k}
kernels = {"gemv": ext.gemv_bf16, "small": ext.gemm_small_bf16, "gemm": ext.gemm_bf16}
for name, ws in stacks.items():
    for m in MS:
        x = torch.randn(m, ws[0][0].shape[1] * 2, dtype=torch.bfloat16, generator=gen)
        xs = [torch.randn(m, q.shape[1] * 2, dtype=torch.bfloat16, generator=gen) for q, _, _ in ws]
        ks = {k: f for k, f in kernels.items() if not (k == "gemv" and m > 16)}
        r = {k: [] for k in ks}
        for _ in range(ROUNDS):
            for k, f in ks.items():
                t0 = time.perf_counter()
                for (q, s, z), xx in zip(ws, xs): f(xx, q, s, z, None)
                r[k].append(time.perf_counter() - t0)
        meds = {k: st.median(v) * 1e3 for k, v in r.items()}
        best = min(meds, key=meds.get)
        print(f"{name:56} M={m:<2} " + "  ".join(f"{k} {v:7.3f}" for k, v in meds.items()) + f"  ms; best {best}", flush=True)
