"""Int8 weight-only, bf16 x, M above the GEMV: gemm_bf16 (the weight made bf16 per L2 panel inside the GEMM,
int8_gemv's int8_weight_only_gemm) against the chunked path it replaces (_weight_only_chunked: rows converted
a chunk at a time, torch.mm per chunk, scale on the output) and bf16 F.linear, one process, interleaved medians.
  .venv/bin/python benchmarks/results/avx512_zen4/scratch/int8wo_gemm_bf16_vs_chunked.py [reps]"""
import sys

import torch
import torch.nn.functional as F

from lowbit.configs import Int8WeightOnlyConfig
from lowbit.eval.demo import _paired_medians
from lowbit.kernels import _ext
from lowbit.kernels.int8 import _weight_only_chunked

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
ext = _ext.load("int8_gemv")
spec = Int8WeightOnlyConfig().weight_spec()
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
shapes = {"4096x4096": [(4096, 4096)], "SmolLM2 layer (q,k,v,o,gate,up,down)": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]}
torch.manual_seed(0)
for name, layer_shapes in shapes.items():
    ws = [(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) * 0.01 + 1e-3) for n, k in layer_shapes]
    wb = [(q.float() * s).bfloat16() for q, s in ws]
    for m in (9, 16, 32, 64, 128, 256):
        xs = [torch.randn(m, k).bfloat16() for _, k in layer_shapes]
        fns = {
            "gemm_bf16": lambda: [ext.int8_weight_only_gemm(x, q, s) for x, (q, s) in zip(xs, ws)],
            "chunked": lambda: [_weight_only_chunked(x, q, s, None) for x, (q, s) in zip(xs, ws)],
            "bf16": lambda: [F.linear(x, w) for x, w in zip(xs, wb)],
        }
        med = {k: v * 1e3 for k, v in _paired_medians(fns, reps).items()}  # make demo's interleaved medians
        print(f"{name:38s} M={m:4d}  " + "  ".join(f"{k} {v:7.3f} ms ({med['bf16'] / v:.2f}x)" for k, v in med.items()), flush=True)
