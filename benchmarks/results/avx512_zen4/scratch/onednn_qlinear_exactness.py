import torch, time, statistics
torch.set_num_threads(2)
def bench(fn, reps=11):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)*1e3
ops = torch.ops.onednn
K,N=4096,4096
q=torch.randint(-128,128,(N,K),dtype=torch.int8)
q[0, :] = 127; q[1,:] = -128
packed = ops.qlinear_prepack(q, [1, K])
ones = torch.ones(N); zeros = torch.zeros(N, dtype=torch.int64)
def ql(xu, out_dtype=torch.float32):
    return ops.qlinear_pointwise(xu, 1.0, 128, packed, ones, zeros, None, 1.0, 0, out_dtype, "none", [], "")
for M in (1, 4, 256):
    xq=torch.randint(-128,128,(M,K),dtype=torch.int8); xq[0,:] = -128
    xu=(xq.to(torch.int16)+128).to(torch.uint8)
    acc = torch._int_mm(xq, q.t()) if M > 16 else (xq.int() @ q.int().T)
    out = ql(xu)
    print(M, "bit-equal float(acc):", torch.equal(out, acc.float()), "max abs diff", (out - acc.float()).abs().max().item(), "max |acc|", acc.abs().max().item())
    print("   qlinear ms", round(bench(lambda: ql(xu)),3), "_int_mm ms", round(bench(lambda: torch._int_mm(xq, q.t())),3) if M > 16 else "-")
# unpack via identity
t=time.perf_counter()
I = torch.full((K, K), 128, dtype=torch.uint8); I.diagonal().fill_(129)
W = ql(I)   # (K, N): W[k, n] = q[n, k]
print("unpack exact:", torch.equal(W.t().round().to(torch.int8), q), "ms", (time.perf_counter()-t)*1e3)
print("packed nbytes?", packed.dtype, packed.layout, packed.shape, packed.is_mkldnn)
