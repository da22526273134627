"""GPTQ and HQQ against round-to-nearest (RTN): perplexity and time, int4, on a real model.

Model: SmolLM2-135M-Instruct (float32; ``lowbit.eval.models.load_smollm2``) or glassllm
(``--model glassllm``, as transformers' Llama: ``load_glassllm_hf``). Text: Python's ``pydoc_data.topics`` (``lowbit.eval.eval_text``),
tokenized once. Evaluation: the first ``--windows`` windows of ``--eval-seq-len`` tokens
(``lowbit.eval.perplexity``, as ``benchmarks/accuracy.py``). Calibration (GPTQ only):
``--samples`` random windows of ``--seq-len`` tokens from the SECOND HALF of the text
(``lowbit.algorithms.calibration_batches``), disjoint from the evaluated windows.

Every ``nn.Linear`` gets the config through ``quantize_``'s plan (the same for every method): a
576-wide layer under ``group_size=128`` gets ``group_size=64``; the tied ``lm_head`` stays float
and tied (quantize_'s default). Rows: RTN (``quantize_``), HQQ (``quantize_hqq_``, no data),
GPTQ (``gptq``, block 128, damp 1%) and GPTQ with ``act_order``; HQQ float-zp is HQQ on the same
config with ``zero_point_domain="float"`` (the hqq package's own zero-point domain). Peers
(``peers_algorithms.py``; a peer that is not installed is skipped with a one-line reason): the
``hqq`` package's optimizer ("hqq (pkg)") and llm-compressor's GPTQModifier / AWQModifier
(run by ``llmc_driver.py`` with ``.venv-llmc/bin/python`` in a subprocess on a ``save_pretrained``
copy of the same float model and the same calibration windows; its dequantized weights are loaded
back and evaluated here). "RTN increase removed" is ``(ppl_RTN - ppl) / (ppl_RTN - ppl_float)``.
Seconds are wall time of the method alone (``--threads`` torch threads; llm-compressor: its
``oneshot`` call, without the subprocess's start, model load and write), on whatever else the
machine was doing. "Peak RSS +MB" is the peak resident memory while the method ran over the
resident memory just before it (``_rss.PeakRSS``; llm-compressor: inside its subprocess).

Usage::

    python benchmarks/algorithms.py                       # writes benchmarks/results/algorithms.{json,md}
    python benchmarks/algorithms.py --model glassllm --samples 32 --seq-len 128 --windows 64 \\
        --eval-seq-len 128 --out /tmp/alg
    python benchmarks/algorithms.py --methods "GPTQ act_order,llm-compressor GPTQ" --out /tmp/alg
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _common import machine_facts  # noqa: E402
from _rss import PeakRSS  # noqa: E402
from peers_algorithms import Measured, peer_methods  # noqa: E402

# (lowbit row, peer row): the "ahead of the peers" pairs, reported under the table
PAIRS = [("HQQ", "hqq (pkg)"), ("HQQ float-zp", "hqq (pkg)"), ("GPTQ act_order", "llm-compressor GPTQ"),
         ("GPTQ act_order search", "llm-compressor GPTQ"), ("GPTQ", "llm-compressor GPTQ no-actorder"),
         ("AWQ", "llm-compressor AWQ")]


class LogitsOnly(nn.Module):
    """``ids -> logits`` for a transformers causal LM."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def load(model_key: str):
    """(model to quantize, ids -> logits wrapper factory, token ids, prefix, name, transformers tokenizer)."""
    from lowbit.eval import eval_text, tokenize_for_perplexity

    if model_key == "smollm2":
        from lowbit.eval.models import load_smollm2

        model, tok = load_smollm2()
        text = tokenize_for_perplexity(tok, eval_text())
        return model.float().eval(), LogitsOnly, text.ids, text.prefix, "SmolLM2-135M-Instruct", tok
    from lowbit.eval import glassllm_tokenizer
    from lowbit.eval.models import glassllm_hf_tokenizer, load_glassllm_hf

    text = tokenize_for_perplexity(glassllm_tokenizer(), eval_text())
    return load_glassllm_hf()[0], LogitsOnly, text.ids, text.prefix, "glassllm-en", glassllm_hf_tokenizer()


