# Session 28: bitsandbytes' Linear4bit (nf4, bf16 compute) on CPU in training mode against eval mode, 4096^2, M = 1.
# bitsandbytes 0.50.2 repacks the weight for its CPU kernel at the first forward only when `not self.training`.
# usage: .venv/bin/python benchmarks/results/avx512_zen4/session28/bnb_linear4bit_train_vs_eval.py
import statistics as st, time
import torch, bitsandbytes as bnb
K = N = 4096
x = torch.randn(1, K).bfloat16()
def build():
    lin = torch.nn.Linear(K, N, bias=False).bfloat16()
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return q.to("cpu")
def t(q):
    with torch.inference_mode():
        q(x); ts = []
        for _ in range(7):
            t0 = time.perf_counter(); q(x); ts.append(time.perf_counter() - t0)
    return st.median(ts) * 1e3
train, ev = build(), build().eval()
print(f"training mode {t(train):.2f} ms   eval mode {t(ev):.2f} ms   (threads {torch.get_num_threads()})")
