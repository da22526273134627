"""``python -m lowbit.eval.demo`` (``make demo``): every lowbit config on real models, at a glance.

For SmolLM2-135M-Instruct and glassllm-en (both real weights; text: Python's ``pydoc_data.topics``):
linear weight MB, perplexity change vs float32, prefill and decode tokens/s vs bf16 (eager, 2
threads, medians), the ``autoquant`` mixed-precision choice within a 1% perplexity budget (glassllm;
SmolLM2 with ``--autoquant-all``), and a PNG of accuracy vs size and speed per model (perplexity
change on a symmetric log axis; each point numbered, the legend naming it by the row's short label).
Rows: every config family, int4 with HQQ's qparams (``qparams="hqq"``, no data), GPTQ's and AWQ's
weights (``lowbit.algorithms.gptq``/``awq``). Static configs are calibrated with ``lowbit.static``
on windows from the end of the text, disjoint from the scored ones; GPTQ on ``--algo-samples`` x
``--algo-seq-len`` tokens at random starts in the text's second half (``calibration_batches``),
AWQ on the same. Windows start with what the
tokenizer puts before a text (``lowbit.eval.tokenize_for_perplexity``: neither model's tokenizer
adds a BOS). Writes ``demo.json`` (settings and ``models``: rows per model), ``demo.md`` and
``<model>.png`` under ``--out`` and prints where; ``--out benchmarks/results/demo`` is what
README's demo table quotes (``benchmarks/tables.py``).

Speed: prefill = one forward pass over ``--prefill`` tokens (batch 1); decode = greedy
``generate`` of ``--new-tokens`` tokens after a short prompt with the KV cache (SmolLM2; glassllm's
module has no KV cache, so its decode column is empty). Both on a bf16 copy of the model, each row
timed interleaved with the bf16 reference (``--reps`` rounds, medians), so "vs bf16" compares runs
made under the same load rather than minutes apart.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.algorithms import awq, calibration_batches, gptq
from lowbit.configs.base import QuantConfig
from lowbit.eval.autoquant import autoquant
from lowbit.eval.perplexity import perplexity, tokenize_for_perplexity
from lowbit.granularity import PerGroup, PerRow
from lowbit.quantize import plan_quantization, quantize_
from lowbit.static import SmoothQuantConfig, StaticQuantConfig, convert, prepare
from lowbit.tensors import QuantizedTensor

__all__ = ["linear_weight_bytes", "DemoRow", "demo_rows", "quick_rows", "main"]

MODELS = ("smollm2", "glassllm")
AUTOQUANT_BUDGET = 0.01


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of ``model``'s ``nn.Linear`` layers (a quantized weight: every
    inner tensor, scales and zero points included; a tied weight once per linear using it)."""
    total = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if isinstance(w, QuantizedTensor):
            names, _ = w.__tensor_flatten__()
            total += sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
        else:
            total += w.numel() * w.element_size()
    return total


@dataclass(frozen=True)
class DemoRow:
    """One row of the demo: a short label (the plot's legend and the md table's first column), the
    config, and the algorithm that makes its weights (None: ``quantize_``/``lowbit.static``'s own)."""

    label: str
    config: QuantConfig | StaticQuantConfig | SmoothQuantConfig
    algorithm: str | None = None  # a key of ALGORITHMS: it reads calibration windows

    def describe(self) -> str:
        """The full config repr, with the algorithm when there is one (the json's ``config``)."""
        return repr(self.config) + (f" + {ALGORITHMS[self.algorithm]}" if self.algorithm else "")


# algorithm -> how it is named in the md and json (HQQ needs no data: it is the configs' qparams="hqq")
ALGORITHMS = {"gptq": "GPTQ (lowbit.algorithms.gptq)", "awq": "AWQ (lowbit.algorithms.awq)"}


