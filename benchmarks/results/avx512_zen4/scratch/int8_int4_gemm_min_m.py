# 8da4w at small M: the per-lane path against the 64-row-panel GEMM (a build with kGemmMinM = 1), 8 x 4096^2, bf16 x.
# Run from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int8_int4_gemm_min_m.py
import torch, time, statistics as st
from pathlib import Path
from torch.utils.cpp_extension import load
from lowbit.kernels import _ext
from lowbit.primitives.packing import pack_int4
CSRC=Path("lowbit/kernels/csrc").resolve()
d=Path("/tmp/i44_minm"); d.mkdir(exist_ok=True)
v=load("lowbit_int8_int4_minm", [str(CSRC/"int8_int4.cpp")], extra_include_paths=[str(CSRC)], extra_cflags=["-O3","-std=c++20","-mavx512f","-mavx512bw","-mavx512vl","-mavx512vnni","-DLOWBIT_I4_GEMM_MIN_M=1"], build_directory=str(d))
new=_ext.load("int8_int4")
def t(f,n=5):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)*1e3
for g in (32,128):
  gen=torch.Generator().manual_seed(0)
  ws=[(pack_int4(torch.randint(-8,8,(4096,4096),dtype=torch.int8,generator=gen)), torch.rand(4096,4096//g)/100) for _ in range(8)]
  for m in (4,8,12,16,20,24,28,32):
    x=torch.randn(m,4096,dtype=torch.bfloat16); a=(-128,127,1e-5)
    r=[]
    for _ in range(3):
        r.append((t(lambda:[new.int8_int4_dynamic_linear(x,q,s,None,*a) for q,s in ws]), t(lambda:[v.int8_int4_dynamic_linear(x,q,s,None,*a) for q,s in ws])))
    p,gm=[st.median(c) for c in zip(*r)]
    print(f"g{g} M={m}: default(per-lane below 32) {p:.2f} ms  gemm {gm:.2f} ms")
