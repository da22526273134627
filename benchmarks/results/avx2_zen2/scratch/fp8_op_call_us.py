# Cost of calling the float8 small-M dispatcher ops from Python against the pybind entries they wrap (256 x 256
# e4m3fn weight, M = 1 bf16, 2 threads; median of 9 rounds of 2000 calls), and of the W8A8 op against its entry.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/fp8_op_call_us.py
import torch, time, statistics
from lowbit.kernels import _ext, _cpu_ops
torch.set_num_threads(2)
e = _ext.load("fp8_cpu")
q = torch.randn(256, 256).to(torch.float8_e4m3fn); s = torch.rand(256, 1); x = torch.randn(1, 256, dtype=torch.bfloat16)
S1 = "QuantSpec(dtype=QDType(float8_e4m3fn), granularity=PerRow(), symmetric=True, eps=1e-12, scale_dtype=torch.float32, zero_point_domain='int', zero_point_dtype=None, quant_min=None, quant_max=None)"
def t(f, n=2000):
    f(); ts = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts) * 1e6
op_a = torch.ops.lowbit_cpu.fp8_small_act_linear.default; op_w = torch.ops.lowbit_cpu.fp8_small_linear.default
print("pybind fp8_linear finite", t(lambda: e.fp8_linear(x, q, s, None, 4, 32, 256, True)))
print("pybind fp8_linear checked", t(lambda: e.fp8_linear(x, q, s, None, 4, 32, 256, False)))
print("pybind fp8_linear_act finite", t(lambda: e.fp8_linear_act(x, q, s, None, 4, 32, 256, True, 1e-12, False, True)))
print("op small_linear", t(lambda: op_w(x, q, s, None, 4, 32, 256, S1)))
print("op small_act_linear", t(lambda: op_a(x, q, s, None, 4, 32, 256, True, 1e-12, False, S1, S1)))
print("weight_finite pybind", t(lambda: e.fp8_weight_finite(q)))
print("op small_act_linear short strings", t(lambda: op_a(x, q, s, None, 4, 32, 256, True, 1e-12, False, "a", "b")))
print("op small_linear short", t(lambda: op_w(x, q, s, None, 4, 32, 256, "a")))
w8 = torch.ops.lowbit_cpu.w8a8_dynamic_linear.default
qi = torch.randint(-127,127,(256,256),dtype=torch.int8); sw = torch.rand(256)
print("w8a8 op", t(lambda: w8(x, qi, sw, None, 1e-5, S1, S1)))
print("w8a8 pybind", t(lambda: _ext.load("int8_act").w8a8_dynamic_linear(x, qi, sw, None, 1e-5)))
with torch.no_grad():
    print("no_grad: op small_act_linear", t(lambda: op_a(x, q, s, None, 4, 32, 256, True, 1e-12, False, S1, S1)))
    print("no_grad: op small_linear", t(lambda: op_w(x, q, s, None, 4, 32, 256, S1)))
    print("no_grad: pybind act", t(lambda: e.fp8_linear_act(x, q, s, None, 4, 32, 256, True, 1e-12, False, True)))
    print("no_grad: pybind act checked", t(lambda: e.fp8_linear_act(x, q, s, None, 4, 32, 256, True, 1e-12, False, False)))
