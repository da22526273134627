"""Int4 (g32) QAT vs float fine-tuning + int4 PTQ on glassllm, on real text, on the CPU.

Both runs start from the same glassllm weights and see the same batches in the same order with
the same optimizer and schedule; they differ only in the model:

* float:  fine-tune the float model, then ``quantize_`` it with ``Int4WeightOnlyConfig(group_size=32)`` (PTQ);
* QAT:    ``QATConfig(cfg, step="prepare")``, fine-tune the fake-quantized model, ``step="convert"``.

Optionally (``--qat-from-float-steps K``, default on) a third run starts QAT from the float
fine-tuned weights for K extra steps (the common recipe), with a control that fine-tunes the
float model for the same K extra steps and then applies PTQ.

Text: ``eval_text()`` (Python's ``pydoc_data.topics``), tokenized with the glassllm tokenizer; the
first 90% of the tokens train, the last 10% are held out (no overlap). Held-out perplexity uses
``lowbit.eval.perplexity.perplexity`` over non-overlapping 128-token windows.

The four ``mlp.down_proj`` layers (in_features 341) cannot be packed into int4 groups of 32, so
every int4 step (PTQ, QAT prepare and convert) uses the mapping
``{down_proj names: None} | {"re:.*": cfg}`` and leaves them float. The output head is tied to the
embedding: it is quantized (QAT fake-quantizes the shared weight in the head only), the embedding
stays float.

    python examples/qat_finetune.py                      # defaults: 400 steps, lr 5e-4, batch 8 x 128
    python examples/qat_finetune.py --steps 200 --lr 1e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import Int4WeightOnlyConfig, QATConfig, quantize_
from lowbit.eval.glassllm import eval_text, glassllm_tokenizer, load_glassllm
from lowbit.eval.perplexity import perplexity

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - optional
    tqdm = None

try:
    from tabulate import tabulate
except ImportError:  # pragma: no cover - optional
    tabulate = None

SEQ_LEN = 128  # glassllm's max_len


def int4_mapping(model: nn.Module, config, group_size: int) -> dict:
    """``{down_proj: None} | {"re:.*": config}``: every linear but those whose in_features int4
    groups can't split (glassllm's four 341-wide ``mlp.down_proj``)."""
    skip = {name: None for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.in_features % group_size != 0}
    return skip | {"re:.*": config}


def batch_starts(n_train_tokens: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Random window starts ``(steps, batch)``: one fixed data order shared by every run."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_train_tokens - SEQ_LEN - 1, (steps, batch), generator=g)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: nn.Module, train_ids: torch.Tensor, starts: torch.Tensor, lr: float, seed: int,
          label: str, weight_decay: float = 0.0) -> dict:
    """AdamW fine-tuning on the windows ``starts``; returns losses and per-step times (s)."""
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = starts.shape[0]
    warmup = max(1, steps // 10)
    offsets = torch.arange(SEQ_LEN + 1)
    losses, times = [], []
    it = range(steps)
    bar = tqdm(it, desc=label, file=sys.stdout, mininterval=2.0, leave=False) if tqdm else None
    for step in it:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        window = train_ids[starts[step].unsqueeze(1) + offsets]  # (B, L + 1)
        t0 = time.perf_counter()
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
        elif step % 50 == 0 or step == steps - 1:
            print(f"  {label} step {step + 1}/{steps} loss {statistics.fmean(losses[-50:]):.3f}", flush=True)
    if bar is not None:
        bar.close()
    model.eval()
    return {"losses": losses, "step_times_s": times}


def step_time_summary(times: list[float]) -> dict:
    t = times[5:] if len(times) > 10 else times  # drop warm-up steps
    return {"mean_ms": 1e3 * statistics.fmean(t), "median_ms": 1e3 * statistics.median(t)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="training steps of each run")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (warm-up + cosine)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows of 128 tokens per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--held-out", type=float, default=0.1, help="share of the tokens held out (the end)")
    ap.add_argument("--qat-from-float-steps", type=int, default=100,
                    help="extra run: QAT starting from the float fine-tuned model for this many steps "
                         "(and a float control of the same extra steps + PTQ); 0 to skip")
    ap.add_argument("--qat-from-float-lr", type=float, default=None, help="peak lr of that run (default: --lr / 3)")
    ap.add_argument("--out", default="examples/results/qat_finetune.json")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    cfg = Int4WeightOnlyConfig(group_size=args.group_size)

    ids = torch.tensor(glassllm_tokenizer().encode(eval_text()), dtype=torch.long)
    split = int(len(ids) * (1 - args.held_out))
    train_ids, held_ids = ids[:split], ids[split:]
    print(f"text: {len(ids)} tokens; train {len(train_ids)} (first {1 - args.held_out:.0%}), "
          f"held out {len(held_ids)} (last {args.held_out:.0%}, {(len(held_ids) - 1) // SEQ_LEN} windows of {SEQ_LEN})")

    def ppl(model: nn.Module) -> float:
        return perplexity(model, held_ids, SEQ_LEN)

    def ptq(model: nn.Module) -> nn.Module:
        q = copy.deepcopy(model)
        quantize_(q, int4_mapping(q, cfg, args.group_size))
        return q

    base = load_glassllm(torch.float32)
    mapping = int4_mapping(base, cfg, args.group_size)
    skipped = [k for k, v in mapping.items() if v is None]
    print(f"int4 g{args.group_size}: {len(skipped)} linears left float (in_features not a multiple of "
          f"{args.group_size}): {', '.join(skipped)}; the embedding stays float, the tied lm_head is quantized")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps x "
          f"batch {args.batch_size} x {SEQ_LEN} tokens, AdamW lr {args.lr:g} (10% warm-up, cosine to 10%), "
          f"grad clip 1.0, seed {args.seed}")

    starts = batch_starts(len(train_ids), args.steps, args.batch_size, args.seed)
    results = {"fp32 original": ppl(base), "int4 PTQ of original": ppl(ptq(base))}

    # run 1: float fine-tuning, then PTQ
    float_model = copy.deepcopy(base)
    float_run = train(float_model, train_ids, starts, args.lr, args.seed, "float")
    results["fp32 fine-tuned"] = ppl(float_model)
    results["fine-tuned + int4 PTQ"] = ppl(ptq(float_model))

    # run 2: QAT from the same weights, same batches
    qat_model = copy.deepcopy(base)
    quantize_(qat_model, int4_mapping(qat_model, QATConfig(cfg, step="prepare"), args.group_size))
    qat_run = train(qat_model, train_ids, starts, args.lr, args.seed, "QAT")
    results["QAT fake-quant (prepared)"] = ppl(qat_model)
    quantize_(qat_model, int4_mapping(qat_model, QATConfig(cfg, step="convert"), args.group_size))
    results["QAT fine-tuned + convert (int4)"] = ppl(qat_model)

    def recovery(ppl_ptq: float, ppl_qat: float, ppl_float: float) -> float:
        return 100.0 * (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_float)

    rec = recovery(results["fine-tuned + int4 PTQ"], results["QAT fine-tuned + convert (int4)"], results["fp32 fine-tuned"])
    extra = {}
    if args.qat_from_float_steps > 0:
        k = args.qat_from_float_steps
        lr2 = args.qat_from_float_lr if args.qat_from_float_lr is not None else args.lr / 3
        starts2 = batch_starts(len(train_ids), k, args.batch_size, args.seed + 1)  # fresh batches
        ctrl = copy.deepcopy(float_model)
        train(ctrl, train_ids, starts2, lr2, args.seed + 1, "float +K")
        results[f"fp32 fine-tuned +{k} steps"] = ppl(ctrl)
        results[f"fine-tuned +{k} steps + int4 PTQ"] = ppl(ptq(ctrl))
        qat2 = copy.deepcopy(float_model)
        quantize_(qat2, int4_mapping(qat2, QATConfig(cfg, step="prepare"), args.group_size))
        train(qat2, train_ids, starts2, lr2, args.seed + 1, "QAT from float")
        quantize_(qat2, int4_mapping(qat2, QATConfig(cfg, step="convert"), args.group_size))
        results[f"fine-tuned + {k} QAT steps + convert (int4)"] = ppl(qat2)
        extra = {
            "steps": k, "lr": lr2,
            # vs PTQ of the same float model QAT started from, and vs the float control of the same extra steps
            "recovery_vs_start_ptq_pct": recovery(results["fine-tuned + int4 PTQ"],
                                                  results[f"fine-tuned + {k} QAT steps + convert (int4)"],
                                                  results["fp32 fine-tuned"]),
            "recovery_vs_control_ptq_pct": recovery(results[f"fine-tuned +{k} steps + int4 PTQ"],
                                                    results[f"fine-tuned + {k} QAT steps + convert (int4)"],
                                                    results[f"fp32 fine-tuned +{k} steps"]),
        }

    st_float, st_qat = step_time_summary(float_run["step_times_s"]), step_time_summary(qat_run["step_times_s"])
    rows = [(name, v) for name, v in results.items()]
    headers = ("model", "held-out ppl")
    print()
    print(tabulate(rows, headers=headers, floatfmt=".2f") if tabulate else "\n".join(f"{a:44s} {b:.2f}" for a, b in rows))
    print()
    print(f"QAT recovers {rec:.1f}% of the int4 PTQ perplexity loss "
          f"(PTQ {results['fine-tuned + int4 PTQ']:.2f} vs fp32 fine-tuned {results['fp32 fine-tuned']:.2f}; "
          f"QAT converted {results['QAT fine-tuned + convert (int4)']:.2f})")
    if extra:
        k = extra["steps"]
        print(f"QAT from the fine-tuned float model (+{k} steps, lr {extra['lr']:g}) recovers "
              f"{extra['recovery_vs_start_ptq_pct']:.1f}% of the loss of PTQ on its starting point, "
              f"{extra['recovery_vs_control_ptq_pct']:.1f}% against a float control of the same +{k} steps + PTQ")
    print(f"mean train step: float {st_float['mean_ms']:.1f} ms, QAT {st_qat['mean_ms']:.1f} ms "
          f"({st_qat['mean_ms'] / st_float['mean_ms']:.2f}x; medians {st_float['median_ms']:.1f} / "
          f"{st_qat['median_ms']:.1f} ms)")
    print(f"final train loss (mean of last 20 steps): float {statistics.fmean(float_run['losses'][-20:]):.3f}, "
          f"QAT {statistics.fmean(qat_run['losses'][-20:]):.3f}")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")

    payload = {
        "args": vars(args),
        "config": repr(cfg),
        "left_float": skipped,
        "tokens": {"train": len(train_ids), "held_out": len(held_ids), "seq_len": SEQ_LEN},
        "held_out_ppl": results,
        "qat_recovery_pct": rec,
        "qat_from_float": extra or None,
        "step_time": {"float": st_float, "qat": st_qat, "ratio_mean": st_qat["mean_ms"] / st_float["mean_ms"]},
        "train_loss_last20": {"float": statistics.fmean(float_run["losses"][-20:]),
                              "qat": statistics.fmean(qat_run["losses"][-20:])},
        "losses_every_10": {"float": float_run["losses"][::10], "qat": qat_run["losses"][::10]},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "total_s": total,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