def demo_rows() -> list[DemoRow]:
    """Every config family the library has, and HQQ and each calibrated algorithm at int4, in the demo's row order."""
    g64, g128 = Int4WeightOnlyConfig(group_size=64), Int4WeightOnlyConfig(group_size=128)
    return [
        DemoRow("int8 wo", Int8WeightOnlyConfig()),
        DemoRow("int8 wo g32", Int8WeightOnlyConfig(PerGroup(32))),
        DemoRow("W8A8 dyn", Int8DynamicActivationInt8WeightConfig()),
        DemoRow("W8A8 static", StaticQuantConfig()),
        DemoRow("SmoothQuant a=0.8", SmoothQuantConfig(alpha=0.8)),
        DemoRow("SmoothQuant W8A8 dyn", SmoothQuantConfig(Int8DynamicActivationInt8WeightConfig())),
        DemoRow("int4 g128", g128),
        DemoRow("int4 g128 GPTQ", g128, "gptq"),
        DemoRow("int4 g64", g64),
        DemoRow("int4 g64 HQQ", Int4WeightOnlyConfig(group_size=64, qparams="hqq")),
        DemoRow("int4 g64 GPTQ", g64, "gptq"),
        DemoRow("int4 g64 AWQ", g64, "awq"),
        DemoRow("int4 g32 float zp", Int4WeightOnlyConfig(group_size=32, zero_point_domain="float")),
        DemoRow("8da4w g32", Int8DynamicActivationInt4WeightConfig()),
        DemoRow("fp8 wo", Float8WeightOnlyConfig()),
        DemoRow("fp8 dyn per row", Float8DynamicActivationFloat8WeightConfig(PerRow())),
        DemoRow("fp8 static", StaticQuantConfig("float8_e4m3fn")),
        DemoRow("fp8 x int4 g64", Float8DynamicActivationInt4WeightConfig(group_size=64)),
    ]


def quick_rows() -> list[DemoRow]:
    """``--quick``'s rows (CI's reduced mode): int8 weight-only, static int8, int4 g32 and its GPTQ."""
    g32 = Int4WeightOnlyConfig(group_size=32)
    return [demo_rows()[0], DemoRow("W8A8 static", StaticQuantConfig()), DemoRow("int4 g32", g32),
            DemoRow("int4 g32 GPTQ", g32, "gptq")]


def _note(plan) -> str:
    """What quantize_ did beyond the config (``lowbit.quantize.plan_quantization``): smaller groups, what stayed float."""
    parts = []
    counts: dict[str, int] = {}
    for step in plan.fallbacks:
        counts[repr(step.config)] = counts.get(repr(step.config), 0) + 1
    parts += [f"{n} at {c}" for c, n in counts.items()]
    if plan.unfit:
        parts.append(f"{len(plan.unfit)} float (no group fits)")
    if plan.tied:
        parts.append(f"{', '.join(plan.tied)} float (tied to the embedding)")
    return "; ".join(parts)


def _float_note(model: nn.Module) -> str:
    """The linears a calibrated model kept float, named like ``_note``'s (a tied head: "tied to the embedding")."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    kept = [(n, owners.get(id(m.weight), 1) > 1) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m.weight, QuantizedTensor)]
    tied = [n for n, t in kept if t]
    parts = [f"{len(kept) - len(tied)} linear(s) float"] if len(kept) > len(tied) else []
    parts += [f"{', '.join(tied)} float (tied to the embedding)"] if tied else []
    return "; ".join(parts)


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety: tqdm comes with transformers
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None)  # None: only on a terminal


class _Logits(nn.Module):
    """``ids -> logits`` for a transformers causal LM."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def _load(name: str):
    """(float32 model, ``ids -> logits`` wrapper factory, the text's TokenizedText, generate-capable?, max length)."""
    from lowbit.eval.models import load_text

    if name == "glassllm":
        from lowbit.eval.glassllm import glassllm_tokenizer, load_glassllm

        model = load_glassllm(torch.float32, attention="eager")  # an nn.Softmax for the static configs
        return model, (lambda m: m), tokenize_for_perplexity(glassllm_tokenizer(), load_text("pydoc")), False, 128
    from lowbit.eval.models import load_smollm2

    model, tokenizer = load_smollm2()
    return model, _Logits, tokenize_for_perplexity(tokenizer, load_text("pydoc")), True, 2048


