# int8 weight-only at M=256 (4096^2, bf16 x): the chunked path with chunks of 1 to 32 MiB against bf16 F.linear, ms.
# Run from the repo root (it sets lowbit.kernels.int8._CHUNK_BYTES in process).
import torch, time, statistics as st
import torch.nn.functional as F
from lowbit.kernels import int8 as k8
def t(f,n=7):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)*1e3
from lowbit.spec import QuantSpec
from lowbit.granularity import PerRow
q=torch.randint(-127,128,(4096,4096),dtype=torch.int8); s=torch.rand(4096,1)
x=torch.randn(256,4096,dtype=torch.bfloat16); wb=torch.randn(4096,4096,dtype=torch.bfloat16)
spec=QuantSpec("int8", PerRow(), symmetric=True)
r={}
for _ in range(3):
    for cb in (1<<20, 2<<20, 4<<20, 8<<20, 32<<20):
        k8._CHUNK_BYTES=cb
        r.setdefault(cb,[]).append(t(lambda: k8._weight_only_chunked(x,q,s,None)))
    r.setdefault("bf16",[]).append(t(lambda: F.linear(x,wb)))
for k,v in r.items(): print(k, round(st.median(v),2))
