import torch, time, statistics as st
from lowbit.kernels import _ext
torch.set_num_threads(2)
ext = _ext.load("int8_act")
print("int8_act", _ext.active_isa("int8_act"), hasattr(ext, "mm_i8"))
# exactness
g = torch.Generator().manual_seed(0)
for (m,n,k) in [(1,1,1),(3,5,7),(4,4,64),(5,9,65),(17,33,200),(2,130,4096),(1,7,127)]:
    a = torch.randint(-128,128,(m,k),dtype=torch.int8,generator=g); b = torch.randint(-128,128,(n,k),dtype=torch.int8,generator=g)
    assert torch.equal(ext.mm_i8(a,b), a.int() @ b.int().t()), (m,n,k)
print("exact ok")
ws = [torch.randint(-128,128,(4096*8,4096),dtype=torch.int8) for _ in range(2)]
for m in (1,2,4,8,16,32,64):
    a = torch.randint(-128,128,(m,4096),dtype=torch.int8)
    tv, ti = [], []
    for r in range(5):
        w = ws[r%2]
        t0=time.perf_counter(); ext.mm_i8(a,w); tv.append(time.perf_counter()-t0)
        w = ws[(r+1)%2]
        t0=time.perf_counter(); torch._int_mm(a if m>1 else a, w.t()); ti.append(time.perf_counter()-t0)
    print(f"M={m}: mm_i8 {st.median(tv)*1e3:.2f} ms ({128/st.median(tv)/1e3:.1f} GB/s)  _int_mm {st.median(ti)*1e3:.2f} ms")
