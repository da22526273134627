# int8_weight_only_gemm (gemm_bf16.h) on AMX tiles against vdpbf16ps (set_amx) and bf16 F.linear; SQNR against float32 on the dequantized weight.
import torch, time, sys
from lowbit.kernels import _ext
torch.manual_seed(0)
ext = _ext.load("int8_gemv"); print(_ext.status())
print("amx_active", ext.amx_active())
def bench(f, n=15):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
for (M,N,K) in [(256,4096,4096),(64,4096,4096),(100,576,576),(33,1536,576),(256,4096,8192+64)]:
    x=torch.randn(M,K).bfloat16(); w=torch.randint(-127,128,(N,K),dtype=torch.int8); s=torch.rand(N,1)*0.01
    b=torch.randn(N)
    ref = torch.nn.functional.linear(x.float(), (w.float()*s).bfloat16().float(), b)
    ext.set_amx(True); y1=ext.int8_weight_only_gemm(x,w,s,b); t1=bench(lambda: ext.int8_weight_only_gemm(x,w,s,b))
    ext.set_amx(False); y0=ext.int8_weight_only_gemm(x,w,s,b); t0=bench(lambda: ext.int8_weight_only_gemm(x,w,s,b))
    wb=(w.float()*s).bfloat16(); tb=bench(lambda: torch.nn.functional.linear(x,wb,b.bfloat16()))
    def sq(a,r): return (10*torch.log10(r.pow(2).mean()/(a.float()-r).pow(2).mean())).item()
    print(M,N,K, "amx %.2f ms avx512 %.2f ms bf16 %.2f ms"%(t1,t0,tb), "sqnr amx %.1f avx %.1f"%(sq(y1,ref),sq(y0,ref)), "amx==avx", torch.equal(y0,y1), (y0.float()-y1.float()).abs().max().item())
