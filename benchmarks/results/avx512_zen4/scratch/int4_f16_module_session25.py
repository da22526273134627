# Session 25 (2026-12-06): a float16 model's linears (8 x Linear(2048, 2048), no bias) through quantize_: float16 F.linear
# against int4 weight-only g128 and int8 weight-only, M = 1 / 8 / 16 / 64, 5 rounds each, medians (not interleaved).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_f16_module_session25.py
import torch, time, statistics as st, copy
import lowbit
torch.manual_seed(0)
base = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(8)]).half().eval()
q = copy.deepcopy(base); lowbit.quantize_(q, lowbit.Int4WeightOnlyConfig(group_size=128))
q8 = copy.deepcopy(base); lowbit.quantize_(q8, lowbit.Int8WeightOnlyConfig())
for M in (1, 8, 16, 64):
    x = torch.randn(M, 2048).half()
    r = {}
    for name, m in (("fp16", base), ("int4", q), ("int8wo", q8)):
        with torch.inference_mode():
            for l in m: l(x)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for l in m: l(x)
                ts.append(time.perf_counter() - t0)
        r[name] = st.median(ts) * 1e3
    print(M, "  ".join(f"{k} {v:.2f} ms" for k, v in r.items()), flush=True)
