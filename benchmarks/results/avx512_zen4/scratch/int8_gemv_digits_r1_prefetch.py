import torch, time, statistics, os, sys
sys.path.insert(0, "benchmarks")
from roofline import dram_bandwidth
from lowbit.kernels import _ext
e8 = _ext.load("int8_gemv")
def bench(fn, reps):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)
n,k=32768,4096
w = torch.randint(-127,127,(n,k),dtype=torch.int8); s=torch.rand(n,1)
x=torch.randn(1,k).bfloat16()
for th in (1,2):
    torch.set_num_threads(th)
    print("probe", th, round(dram_bandwidth(th),1))
    res={}
    for rnd in range(3):
        for cfg in [("float",4,(2,32768)), ("d",1,(2,32768)), ("d",1,(2,65536)), ("d",1,(2,131072)), ("d",1,(2,262144)), ("d",1,(0,4096)), ("d",2,(2,65536)), ("d",2,(2,131072))]:
            e8.set_digits(cfg[0]=="d"); os.environ["DR"]=str(cfg[1]); e8.set_prefetch(*cfg[2])
            res.setdefault(cfg, []).append(bench(lambda: e8.int8_weight_only_mm(x,w,s), 3))
    for k_, v in res.items(): print(th, k_, f"{n*k/statistics.median(v)/1e9:.1f}")
