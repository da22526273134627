import time, torch, statistics
from torch import nn
from lowbit import quantize_
from lowbit.configs import Float8DynamicActivationFloat8WeightConfig
from lowbit.granularity import PerRow
from lowbit.kernels import _ext
ls = [nn.Linear(576, 192, bias=False).bfloat16() for _ in range(30)]
for l in ls: quantize_(l, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
x = torch.randn(256, 576).bfloat16()
ea = _ext.load("int8_act")
with torch.no_grad():
    for _ in range(3): ls[0](x)
    for name, f in [("one layer x30", lambda: [ls[0](x) for _ in range(30)]), ("30 layers", lambda: [l(x) for l in ls])]:
        ts = []
        for _ in range(7):
            t = time.perf_counter(); f(); ts.append((time.perf_counter() - t) / 30 * 1e6)
        print(name, round(statistics.median(ts), 1), "us")
    import inspect
    print(inspect.signature(ea.fake_quant_fp8) if hasattr(ea.fake_quant_fp8, '__signature__') else ea.fake_quant_fp8.__doc__[:300])
def tm(f, n=50):
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return round(statistics.median(ts), 1)
print("fake_quant_fp8 per token", tm(lambda: ea.fake_quant_fp8(x, 0.0, True, 1e-12, False)))
print("threads", torch.get_num_threads())
w = ls[0].weight
print(type(w).__name__, w.qdata.dtype, w.qdata.shape)
with torch.no_grad():
    print("dequantize", tm(lambda: w.dequantize(torch.bfloat16)))
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
        for _ in range(10): ls[0](x)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10))