def _calibration(ids: torch.Tensor, windows: int, seq_len: int, prefix: tuple[int, ...]) -> torch.Tensor:
    """``windows`` rows of ``seq_len`` tokens from the end of ``ids``, each starting with ``prefix`` as in scoring."""
    calib = ids[-windows * seq_len:].view(windows, seq_len)
    if prefix:
        calib = torch.cat([torch.tensor(prefix).expand(windows, -1), calib[:, : seq_len - len(prefix)]], dim=1)
    return calib


def _algorithm_calibration(ids: torch.Tensor, samples: int, seq_len: int, prefix: tuple[int, ...],
                           scored_tokens: int) -> torch.Tensor:
    """GPTQ's and AWQ's calibration: ``samples`` windows of ``seq_len`` tokens at random starts
    (``calibration_batches``, seed 0) in the second half of ``ids``, each starting with ``prefix`` as
    in scoring.

    Raises:
        ValueError: the scored windows (the first ``scored_tokens`` tokens) reach into the second half.
    """
    start = ids.numel() // 2
    if scored_tokens > start:
        raise ValueError(f"the scored windows ({scored_tokens} tokens) reach into the second half of the text "
                         f"({ids.numel()} tokens), where GPTQ/AWQ calibrate: use fewer --windows or a shorter --seq-len")
    body = calibration_batches(ids[start:], n_samples=samples, seq_len=seq_len - len(prefix))
    if prefix:
        body = torch.cat([torch.tensor(prefix).expand(samples, -1), body], dim=1)
    return body


def _run_algorithm(model: nn.Module, row: DemoRow, algo_calib: torch.Tensor) -> str:
    """Quantize ``model`` in place by ``row.algorithm``; returns what its report adds to the note."""
    if row.algorithm == "gptq":
        raised = gptq(model, row.config, algo_calib).raised_damping  # warned about by gptq as well
        return f"GPTQ damping raised on {len(raised)} linear(s)" if raised else ""
    if row.algorithm == "awq":
        unscaled = [g for g in awq(model, row.config, algo_calib).groups if g.alpha is None]  # warned about by awq
        return f"AWQ left {len(unscaled)} group(s) unscaled" if unscaled else ""
    raise ValueError(f"DemoRow {row.label!r}: algorithm={row.algorithm!r}; allowed: None, {', '.join(ALGORITHMS)}")


def _quantized(base: nn.Module, row: DemoRow, calib: torch.Tensor, algo_calib: torch.Tensor | None,
               wrap) -> tuple[nn.Module, str]:
    """(a quantized copy of ``base``, the row's note); ``algo_calib`` None: the config's round-to-nearest
    tensors in place of GPTQ/AWQ's (the bf16 speed copy: same tensors, same kernels)."""
    model = copy.deepcopy(base)
    config = row.config
    if row.algorithm is not None and algo_calib is not None:
        plan = plan_quantization(model, config)
        with warnings.catch_warnings():  # the note says it
            warnings.filterwarnings("ignore", message="(quantize_|gptq|awq): ", category=UserWarning)
            extra = _run_algorithm(model, row, algo_calib)
        return model, "; ".join(p for p in (_note(plan), extra) if p)
    if isinstance(config, (StaticQuantConfig, SmoothQuantConfig)):
        with warnings.catch_warnings():  # the note says which linears stay float
            warnings.filterwarnings("ignore", message="prepare: ", category=UserWarning)
            prepare(model, config)
        runner = wrap(model)
        with torch.no_grad():
            for batch in calib.split(2):
                runner(batch)
        with warnings.catch_warnings(record=True) as caught:  # convert's underflow warning goes in the note
            warnings.simplefilter("always")
            model = convert(model)
        notes = [_float_note(model)]
        for w in caught:
            m = re.match(r"convert: (\d+) linear\(s\) got a static int8 input scale", str(w.message))
            if m:
                notes.append(f"{m.group(1)} linear(s): most static int8 inputs round to 0 (outliers set the range)")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model, "; ".join(n for n in notes if n)
    plan = plan_quantization(model, config)
    with warnings.catch_warnings():  # the note says it
        warnings.filterwarnings("ignore", message="quantize_: ", category=UserWarning)
        return quantize_(model, config), _note(plan)


