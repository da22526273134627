# int4 bf16 x at M = 5..32 (2 x 4096^2 g128): gemm_small_bf16 (SMALL_MAX_M = 32) against gemm_bf16 (cap 4), fp8 tiled against gemm_bf16, and bf16.
# Run from the repo root: PYTHONPATH=. python benchmarks/results/avx512_amx_xeon/scratch/int4_small_m_amx.py
import torch, time, lowbit, copy
from lowbit.kernels import _int4_cpu, _fp8_cpu
torch.set_num_threads(2)
def bench(f, n=21):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
lins=[torch.nn.Linear(4096,4096,bias=False).bfloat16() for _ in range(2)]
base=torch.nn.Sequential(*lins)
i4=copy.deepcopy(base); lowbit.quantize_(i4, lowbit.Int4WeightOnlyConfig(group_size=128))
f8=copy.deepcopy(base); lowbit.quantize_(f8, lowbit.Float8WeightOnlyConfig())
with torch.inference_mode():
  for M in (5,8,12,16,24,32):
    x=torch.randn(M,4096).bfloat16()
    r={}
    for cap in (32,4):
        _int4_cpu.SMALL_MAX_M=_int4_cpu.SMALL_MAX_M_AMX=cap; _fp8_cpu._TILED[:]=[cap]
        r[cap]=(bench(lambda: i4(x)), bench(lambda: f8(x)))
    tb=bench(lambda: base(x))
    print(M, "int4 small %.2f gemm %.2f | fp8 tiled %.2f gemm %.2f | bf16 %.2f"%(r[32][0],r[4][0],r[32][1],r[4][1],tb))