def methods(calib):
    from lowbit.algorithms import gptq, quantize_hqq_
    from lowbit.algorithms.awq import awq
    from lowbit.quantize import quantize_

    start = [0.0]

    def progress(done, total):
        if done == 1:
            start[0] = time.perf_counter()
        print(f"\r  block {done}/{total} ({time.perf_counter() - start[0]:.0f} s)", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    return {
        "RTN": lambda m, c: quantize_(m, c),
        "HQQ": lambda m, c: quantize_hqq_(m, c),
        "HQQ float-zp": lambda m, c: quantize_hqq_(m, replace(c, zero_point_domain="float")),
        "GPTQ": lambda m, c: gptq(m, c, calib, qparams="minmax", progress=progress),
        "GPTQ act_order": lambda m, c: gptq(m, c, calib, act_order=True, qparams="minmax", progress=progress),
        "GPTQ act_order search": lambda m, c: gptq(m, c, calib, act_order=True, qparams="search", progress=progress),
        "AWQ": lambda m, c: awq(m, c, calib, progress=progress),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2", "glassllm"], default="smollm2")
    p.add_argument("--groups", default="64,128", help="int4 group sizes, comma-separated")
    p.add_argument("--methods", default=None, help="comma-separated rows (default: all of lowbit's, then the peers "
                   "but 'llm-compressor GPTQ no-actorder')")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=str(ROOT / "results" / "algorithms"), help="path without suffix")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="(quantize_|gptq|quantize_hqq_|awq): ")  # the plan line, same each row

    import lowbit
    from lowbit.algorithms import calibration_batches
    from lowbit.eval import perplexity

    base, wrap, ids, prefix, name, tokenizer = load(args.model)
    n_eval = args.windows * args.eval_seq_len + 1
    half = ids.numel() // 2
    if n_eval > half:
        sys.exit(f"{args.windows} x {args.eval_seq_len} evaluation tokens reach into the calibration half "
                 f"({ids.numel()} tokens)")
    calib = calibration_batches(ids[half:], n_samples=args.samples, seq_len=args.seq_len, seed=0)

    def ppl(model):
        return perplexity(wrap(model), ids, args.eval_seq_len, args.windows, prefix=prefix)

    t0 = time.perf_counter()
    ref = ppl(base)
    print(f"{name}: float32 perplexity {ref:.3f} ({time.perf_counter() - t0:.1f} s); calibration "
          f"{args.samples} x {args.seq_len} tokens from the second half of the text", flush=True)
    todo = methods(calib)
    peers, why_missing, llmc = peer_methods(base, tokenizer, calib, args.threads)
    labels = ([m.strip() for m in args.methods.split(",")] if args.methods else
              [*todo, *(k for k in peers if k != "llm-compressor GPTQ no-actorder")])
    todo.update(peers)
    unknown = [m for m in labels if m not in todo]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; allowed: {list(todo)}")
    unavailable = {m: why_missing(m) for m in labels if m in peers and why_missing(m)}
    for label, why in unavailable.items():
        print(f"skip {label}: {why}", flush=True)
    labels = [m for m in labels if m not in unavailable]
    rows = []
    for g in [int(x) for x in args.groups.split(",")]:
        config = lowbit.Int4WeightOnlyConfig(group_size=g)
        rtn_ppl = None
        for label in labels:
            model = copy.deepcopy(base)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                done = todo[label](model, config)
                seconds = time.perf_counter() - t0
            rss, extra = mem.growth_mb, {}
            if isinstance(done, Measured):  # run elsewhere: its own numbers
                seconds, rss, extra = done.seconds, done.rss_growth_mb, done.extra
            value = ppl(model)
            if label == "RTN":
                rtn_ppl = value
            # only meaningful when RTN hurts (on glassllm int4 is within noise, often below float32)
            removed = None if label == "RTN" or rtn_ppl is None or rtn_ppl <= ref else (rtn_ppl - value) / (rtn_ppl - ref)
            rows.append({"config": repr(config), "method": label, "perplexity": round(value, 4),
                         "delta_pct": round(100 * (value / ref - 1), 2),
                         "rtn_increase_removed_pct": None if removed is None else round(100 * removed, 1),
                         "seconds": round(seconds, 1), "peak_rss_growth_mb": round(rss), **extra})
            print(f"{config!r:45} {label:20} ppl {value:8.3f} ({100 * (value / ref - 1):+6.2f}%)"
                  + ("" if removed is None else f"  removes {100 * removed:5.1f}% of RTN's increase")
                  + f"  {seconds:6.1f} s  +{rss:5.0f} MB", flush=True)
            del model
    llmc.close()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"model": name, "float32_perplexity": round(ref, 4), "eval": f"{args.windows} x {args.eval_seq_len} "
             "tokens from the start of pydoc_data.topics", "calibration": f"{args.samples} x {args.seq_len} tokens, "
             "random windows of the second half (seed 0)", "threads": args.threads,
             "float32_weights_mb": round(sum(t.numel() * 4 for t in base.parameters()) / 2**20),
             "skipped": unavailable}
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "machine": machine_facts(), "rows": rows},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(name, ref, setup, rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def markdown(name: str, ref: float, setup: dict, rows: list[dict]) -> str:
    """The results as a table, then each lowbit row against its peer, per config."""
    lines = [f"# HQQ / GPTQ / AWQ vs RTN and the peers, {name}", "",
             f"float32 perplexity {ref:.3f} ({setup['float32_weights_mb']} MB of float32 weights); evaluation: "
             f"{setup['eval']}; calibration: {setup['calibration']}; {setup['threads']} threads. Seconds: the "
             "method alone. Peak RSS +MB: peak resident memory while it ran over the memory just before it "
             "(llm-compressor: its `oneshot` in its own process).", "",
             "| config | method | perplexity | vs float32 | RTN increase removed | seconds | peak RSS +MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        removed = "-" if r["rtn_increase_removed_pct"] is None else f"{r['rtn_increase_removed_pct']:.1f}%"
        lines.append(f"| `{r['config']}` | {r['method']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | {removed} "
                     f"| {r['seconds']:.1f} | {r['peak_rss_growth_mb']:,} |")
    pairs = []
    for config in dict.fromkeys(r["config"] for r in rows):
        by = {r["method"]: r for r in rows if r["config"] == config}
        for ours, peer in PAIRS:
            if ours in by and peer in by:
                a, b = by[ours], by[peer]
                verdict = "ahead or equal" if a["perplexity"] <= b["perplexity"] else "BEHIND"
                pairs.append(f"| `{config}` | {ours} vs {peer} | {a['perplexity']:.3f} vs {b['perplexity']:.3f} | "
                             f"{verdict} | {a['seconds']:.1f} vs {b['seconds']:.1f} | "
                             f"{a['peak_rss_growth_mb']:,} vs {b['peak_rss_growth_mb']:,} |")
    if pairs:
        lines += ["", "## lowbit vs the peers (same model, group sizes, calibration and evaluation text)", "",
                  "| config | rows | perplexity | lowbit | seconds | peak RSS +MB |", "|---|---|---|---|---|---|", *pairs]
    dropped = {r["method"]: r["awq_mappings_dropped"] for r in rows if r.get("awq_mappings_dropped")}
    for method, what in dropped.items():
        lines += ["", f"{method}: mappings left out because their balance layers stay float (no int4 group fits): "
                  + "; ".join(f"`{m}`" for m in what) + "."]
    if setup["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in setup["skipped"].items()) + "."]
    lines += ["", "Peers' specs: the hqq package runs its default `BaseQuantizeConfig(nbits=4, group_size=g)`: "
              "axis 1 (groups along in_features, as ours), uint4 with the min/max scale kept and a FLOAT zero point "
              "(rounded at the start, then optimized freely), so its like-for-like lowbit row is HQQ float-zp; "
              "lowbit's HQQ row keeps the config's int8 zero point (and fits the scale too). llm-compressor runs "
              "int4 asymmetric with an integer zero point (W4A16_ASYM at our group sizes, min/max observer: lowbit's "
              "default spec), lm_head float; GPTQModifier with its defaults (block 128, damping 1%, "
              "actorder static: the peer of GPTQ act_order), AWQModifier with its defaults (duo scaling, 20-point "
              "grid; on grouped-query attention it skips the v_proj -> o_proj mapping, shapes differing) then "
              "QuantizationModifier; calibration batches of 8 as lowbit's gptq."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
