"""SmolLM2-135M decode and prefill, bf16 eager, int4 g32 with a float zero point against the same with
an int8 zero point and against bf16, with make demo's own timing (lowbit.eval.demo._speed: interleaved
medians, decode = generate minus its prompt's prefill). Run from the repo root:
  .venv/bin/python benchmarks/results/avx512_zen4/scratch/smollm2_float_zp_decode.py [reps]"""
import copy
import sys

import torch

from lowbit import quantize_
from lowbit.configs import Int4WeightOnlyConfig
from lowbit.eval import demo

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
base, wrap, text, _, _ = demo._load("smollm2")
bf16 = copy.deepcopy(base).to(torch.bfloat16)
prompt = torch.cat([torch.tensor(text.prefix, dtype=torch.long), text.ids])[:128]  # as make demo
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
for name, cfg in [("int4 g32 float zp", Int4WeightOnlyConfig(group_size=32, zero_point_domain="float")),
                  ("int4 g32 int zp", Int4WeightOnlyConfig(group_size=32))]:
    m = quantize_(copy.deepcopy(bf16), cfg)
    r = demo._speed(m, bf16, wrap, prompt, True, 16, reps)
    print(f"{name:20s} prefill {r['prefill_tps']:7.0f} tok/s ({r['prefill_x']:.2f}x bf16)  "
          f"decode {r['decode_tps']:5.1f} tok/s ({r['decode_x']:.2f}x bf16)", flush=True)
