import time, statistics, torch
from torch.utils.cpp_extension import load
from lowbit.kernels import _ext, prefetch
old = load("old_int8_gemv", ["/tmp/s/old_int8_gemv.cpp"], extra_cflags=["-O3", "-mavx512f", "-mavx512bw"], extra_include_paths=["/tmp/s"], verbose=False)
e = _ext.load("int8_gemv")
h, d = e.get_prefetch(); old.set_prefetch(h, d); print("prefetch", h, d)
torch.manual_seed(0)
W = [torch.randint(-127, 128, (4096, 4096), dtype=torch.int8) for _ in range(8)]
S = [torch.rand(4096, 1) + 0.1 for _ in range(8)]
def t(f):
    s = time.perf_counter(); f(); return (time.perf_counter() - s) * 1e3
for M in (1,):
    x = torch.randn(M, 4096).bfloat16()
    fs = {"new": lambda: [e.int8_weight_only_mm(x, w, s) for w, s in zip(W, S)],
          "old": lambda: [old.int8_weight_only_mm(x, w, s) for w, s in zip(W, S)]}
    r = {k: [] for k in fs}
    for i in range(11):
        for k, f in fs.items(): r[k].append(t(f))
    med = {k: statistics.median(v[1:]) for k, v in r.items()}
    print(f"M={M:2d} " + "  ".join(f"{k} {v:6.2f} ms {8*4096*4096/v/1e6:5.1f} GB/s" for k, v in med.items()))
    print(torch.equal(fs["new"]()[0], fs["old"]()[0]), (fs["new"]()[0].float() - fs["old"]()[0].float()).abs().max())
