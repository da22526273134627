# Int8 weight-only, bf16 x, M = 2..64: the bf16 tiles with each block of 4 weight rows converted once into a scratch
# (set_scratch_min_m(2)), the bf16 tiles as before (btile, set_scratch_min_m(10**9)), gemm_bf16 (the route above 16),
# and bf16 F.linear, in one process, interleaved, medians. Also: scratch == btile bit for bit.
# usage: LOWBIT_CACHE=/tmp/lbc .venv/bin/python benchmarks/results/avx512_zen4/scratch/int8wo_scratch_tiles_session27.py
import statistics as st, time, sys
import torch, torch.nn.functional as F
from lowbit.kernels import _ext, hugepages
ext = _ext.load("int8_gemv")
torch.manual_seed(0)
print("threads", torch.get_num_threads(), "cpu", open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0])
shapes = {"8x4096^2": [(4096, 4096)] * 8} if "--large-only" in sys.argv else {"8x4096^2": [(4096, 4096)] * 8, "smollm2 (576->1536, 1536->576, 576->576) x4": [(1536, 576), (576, 1536), (576, 576)] * 4}
gs_list = [None, 128] if "--groups" in sys.argv else [None]
Ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 and sys.argv[1][0].isdigit() else [2, 4, 5, 6, 8, 9, 12, 16, 24, 32, 48, 64]
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
for name, sh in shapes.items():
    for gs in gs_list:
        ws = []
        for n, k in sh:
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            s = torch.rand(n, 1 if gs is None else k // gs) / 100
            ws.append((w, s, (w.float() * s.repeat_interleave(k // s.shape[1], 1)).bfloat16()))
        hugepages.advise_all([w for w, _, _ in ws] + [b for _, _, b in ws])
        for M in Ms:
            xs = [torch.randn(M, k, dtype=torch.bfloat16) for n, k in sh]
            def run(mode):
                if mode == "bf16":
                    return [F.linear(x, b) for x, (w, s, b) in zip(xs, ws)]
                if mode == "gemm_bf16":
                    return [ext.int8_weight_only_gemm(x, w, s) for x, (w, s, b) in zip(xs, ws)]
                ext.set_scratch_min_m(2 if mode.startswith("scratch") else 10**9)
                return [ext.int8_weight_only_mm(x, w, s) for x, (w, s, b) in zip(xs, ws)]
            b = run("btile")
            same = all(torch.equal(p, q) for p, q in zip(run("scratch"), b))
            r = {k: [] for k in ("scratch", "btile", "gemm_bf16", "bf16")}
            for _ in range(5):
                for k in r:
                    r[k].append(t(lambda: run(k)))
            med = {k: st.median(v) for k, v in r.items()}
            print(f"{name} g={gs or 'row'} M={M}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
                  + f"  | scratch/btile {med['scratch']/med['btile']:.2f} bf16/scratch {med['bf16']/med['scratch']:.2f}x"
                  + f" bf16/btile {med['bf16']/med['btile']:.2f}x bf16/gemm {med['bf16']/med['gemm_bf16']:.2f}x  equal {same}", flush=True)
ext.set_scratch_min_m(9)
