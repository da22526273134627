# Every lowbit config on one Linear(4096, 4096) bf16 at the Ms given (argv), eager: AMX tiles on, then off (set_amx(False) on the builds), against bf16 F.linear.
# python benchmarks/results/avx512_amx_xeon/scratch/configs_amx_vs_avx512.py 256 16
import torch, time, lowbit, copy, sys
from lowbit.kernels import _ext
from lowbit.eval import sqnr
torch.set_num_threads(2)
def bench(f, n=11):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
exts=[_ext.load(n) for n in ("int8_gemv","int4_cpu","fp8_cpu","int8_act")]
def set_amx(on):
    for e in exts: e.set_amx(on)
K=N=4096
lin = torch.nn.Linear(K,N,bias=False).bfloat16()
Ms=[int(a) for a in sys.argv[1:]] or [256]
cfgs={"int8wo":lowbit.Int8WeightOnlyConfig(),"int4 g128":lowbit.Int4WeightOnlyConfig(group_size=128),"fp8wo":lowbit.Float8WeightOnlyConfig(),
"fp8dyn":lowbit.Float8DynamicActivationFloat8WeightConfig(),"w8a8":lowbit.Int8DynamicActivationInt8WeightConfig(),"8da4w":lowbit.Int8DynamicActivationInt4WeightConfig(),"fp8xint4":lowbit.Float8DynamicActivationInt4WeightConfig()}
mods={k:lowbit.quantize_(copy.deepcopy(lin),c) or None for k,c in cfgs.items()}
mods={}
for k,c in cfgs.items():
    m=copy.deepcopy(lin); lowbit.quantize_(m,c); mods[k]=m
with torch.inference_mode():
  for M in Ms:
    x=torch.randn(M,K).bfloat16()
    tb=bench(lambda: lin(x)); ref=lin(x)
    for k,m in mods.items():
        set_amx(True); y=m(x); t1=bench(lambda: m(x)); set_amx(False); y0=m(x); t0=bench(lambda: m(x))
        print(f"M={M} {k:10s} amx {t1:.2f} ms ({tb/t1:.2f}x bf16) no-amx {t0:.2f} ms; bf16 {tb:.2f}; sqnr {sqnr(ref,y):.1f} / {sqnr(ref,y0):.1f}")
