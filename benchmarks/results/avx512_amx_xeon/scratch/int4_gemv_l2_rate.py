import torch, time, copy, lowbit, sys
K=N=int(sys.argv[2]); th=int(sys.argv[3])
torch.set_num_threads(th)
cfg={"int4":lowbit.Int4WeightOnlyConfig(group_size=128),"int8":lowbit.Int8WeightOnlyConfig(),"fp8":lowbit.Float8WeightOnlyConfig()}[sys.argv[1]]
m=torch.nn.Linear(K,N,bias=False).bfloat16(); lowbit.quantize_(m,cfg)
w=m.weight; nbytes=sum(getattr(w,a).numel()*getattr(w,a).element_size() for a in w.__tensor_flatten__()[0])
x=torch.randn(1,K).bfloat16()
from lowbit.kernels import _ext
e=_ext.load("int4_cpu")
with torch.inference_mode():
    f = (lambda: e.gemv_bf16(x, w.qdata, w.scale, None, None)) if sys.argv[1]=="int4" else (lambda: m(x))
    for _ in range(50): f()
    ts=[]
    for _ in range(7):
        a=time.perf_counter()
        for _ in range(500): f()
        ts.append((time.perf_counter()-a)/500)
    t=sorted(ts)[3]
print(sys.argv[1:], f"{t*1e6:.1f} us/call {nbytes/t/1e9:.1f} GB/s, {nbytes/1024:.0f} KiB")
