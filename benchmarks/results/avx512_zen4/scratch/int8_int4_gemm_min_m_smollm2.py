# Session 24: the SmolLM2-shape half of int8_int4_gemm_min_m_session24.txt. Needs the two builds ab_rev_csrc.py leaves in
# /tmp/ab_int8_int4_min12 and /tmp/ab_int8_int4_min9 (run it first with VARIANTS="min12:,min9:-DLOWBIT_I4_GEMM_MIN_M=9").
import torch, time, statistics as st, importlib.util
from lowbit.primitives.packing import pack_int4
def mod(tag):
    spec = importlib.util.spec_from_file_location(f"lowbit_int8_int4_{tag}", f"/tmp/ab_int8_int4_{tag}/lowbit_int8_int4_{tag}.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
mods = {t: mod(t) for t in ("min12", "min9")}
gen = torch.Generator().manual_seed(0)
print("threads", torch.get_num_threads())
for k, n in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:
    ws = [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)), torch.rand(n, k // 32) / 100) for _ in range(30)]
    for m in (9, 10, 11):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        r = {t: [] for t in mods}
        for _ in range(9):
            for t, md in mods.items():
                f = lambda: [md.int8_int4_dynamic_linear(x, q, s, None, -128, 127, 1e-5) for q, s in ws]
                f(); t0 = time.perf_counter(); f(); f(); f(); r[t].append((time.perf_counter() - t0) / 3 / 30 * 1e6)
        print(f"30 x ({n}, {k}) g32 M={m}: " + "  ".join(f"{t} {st.median(v):.1f} us" for t, v in r.items()), flush=True)