def _paired_medians(fns: dict, reps: int) -> dict:
    """Median seconds per call of each of ``fns``: one warm-up call each (kernels chosen, caches filled),
    then ``reps`` rounds calling each once, the order reversed every other round, so that a row and its
    bf16 reference share the host's state (load, clock) instead of being timed minutes apart."""
    names = list(fns)
    for n in names:
        fns[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


@torch.no_grad()
def _speed(model: nn.Module, ref: nn.Module | None, wrap, prompt: torch.Tensor, decode: bool, new_tokens: int,
           reps: int) -> dict:
    """Prefill and decode tokens/s of ``model`` and, timed interleaved with it, of the bf16 ``ref``
    (None: ``model`` is the reference): ``*_x`` = the reference's median time / the model's."""
    pair = {"model": model} if ref is None else {"model": model, "ref": ref}
    runners = {k: wrap(m) for k, m in pair.items()}
    x = prompt.unsqueeze(0)
    pre = _paired_medians({k: (lambda r=r: r(x)) for k, r in runners.items()}, reps)
    out = {"prefill_tps": x.shape[1] / pre["model"], "prefill_x": pre.get("ref", pre["model"]) / pre["model"]}
    if decode:
        short = x[:, :16]
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        mask = torch.ones_like(short)
        g = _paired_medians({k: (lambda m=m: m.generate(short, attention_mask=mask, **gen)) for k, m in pair.items()}, reps)
        p = _paired_medians({k: (lambda r=r: r(short)) for k, r in runners.items()}, reps)
        s = {k: max(g[k] - p[k], 1e-9) for k in pair}  # the new tokens only: generate minus its prompt's prefill
        out["decode_tps"] = new_tokens / s["model"]
        out["decode_x"] = s.get("ref", s["model"]) / s["model"]
    return out


def run_model(name: str, args) -> dict:
    """Every config on one model; returns the rows and the autoquant result as plain data."""
    t_start = time.perf_counter()
    base, wrap, text, can_decode, max_len = _load(name)
    ids, prefix = text.ids, text.prefix
    seq_len = min(args.seq_len, max_len + 1 - max(len(prefix), 1))  # the model sees len(prefix) + seq_len - 1
    n_calib = args.calib_windows * seq_len
    calib = _calibration(ids, args.calib_windows, seq_len, prefix)
    rows_todo = demo_rows() if not args.quick else quick_rows()
    algo_len = min(args.algo_seq_len, max_len)
    algo_calib = None
    if any(r.algorithm is not None for r in rows_todo):
        algo_calib = _algorithm_calibration(ids, args.algo_samples, algo_len, prefix, args.windows * seq_len)
    prompt = torch.cat([torch.tensor(prefix, dtype=torch.long), ids])[: min(args.prefill, max_len)]
    decode = can_decode and args.new_tokens > 0
    print(f"\n== {name} (loaded in {time.perf_counter() - t_start:.1f} s): {sum(p.numel() for p in base.parameters()):,} params; perplexity on {args.windows} x "
          f"{seq_len} tokens of pydoc_data.topics ({text.note}); calibration {args.calib_windows} x {seq_len} from its end; "
          f"GPTQ/AWQ calibration {args.algo_samples} x {algo_len} from its second half")

    def measure(label: str, model_f32: nn.Module, model_bf16: nn.Module, note: str = "", *, config: str | None,
                algorithm: str | None) -> dict:
        ppl = perplexity(wrap(model_f32), ids, seq_len, args.windows, batch_size=4, prefix=prefix)
        return {"label": label, "config": config, "algorithm": algorithm, "bytes": linear_weight_bytes(model_f32),
                "perplexity": ppl, "note": note,
                **_speed(model_bf16, None if model_bf16 is base_bf16 else base_bf16, wrap, prompt, decode,
                         args.new_tokens, args.reps)}

    base_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    rows = [measure("fp32", base, base_bf16, config=None, algorithm=None)]
    ref = rows[0]
    for i, row in enumerate(_progress(rows_todo, len(rows_todo), name), 1):
        t0 = time.perf_counter()
        m32, note = _quantized(base, row, calib, algo_calib, wrap)
        quantize_s = time.perf_counter() - t0
        m16, _ = _quantized(base_bf16, row, calib, None, wrap)
        rows.append(measure(row.label, m32, m16, note, config=row.describe(), algorithm=row.algorithm))
        rows[-1]["quantize_s"] = quantize_s
        print(f"  [{i}/{len(rows_todo)}] {row.label} ({row.describe()}): quantized in {quantize_s:.1f} s, "
              f"{time.perf_counter() - t0:.1f} s in all", flush=True)
        del m32, m16

    aq = None
    if not args.no_autoquant and (name == "glassllm" or args.autoquant_all):
        print("  autoquant (1% budget): sensitivity of every linear, then measured choices ...", flush=True)
        # two candidates keep the sensitivity pass to 2 model evaluations per linear (422 on SmolLM2)
        cands = [Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"), Int8WeightOnlyConfig()]
        data = ids[: args.autoquant_windows * seq_len + 1]
        holdout = ids[-(n_calib + args.autoquant_windows * seq_len + 1): -n_calib]
        t0 = time.perf_counter()
        result = autoquant(base, cands, data, budget=AUTOQUANT_BUDGET, seq_len=seq_len,
                           max_windows=args.autoquant_windows, holdout=holdout, batch_size=4, progress_bar=None,
                           prefix=prefix)
        seconds = time.perf_counter() - t0
        m32 = quantize_(copy.deepcopy(base), dict(result))
        m16 = quantize_(copy.deepcopy(base_bf16), dict(result))
        rows.append(measure("autoquant 1%", m32, m16,
                            f"chosen on other windows: {result.delta_pct:+.2f}% there; held-out "
                            f"{result.holdout_delta_pct:+.2f}%",
                            config=f"autoquant (1% budget): {result.counts()}", algorithm=None))
        rows[-1]["counts"] = result.counts()  # {config repr: layers}
        aq = {**result.to_dict(), "seconds": seconds, "table": result.to_table()}
        del m32, m16

    for r in rows:
        r["mb"] = r["bytes"] / 1e6
        r["delta_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
    return {"model": name, "text": "pydoc", "seq_len": seq_len, "windows": args.windows, "prefix": list(prefix),
            "special_tokens": text.note, "calibration_windows": args.calib_windows,
            "algorithm_calibration": None if algo_calib is None else list(algo_calib.shape), "rows": rows, "autoquant": aq,
            "seconds": time.perf_counter() - t_start}


def table(res: dict) -> str:
    """The md table of one model's rows: the short label first, the full config last."""
    from tabulate import tabulate

    body = []
    for r in res["rows"]:
        decode = f"{r['decode_tps']:.1f} ({r['decode_x']:.2f}x)" if "decode_tps" in r else "-"
        quantize_s = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
        body.append([r["label"], f"{r['mb']:.2f}", f"{r['perplexity']:.3f}",
                     "-" if r is res["rows"][0] else f"{r['delta_pct']:+.2f}%",
                     f"{r['prefill_tps']:,.0f} ({r['prefill_x']:.2f}x)", decode, quantize_s, r["note"],
                     "-" if r["config"] is None else f"`{r['config']}`"])
    headers = ["row", "linear MB", "perplexity", "delta", "prefill tok/s (vs bf16)", "decode tok/s (vs bf16)",
               "quantize s", "note", "config"]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=("left", "right", "right", "right", "right", "right", "right", "left", "left"))


def settings_line(res: dict) -> str:
    """What one model's table was measured on, for the md."""
    line = (f"Perplexity on the first {res['windows']} windows x {res['seq_len']} tokens of `pydoc_data.topics` "
            f"({res['special_tokens']}); static configs calibrated on the last {res['calibration_windows']} x "
            f"{res['seq_len']} tokens")
    if res["algorithm_calibration"]:
        n, length = res["algorithm_calibration"]
        line += (f"; GPTQ/AWQ calibrated on {n} x {length} tokens at random starts (`calibration_batches`, seed 0) "
                 "in the text's second half")
    return line + (". Accuracy in float32; speed in bf16 eager (GPTQ/AWQ rows: the same config's round-to-nearest "
                   "bf16 tensors, the same layout and kernels). *quantize s*: time to quantize the float32 model.")


def _command(argv: list[str] | None) -> str:
    return " ".join(["python -m lowbit.eval.demo", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit.eval.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--windows", type=int, default=8, help="scored perplexity windows (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--calib-windows", type=int, default=4, help="static calibration windows (default 4)")
    parser.add_argument("--prefill", type=int, default=128, help="prefill length in tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decoded tokens (default 16; 0: no decode)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions, median (default 3)")
    parser.add_argument("--autoquant-windows", type=int, default=2,
                        help="windows autoquant decides on, and held-out windows it is checked on (default 2)")
    parser.add_argument("--no-autoquant", action="store_true", help="skip the mixed-precision search")
    parser.add_argument("--autoquant-all", action="store_true",
                        help="autoquant on SmolLM2 too (its sensitivity pass is 422 model evaluations: many minutes "
                             "on 2 cores); by default only on glassllm")
    parser.add_argument("--algo-samples", type=int, default=32,
                        help="GPTQ/AWQ calibration windows, from the text's second half (default 32)")
    parser.add_argument("--algo-seq-len", type=int, default=256,
                        help="tokens per GPTQ/AWQ calibration window, at most the model's context (default 256; "
                             "glassllm: 128)")
    parser.add_argument("--quick", action="store_true", help="four rows only (CI's reduced mode)")
    parser.add_argument("--out", type=Path, default=Path("lowbit-demo"), help="output folder (default ./lowbit-demo)")
    args = parser.parse_args(argv)
    for name in ("windows", "seq_len", "calib_windows", "prefill", "reps", "autoquant_windows", "algo_samples",
                 "algo_seq_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.new_tokens < 0:
        parser.error("--new-tokens must be >= 0")
    from tabulate import tabulate  # noqa: F401  (the demo's own dependency: fail before any work)

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"lowbit demo: torch {torch.__version__}, {torch.get_num_threads()} threads; accuracy in float32, "
          f"speed in bf16 eager (medians of {args.reps})")
    results, md = {}, ["# lowbit demo", "", f"`{_command(argv)}`: torch {torch.__version__}, "
                                               f"{torch.get_num_threads()} threads", ""]
    for name in args.models:
        res = run_model(name, args)
        results[name] = res
        text = table(res)
        print(text)
        if res["autoquant"]:
            print(res["autoquant"]["table"])
        md += [f"## {name} ({res['seconds']:.0f} s)", "", settings_line(res), "", text, ""]
        try:
            from lowbit.eval.plot import plot_tradeoff

            png = plot_tradeoff(res["rows"][1:], args.out / f"{name}.png", speed_key="prefill_x",
                                speed_label="prefill speed vs bf16 (x)", budget_pct=100 * AUTOQUANT_BUDGET,
                                title=f"{name}: perplexity change vs float32, by linear weight size and prefill speed "
                                      f"({res['windows']} x {res['seq_len']} tokens)")
            md += [f"![{name}]({png.name})", ""]
        except ImportError as e:
            print(f"(no plot: {e})")
    meta = {"command": _command(argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    (args.out / "demo.json").write_text(json.dumps({**meta, "models": results}, indent=1, default=str) + "\n")
    (args.out / "demo.md").write_text("\n".join(md))
    print(f"\nwrote {args.out.resolve()}/demo.json, demo.md and one PNG per model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
