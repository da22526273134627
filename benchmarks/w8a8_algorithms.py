"""W8A8 (dynamic int8 activations, int8 weights) on SmolLM2 with GPTQ weights and SmoothQuant
(``lowbit.algorithms.smooth_`` then ``gptq`` or ``quantize_``): perplexity vs float32, same model,
windows and evaluation as ``benchmarks/algorithms.py``. Usage: ``python benchmarks/w8a8_algorithms.py
[THREADS]``; prints one row per method and writes ``benchmarks/results/w8a8_algorithms.json``."""

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
warnings.filterwarnings("ignore", message="(quantize_|gptq): ")  # the plan line, the same each row

import lowbit  # noqa: E402
from algorithms import load  # noqa: E402
from lowbit.algorithms import calibration_batches, gptq, smooth_  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402

base, wrap, ids, prefix, name, tok = load("smollm2")
half = ids.numel() // 2
calib = calibration_batches(ids[half:], n_samples=32, seq_len=256, seed=0)
cfg = lowbit.Int8DynamicActivationInt8WeightConfig()
ppl = lambda m: perplexity(wrap(m), ids, 256, 16, prefix=prefix)
ref = ppl(base)
rows = []
for label in ["RTN", "SmoothQuant a=0.5 + RTN", "GPTQ", "SmoothQuant a=0.5 + GPTQ"]:
    m = copy.deepcopy(base); t = time.perf_counter()
    if "Smooth" in label: smooth_(m, calib, alpha=0.5)
    if "GPTQ" in label: gptq(m, cfg, calib)
    else: quantize_(m, cfg)
    sec = time.perf_counter() - t; v = ppl(m)
    rows.append({"method": label, "perplexity": round(v, 4), "delta_pct": round(100 * (v / ref - 1), 2), "seconds": round(sec, 1)})
    print(rows[-1], flush=True)
json.dump({"config": repr(cfg), "gptq": "gptq(model, config, calibration) with its defaults (qparams='search' since 2026-12-04 session 11; 'minmax' before)", "calibration": "32 x 256 tokens, random windows of the second half (seed 0)", "eval": "16 x 256 tokens from the start", "float32_perplexity": ref, "threads": torch.get_num_threads(), "rows": rows}, open(ROOT / "results" / "w8a8_algorithms.json", "w"), indent=2)
