# A/B in one process: the kernel built from HEAD's lowbit/kernels/csrc against the working tree's (both under other module names).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/ab_head_csrc.py int8_act|int8_int4
import torch, time, statistics as st, sys, subprocess
from pathlib import Path
from torch.utils.cpp_extension import load
from lowbit.primitives.packing import pack_int4
name=sys.argv[1]
flags={"int8_act":["-ffp-contract=off","-mavx512f","-mavx512bw","-mavx512vl","-mf16c"],"int8_int4":["-mavx512f","-mavx512bw","-mavx512vl","-mavx512vnni"]}[name]
head=Path("/tmp/head_csrc"); head.mkdir(exist_ok=True)
for f in subprocess.run(["git","ls-files","lowbit/kernels/csrc"],capture_output=True,text=True).stdout.split():
    (head/Path(f).name).write_text(subprocess.run(["git","show",f"HEAD:{f}"],capture_output=True,text=True).stdout)
mods={}
for tag,src in (("head",head),("tree",Path("lowbit/kernels/csrc").resolve())):
    d=Path(f"/tmp/ab_{name}_{tag}"); d.mkdir(exist_ok=True)
    mods[tag]=load(f"lowbit_{name}_{tag}",[str(src/f"{name}.cpp")],extra_include_paths=[str(src)],extra_cflags=["-O3","-std=c++20",*flags],build_directory=str(d))
def t(f,n=5):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)*1e3
print("threads", torch.get_num_threads())
if name=="int8_act":
    ws=[torch.randint(-128,128,(4096,4096),dtype=torch.int8) for _ in range(8)]
    calls={m:(lambda mod,a=torch.randint(-128,128,(m,4096),dtype=torch.int8),m=m:[mod.gemm_i8(a,w) for w in (ws if m<256 else ws[:2])]) for m in (8,16,32,64,256)}
else:
    gen=torch.Generator().manual_seed(0)
    ws={g:[(pack_int4(torch.randint(-8,8,(4096,4096),dtype=torch.int8,generator=gen)), torch.rand(4096,4096//g)/100) for _ in range(8)] for g in (32,128)}
    calls={}
    for g in (32,128):
        for m in (16,32,64,256):
            calls[f"g{g} M={m}"]=(lambda mod,x=torch.randn(m,4096,dtype=torch.bfloat16),g=g,m=m:[mod.int8_int4_dynamic_linear(x,q,s,None,-128,127,1e-5) for q,s in (ws[g] if m<256 else ws[g][:2])])
for key,f in calls.items():
    outs=[f(mod) for mod in mods.values()]
    same=all(torch.equal(a,b) for a,b in zip(outs[0],outs[1]))
    r={k:[] for k in mods}
    for _ in range(3):
        for k,mod in mods.items(): r[k].append(t(lambda: f(mod)))
    print(f"{key}: " + "  ".join(f"{k} {st.median(v):.2f} ms" for k,v in r.items()) + f"  equal {same}")
