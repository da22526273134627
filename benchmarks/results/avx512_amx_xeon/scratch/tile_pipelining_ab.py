# A/B of the AMX tile loops with loads issued after each tile's last use (gemm_bf16.h amx_block, gemm_i8.h): one Linear(4096, 4096) bf16 per config, eager, 2 threads,
# 11 interleaved rounds, median; ratios vs bf16 F.linear in the same process. Old = the tree with the change stashed, new = with it; three alternations.
import torch, time, copy, lowbit
torch.set_num_threads(2)
K=N=4096
lin=torch.nn.Linear(K,N,bias=False).bfloat16()
cfgs={"int8wo":lowbit.Int8WeightOnlyConfig(),"int4":lowbit.Int4WeightOnlyConfig(group_size=128),"w8a8":lowbit.Int8DynamicActivationInt8WeightConfig(),"8da4w":lowbit.Int8DynamicActivationInt4WeightConfig()}
mods={}
for k,c in cfgs.items():
    m=copy.deepcopy(lin); lowbit.quantize_(m,c); mods[k]=m
def once(f):
    a=time.perf_counter(); f(); return time.perf_counter()-a
out=[]
with torch.inference_mode():
  for M in (16, 256):
    x=torch.randn(M,K).bfloat16()
    runs={"bf16":lambda: lin(x), **{k:(lambda m=m: m(x)) for k,m in mods.items()}}
    ts={k:[] for k in runs}
    for f in runs.values(): f()
    for _ in range(11):
        for k,f in runs.items(): ts[k].append(once(f))
    med={k:sorted(v)[5]*1e3 for k,v in ts.items()}
    out.append(f"M={M}: " + " ".join(f"{k} {med['bf16']/med[k]:.2f}x" for k in mods))
print(" | ".join(out))
