# SmolLM2-135M eager decode (bf16, 2 threads) with W8A8 static (one act_scale for every linear: the speed of a
# calibrated model, not its accuracy) through the decode plan (the working tree) and through the routing (the
# plan switched off), and W8A8 dynamic and bf16, interleaved (lowbit.eval.demo._paired_medians), 32 new tokens.
# With `fp8`: the same for float8 (Float8StaticActivationFloat8WeightConfig(act_scale=0.01) against float8 dynamic).
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/w8a8_static_plan_smollm2.py [reps] [fp8]
import copy, sys, warnings

import torch

import lowbit
import lowbit.tensors.float8_tensor as ft
import lowbit.tensors.int8_tensor as it
from lowbit.eval.demo import _paired_medians
from lowbit.eval.models import load_smollm2

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
fp8 = len(sys.argv) > 2 and sys.argv[2] == "fp8"
mod, attr = (ft, "make_float8_plan") if fp8 else (it, "make_int8_plan")
loaded = load_smollm2()
base = (loaded[0] if isinstance(loaded, tuple) else loaded).to(torch.bfloat16)
models = {"bf16": base}
if fp8:
    cfgs = (("dynamic", lowbit.Float8DynamicActivationFloat8WeightConfig()),
            ("static plan", lowbit.Float8StaticActivationFloat8WeightConfig(act_scale=0.01)),
            ("static routing", lowbit.Float8StaticActivationFloat8WeightConfig(act_scale=0.01)))
else:
    cfgs = (("dynamic", lowbit.Int8DynamicActivationInt8WeightConfig()),
            ("static plan", lowbit.Int8StaticActivationInt8WeightConfig(act_scale=0.05)),
            ("static routing", lowbit.Int8StaticActivationInt8WeightConfig(act_scale=0.05)))
for name, cfg in cfgs:
    m = copy.deepcopy(base)
    lowbit.quantize_(m, cfg)
    models[name] = m
orig = getattr(mod, attr)
ids = torch.arange(100, 116).unsqueeze(0)
gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True, attention_mask=torch.ones_like(ids))


def runner(name, m):
    def f():
        setattr(mod, attr, (lambda *a, **k: None) if name == "static routing" else orig)
        with torch.inference_mode():
            m.generate(ids, **gen)
    return f


t = _paired_medians({n: runner(n, m) for n, m in models.items()}, reps)
print("threads", torch.get_num_threads(), "reps", reps, "(32 new tokens after a 16-token prompt, seconds per generate)")
for n, s in t.items():
    print(f"{n:15s} {s * 1e3:8.1f} ms  {32 / s:6.1f} tok/s  vs bf16 {t['bf16'] / s:.2f}x")
