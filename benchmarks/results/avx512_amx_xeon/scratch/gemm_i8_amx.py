# gemm_i8 on AMX tiles against vpdpbusd (set_amx), torch._int_mm and bf16 F.linear; exactness against _int_mm.
import torch, time
from lowbit.kernels import _ext
ext=_ext.load("int8_act"); print(_ext.status()["int8_act"], ext.amx_active())
def bench(f, n=15):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
for (M,N,K) in [(256,4096,4096),(64,4096,4096),(100,576,576),(33,1536,576),(256,4096,8192+64),(7,65,100),(40,130,4096+4)]:
    a=torch.randint(-128,128,(M,K),dtype=torch.int8); b=torch.randint(-128,128,(N,K),dtype=torch.int8)
    ref=torch._int_mm(torch.nn.functional.pad(a,(0,0,0,max(0,17-M))), b.t())[:M] if M<=16 else torch._int_mm(a,b.t())
    ext.set_amx(True); y1=ext.gemm_i8(a,b); t1=bench(lambda: ext.gemm_i8(a,b))
    ext.set_amx(False); y0=ext.gemm_i8(a,b); t0=bench(lambda: ext.gemm_i8(a,b))
    ti=bench(lambda: torch._int_mm(a,b.t())) if M>16 else float('nan')
    xb=torch.randn(M,K).bfloat16(); wb=torch.randn(N,K).bfloat16(); tb=bench(lambda: torch.nn.functional.linear(xb,wb))
    print(M,N,K,"amx %.2f avx512 %.2f _int_mm %.2f bf16 %.2f ms"%(t1,t0,ti,tb), "exact", torch.equal(y1,ref), torch.equal(y0,ref))
ext.set_amx(True)
