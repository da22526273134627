# W8A8 small M: mm_i8 against gemm_i8 (int8_act build as it is), 8 x 4096^2. Run from the repo root.
import torch, time, statistics as st
from lowbit.kernels import _ext
e=_ext.load("int8_act")
def t(f,n=5):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)*1e3
ws=[torch.randint(-128,128,(4096,4096),dtype=torch.int8) for _ in range(8)]
for m in (2,3,4,5,6,7,8):
    a=torch.randint(-128,128,(m,4096),dtype=torch.int8)
    r=[]
    for _ in range(3): r.append((t(lambda:[e.mm_i8(a,w) for w in ws]), t(lambda:[e.gemm_i8(a,w) for w in ws])))
    x,y=[st.median(c) for c in zip(*r)]
    print(f"M={m}: mm_i8 {x:.2f} ms  gemm_i8 {y:.2f} ms")
