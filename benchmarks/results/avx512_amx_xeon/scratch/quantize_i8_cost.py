# int8_act quantize_i8 (dynamic per-token symmetric) alone on prefill-sized activations, 2 threads, median of 51.
import torch, time
from lowbit.kernels import _ext
torch.set_num_threads(2)
e=_ext.load("int8_act")
x=torch.randn(256,2048).bfloat16()
def med(f,n=51):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return sorted(ts)[n//2]*1e3
print("quantize_i8 256x2048 dynamic:", med(lambda: e.quantize_i8(x, -1.0, 0, 1e-9)), "ms")
x=torch.randn(256,5632).bfloat16()
print("quantize_i8 256x5632 dynamic:", med(lambda: e.quantize_i8(x, -1.0, 0, 1e-9)), "ms")
