# Eager prefill of SmolLM2 (real weights) and a 4-layer llama1b-shaped model at M = 64 and 128 tokens, float8
# weight-only and dynamic per-row: the tiled cap at 32 (before) against 192 (_fp8_cpu.tiled_max_m on the AVX2
# build) in one process, interleaved rounds, medians; bf16 eager in the same rounds.
# usage, from the repo root: PYTHONPATH=benchmarks .venv/bin/python benchmarks/results/avx2_zen2/scratch/fp8_tiled_cap_prefill.py [threads] [rounds]
import statistics as st, sys, time

import torch

sys.path.insert(0, "benchmarks")
from e2e import load_llama1b, load_smollm2, shared_copy  # noqa: E402

from lowbit import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow, quantize_  # noqa: E402
from lowbit.kernels import _ext, _fp8_cpu  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
torch.set_num_threads(threads)
assert _ext.active_isa("fp8_cpu") == "avx2" and _fp8_cpu.tiled_max_m() == 192  # _TILED[0] is set per round below
print("threads", torch.get_num_threads())
for name, (base, ids, _) in (("smollm2", load_smollm2()), ("llama1b 4 layers", load_llama1b(4))):
    models = {"bf16": base}
    for cname, cfg in (("fp8wo", Float8WeightOnlyConfig()), ("fp8dq", Float8DynamicActivationFloat8WeightConfig(PerRow()))):
        models[cname] = quantize_(shared_copy(base), cfg)
    for m in (64, 128):
        x = ids[:, :m]
        t = {}
        with torch.inference_mode():
            for i in range(rounds):
                for key, model in models.items():
                    for cap in ((None,) if key == "bf16" else ((32, 192) if i % 2 == 0 else (192, 32))):
                        if cap is not None:
                            _fp8_cpu._TILED[0] = cap
                        t0 = time.perf_counter(); model(x); t.setdefault((key, cap), []).append(time.perf_counter() - t0)
        _fp8_cpu._TILED[0] = 192
        bf = st.median(t[("bf16", None)])
        line = "  ".join(f"{k} cap {c}: {st.median(v) * 1e3:.1f} ms ({bf / st.median(v):.2f}x bf16)"
                         for (k, c), v in t.items() if k != "bf16")
        print(f"{name} prefill M={m}: bf16 {bf * 1e3:.1f} ms  {line}")
