"""Int4 weight-only, bf16 x, M from 5: gemm_bf16 (int4_cpu's gemm_bf16: panels dequantized inside the GEMM)
against gemm_small_bf16 (M <= 64) and linear_chunked (dequantize 1024 rows, torch.mm), and bf16 F.linear,
one process, interleaved medians.
  .venv/bin/python benchmarks/results/avx512_zen4/scratch/int4_gemm_bf16_vs_paths.py [reps]"""
import sys

import torch
import torch.nn.functional as F

from lowbit.eval.demo import _paired_medians
from lowbit.granularity import PerGroup
from lowbit.kernels import _ext
from lowbit.primitives import choose_qparams_affine, dequantize_affine, pack_int4, quantize_affine
from lowbit.spec import QuantSpec

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
ext = _ext.load("int4_cpu")
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
cases = {"4096x4096 g128": ([(4096, 4096)], 128),
         "SmolLM2 layer g64 (q,k,v,o,gate,up,down)": ([(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)], 64)}
torch.manual_seed(0)
for name, (layer_shapes, g) in cases.items():
    spec = QuantSpec("uint4", PerGroup(g), symmetric=False, zero_point_dtype=torch.int8)
    ws, wb = [], []
    for n, k in layer_shapes:
        w = torch.randn(n, k)
        s, zp = choose_qparams_affine(w, spec)
        q = quantize_affine(w, s, zp, spec)
        ws.append((pack_int4(q), s, zp))
        wb.append(dequantize_affine(q, s, zp, spec, output_dtype=torch.bfloat16))
    for m in (5, 8, 16, 32, 64, 128, 256):
        xs = [torch.randn(m, k).bfloat16() for _, k in layer_shapes]
        fns = {"gemm_bf16": lambda: [ext.gemm_bf16(x, *w, None) for x, w in zip(xs, ws)],
               "chunked": lambda: [ext.linear_chunked(x, *w, None, 1024) for x, w in zip(xs, ws)],
               "bf16": lambda: [F.linear(x, w) for x, w in zip(xs, wb)]}
        if m <= 64:
            fns["gemm_small"] = lambda: [ext.gemm_small_bf16(x, *w, None) for x, w in zip(xs, ws)]
        med = {k: v * 1e3 for k, v in _paired_medians(fns, reps).items()}  # make demo's interleaved medians
        print(f"{name:42s} M={m:4d}  " + "  ".join(f"{k} {v:7.3f} ({med['bf16'] / v:.2f}x)" for k, v in med.items()), flush=True)
