# W8A8 dynamic vs bf16 F.linear on llama1b's linear shapes at M = 256 (prefill), eager, 2 threads; medians of 3 x 11.
import torch, time, copy, lowbit
torch.set_num_threads(2)
def med(f, n=11):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return sorted(ts)[n//2]*1e3
with torch.inference_mode():
  for K,N in ((2048,2048),(2048,256),(2048,5632),(5632,2048)):
    lin=torch.nn.Linear(K,N,bias=False).bfloat16()
    q=copy.deepcopy(lin); lowbit.quantize_(q, lowbit.Int8DynamicActivationInt8WeightConfig())
    x=torch.randn(256,K).bfloat16()
    tb=[];tq=[]
    for _ in range(3):
        tb.append(med(lambda: lin(x))); tq.append(med(lambda: q(x)))
    b=sorted(tb)[1]; qq=sorted(tq)[1]
    print(f"{K}->{N}: bf16 {b:.3f} ms w8a8 {qq:.3f} ms ({b/qq:.2f}x)")
