"""Static (per-tensor, calibrated) int8 activations on SmolLM2-135M, where a few ``mlp.down_proj``
inputs carry huge activations: perplexity of static W8A8 with each observer, with SmoothQuant, and
with the worst linears left float; beside it, each linear's largest calibration input over its mean
``|x|`` (what ``lowbit.static.convert`` warns about) and dynamic per-token W8A8 for comparison.

Same model, evaluation windows and calibration as ``benchmarks/w8a8_algorithms.py`` (8 x 256
calibration tokens from the text's second half, 4 x 256 evaluation tokens from its start).
Usage: ``python benchmarks/static_outliers.py``; writes ``benchmarks/results/static_outliers.json``."""

import copy
import json
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

import lowbit  # noqa: E402
from algorithms import load  # noqa: E402
from lowbit.algorithms import calibration_batches  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402
from lowbit.static import UNDERFLOW_STEPS, ObservedLinear, SmoothQuantConfig, StaticQuantConfig, convert, prepare  # noqa: E402

base, wrap, ids, prefix, name, tok = load("smollm2")
calib = calibration_batches(ids[ids.numel() // 2:], n_samples=8, seq_len=256, seed=0)
ppl = lambda m: perplexity(wrap(m), ids, 256, 4, prefix=prefix)
ref = ppl(base)

stats = {}
hooks = []
for fqn, mod in base.named_modules():
    if type(mod) is torch.nn.Linear:
        def hook(m, inp, out, fqn=fqn):
            x = inp[0].detach().float()
            s = stats.setdefault(fqn, [0.0, 0.0, 0])
            s[0] = max(s[0], x.abs().max().item()); s[1] += x.abs().sum().item(); s[2] += x.numel()
        hooks.append(mod.register_forward_hook(hook))
with torch.no_grad():
    for b in calib.split(2):
        wrap(base)(b)
for h in hooks:
    h.remove()
ratio = {k: v[0] / (v[1] / v[2]) for k, v in stats.items()}
worst = sorted(ratio, key=ratio.get, reverse=True)


def static(cfg, skip=(), flagged=None):
    """``base`` calibrated and converted with ``cfg``; ``flagged``: a list to fill with the linears
    whose observed mean |x| is under UNDERFLOW_STEPS of their scale (what ``convert`` warns about)."""
    m = copy.deepcopy(base)
    prepare(m, cfg, filter_fn=lambda mod, fqn: type(mod) is torch.nn.Linear and fqn not in skip)
    with torch.no_grad():
        for b in calib.split(2):
            wrap(m)(b)
    if flagged is not None:
        for fqn, mod in m.named_modules():
            if isinstance(mod, ObservedLinear):
                obs = mod.input_observer
                if obs.mean_abs / float(obs.calculate_qparams()[0].mean()) < UNDERFLOW_STEPS:
                    flagged.append(fqn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(m)


rows = []
def row(label, model):
    v = ppl(model)
    rows.append({"method": label, "perplexity": round(v, 3), "delta_pct": round(100 * (v / ref - 1), 2)})
    print(rows[-1], flush=True)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    row("dynamic per-token W8A8", quantize_(copy.deepcopy(base), lowbit.Int8DynamicActivationInt8WeightConfig()))
flagged = []
row("static, minmax observer", static(StaticQuantConfig(), flagged=flagged))
row("static, percentile 99.99 observer", static(StaticQuantConfig(observer="percentile")))
row("SmoothQuant alpha 0.5 + static", static(SmoothQuantConfig(StaticQuantConfig(), alpha=0.5)))
row("SmoothQuant alpha 0.8 + static", static(SmoothQuantConfig(StaticQuantConfig(), alpha=0.8)))
row(f"static, the {len(flagged)} linears convert warns about left float", static(StaticQuantConfig(), skip=set(flagged)))
out = {"model": name, "float32_perplexity": round(ref, 3), "threads": torch.get_num_threads(), "rows": rows,
       "underflow_steps": UNDERFLOW_STEPS, "flagged": flagged,
       "max_over_mean_abs": {k: round(ratio[k]) for k in worst[:8]}}
(ROOT / "results" / "static_outliers.json").write_text(json.dumps(out, indent=1) + "\n")
