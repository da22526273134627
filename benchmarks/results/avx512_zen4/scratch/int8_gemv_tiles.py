import time, statistics, torch
from lowbit.kernels import _ext
e = _ext.load("int8_gemv"); print(_ext.status()["int8_gemv"], torch.get_num_threads())
torch.manual_seed(0)
W = [torch.randint(-127, 128, (4096, 4096), dtype=torch.int8) for _ in range(8)]
S = [torch.rand(4096, 1) + 0.1 for _ in range(8)]
Wb = [torch.randn(4096, 4096).bfloat16() for _ in range(8)]
def t(f):
    s = time.perf_counter(); f(); return (time.perf_counter() - s) * 1e3
for M in (1, 2, 4, 8, 16):
    x = torch.randn(M, 4096).bfloat16()
    fs = {"ours": lambda: [e.int8_weight_only_mm(x, w, s) for w, s in zip(W, S)],
          "int8pack": lambda: [torch._weight_int8pack_mm(x, w, s.reshape(-1).bfloat16()) for w, s in zip(W, S)],
          "bf16": lambda: [torch.nn.functional.linear(x, w) for w in Wb]}
    r = {k: [] for k in fs}
    for i in range(7):
        for k, f in fs.items(): r[k].append(t(f))
    med = {k: statistics.median(v[1:]) for k, v in r.items()}
    print(f"M={M:2d} " + "  ".join(f"{k} {v:6.2f} ms" for k, v in med.items()) + f"  ours {8*4096*4096/med['ours']/1e6:5.1f} GB/s  vs bf16 {med['bf16']/med['ours']:.2f}x")
