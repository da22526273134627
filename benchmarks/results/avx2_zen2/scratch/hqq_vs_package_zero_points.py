# lowbit's HQQ (float zero point, tensor-l1 selection: what Int4WeightOnlyConfig(zero_point_domain="float",
# qparams="hqq") runs) against the hqq package's optimizer on three SmolLM2 linears at g64: scale and zero point
# differences, how many groups' zero points differ, and each side's final mean |W - W_r|.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/hqq_vs_package_zero_points.py
import warnings

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from lowbit import Int4WeightOnlyConfig
from lowbit.eval.models import load_smollm2
from lowbit.primitives.hqq import hqq_optimize

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
loaded = load_smollm2()
m = loaded[0] if isinstance(loaded, tuple) else loaded
for name in ["model.layers.3.mlp.down_proj", "model.layers.10.self_attn.q_proj", "model.layers.20.mlp.gate_proj"]:
    lin = m.get_submodule(name)
    w = lin.weight.detach().float()
    spec = Int4WeightOnlyConfig(group_size=64, zero_point_domain="float").weight_spec()
    r = hqq_optimize(w, spec)
    h = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu", del_orig=False)
    zp_pkg, s_pkg = h.meta["zero"].reshape(-1), h.meta["scale"].reshape(-1)
    zo, so = r.zero_point.reshape(-1).float(), r.scale.reshape(-1).float()
    print(name, "ours iterates", len(r.objective), "hist", [round(x, 7) for x in r.objective])
    print("  scale rel diff max", float((s_pkg - so).abs().max() / so.abs().max()), " zero |diff| max",
          float((zp_pkg - zo).abs().max()), "mean", float((zp_pkg - zo).abs().mean()))
    print("  groups", zo.numel(), "with |dz| > 0.01:", int(((zp_pkg - zo).abs() > 0.01).sum()))
    print("  mean|W - deq| pkg", float((w - h.dequantize().reshape(w.shape)).abs().mean()))
