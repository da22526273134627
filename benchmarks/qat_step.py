"""Benchmark: one QAT training step (forward + backward + AdamW) against the same float step, CPU.

Target (the QAT issue): a fake-quantized step costs at most 1.5x a float step.

Two models, float32, eager:

* ``glassllm``: the bundled real Llama-style decoder (d_model 128, 4 layers), batch 8 x 128 tokens,
  cross-entropy on the next token. Its four ``mlp.down_proj`` (in_features 341) can't be split into
  int4 groups and stay float for the group-wise configs (as the QAT example does).
* ``mlp_stack``: a Llama-like stack where the linears dominate: 4 pre-norm residual SwiGLU blocks,
  d 1024, hidden 4096 (gate/up/down linears, bias-free, random weights), batch 4 x 128, MSE loss.

Each variant (float, and each config prepared with ``QATConfig(config, step="prepare")``) owns a
copy of the same weights and its own AdamW; the variants are timed in interleaved rounds
(``_common.interleaved``: rotated order, samples contaminated by other processes dropped), the
median over the rounds reported. A config whose ratio exceeds the target is profiled
(torch.profiler, a few steps) and its top ops by self CPU time are recorded.

    python benchmarks/qat_step.py                    # writes benchmarks/results/qat_step.{json,md}
    python benchmarks/qat_step.py --rounds 5 --models glassllm
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from lowbit import (  # noqa: E402
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QATConfig,
    quantize_,
)

TARGET = 1.5

CONFIGS = [
    Int8WeightOnlyConfig(),
    Int8DynamicActivationInt8WeightConfig(),
    Int4WeightOnlyConfig(group_size=32),
    Int8DynamicActivationInt4WeightConfig(),
    Float8WeightOnlyConfig(),
    Float8DynamicActivationInt4WeightConfig(group_size=32),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- models ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLUBlock(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def mlp_stack(d: int, layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[SwiGLUBlock(d, 4 * d) for _ in range(layers)]).float()


def make_workload(name: str, args) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str]:
    """(float model, loss_fn(model) on a fixed batch, description)."""
    g = torch.Generator().manual_seed(args.seed)
    if name == "glassllm":
        from lowbit.eval.glassllm import load_glassllm

        model = load_glassllm(torch.float32)
        ids = torch.randint(0, model.cfg.vocab_size, (8, 129), generator=g)

        def loss_fn(m):
            return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        return model, loss_fn, "glassllm (d 128, 4 layers, 0.85M params), batch 8 x 128, cross-entropy"
    if name == "mlp_stack":
        d, n = args.d, args.layers
        model = mlp_stack(d, n, args.seed)
        x = torch.randn(4, 128, d, generator=g)
        y = torch.randn(4, 128, d, generator=g)

        def loss_fn(m):
            return F.mse_loss(m(x), y)

        params = sum(p.numel() for p in model.parameters())
        return model, loss_fn, f"SwiGLU stack ({n} blocks, d {d}, hidden {4 * d}, {params / 1e6:.1f}M params), batch 4 x 128, MSE"
    raise ValueError(name)


def qat_mapping(model: nn.Module, config) -> tuple[dict, list[str]]:
    """Every linear, except those whose in_features the config's group size does not divide."""
    gs = getattr(config, "group_size", None)
    skip = [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and gs is not None and m.in_features % gs != 0]
    return {n: None for n in skip} | {"re:.*": QATConfig(config, step="prepare")}, skip


def make_step(model: nn.Module, loss_fn, lr: float) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step():
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def profile_step(step: Callable[[], None], n: int = 3, top: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs) or 1
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / n} for e in avgs[:top]]


# --- main -----------------------------------------------------------------------------------------


def run_model(name: str, args, deadline: float) -> dict:
    base, loss_fn, desc = make_workload(name, args)
    log(f"== {name}: {desc}")
    steps, skipped = {"float": make_step(copy.deepcopy(base), loss_fn, args.lr)}, {}
    for cfg in CONFIGS:
        model = copy.deepcopy(base)
        mapping, skip = qat_mapping(model, cfg)
        quantize_(model, mapping)
        steps[repr(cfg)] = make_step(model, loss_fn, args.lr)
        skipped[repr(cfg)] = skip
    del base
    for k, fn in steps.items():  # warm-up
        for _ in range(args.warmup):
            fn()
    target_ms = args.sample_ms
    inner = {k: C.calibrate_inner(fn, target_ms) for k, fn in steps.items()}
    log(f"  calls per sample: {inner}")
    samples = C.interleaved(steps, inner, rounds=args.rounds, max_rounds=2 * args.rounds, deadline=deadline,
                            log=log, quiet_wait_s=args.quiet_wait_s)
    float_ms = samples["float"].median()
    ref = samples["float"]
    rows = {}
    for k, s in samples.items():
        # same-round ratios: the machine's speed drifts between rounds, and each round times every
        # variant back to back, so the per-round ratio cancels most of the drift
        paired = [a / b for a, b, fa, fb in zip(s.ms, ref.ms, s.foreign, ref.foreign)
                  if fa <= C.CONTAMINATED_SHARE and fb <= C.CONTAMINATED_SHARE]
        rows[k] = {**s.summary(), "ratio_vs_float": s.median() / float_ms,
                   "paired_ratio_median": statistics.median(paired) if paired else None,
                   "paired_ratios": [round(x, 3) for x in paired],
                   "float_linears_left": skipped.get(k, [])}
    for k, r in rows.items():
        over = k != "float" and max(r["ratio_vs_float"], r["paired_ratio_median"] or 0) > TARGET
        if over or args.profile_all:
            if over:
                log(f"  {k}: {r['ratio_vs_float']:.2f}x > {TARGET}x, profiling")
            r["profile_top_ops"] = profile_step(steps[k])
    if any("profile_top_ops" in r for r in rows.values()) and "profile_top_ops" not in rows["float"]:
        rows["float"]["profile_top_ops"] = profile_step(steps["float"])
    return {"description": desc, "variants": rows}


def to_markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# QAT training step vs float step (CPU, eager, float32)",
        "",
        f"{m['cpu_model']}, {m['torch_threads']} torch threads, torch {m['torch_version']}, {m['timestamp_utc']}.",
        f"One step = forward + backward + AdamW. Median of interleaved samples (each the mean of the "
        f"calls shown), samples contaminated by other processes (> {C.CONTAMINATED_SHARE:.0%} of the cores) dropped. "
        f"Target: QAT step <= {TARGET}x the float step. Two ratios: of the medians, and the median of "
        f"same-round ratios (robust to the machine's drift between rounds); 'yes' needs both <= {TARGET}.",
        "",
    ]
    for name, res in payload["models"].items():
        lines += [f"## {name}", "", res["description"], "", _table(res, "github"), ""]
        for k, r in res["variants"].items():
            if "profile_top_ops" in r:
                lines += [f"Profile of `{k}` (top ops by self CPU time per step):", "",
                          tabulate([(o["op"], f"{o['self_cpu_ms_per_step']:.1f}", f"{o['share']:.0%}", f"{o['calls_per_step']:.0f}")
                                    for o in r["profile_top_ops"]],
                                   headers=("op", "self ms/step", "share", "calls/step"), tablefmt="github"), ""]
    return "\n".join(lines)


def _table(res: dict, fmt: str) -> str:
    rows = []
    for k, r in res["variants"].items():
        ratio, paired = r["ratio_vs_float"], r["paired_ratio_median"]
        ok = "" if k == "float" else ("yes" if max(ratio, paired or 0) <= TARGET else "NO")
        rows.append((k, f"{r['median_ms']:.1f}", f"{r['iqr_ms']:.1f}", f"{ratio:.2f}",
                     "-" if paired is None else f"{paired:.2f}", ok,
                     f"{r['clean_samples']}/{len(r['samples_ms'])}", r["calls_per_sample"],
                     len(r["float_linears_left"]) or ""))
    return tabulate(rows, headers=("variant", "step ms (median)", "IQR ms", "QAT/float (medians)",
                                   "QAT/float (same-round)", f"<= {TARGET}x",
                                   "clean samples", "calls/sample", "linears left float"), tablefmt=fmt)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["glassllm", "mlp_stack"], choices=["glassllm", "mlp_stack"])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10, help="clean samples wanted per variant (up to 2x rounds)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--sample-ms", type=float, default=300.0, help="aim for samples of about this long")
    ap.add_argument("--quiet-wait-s", type=float, default=10.0, help="wait up to this long for a quiet machine per round")
    ap.add_argument("--budget-s", type=float, default=900.0, help="stop extra rounds after this long per model")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-all", action="store_true", help="profile every variant (not only those over the target)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "qat_step.json"))
    args = ap.parse_args(argv)

    t0 = time.time()
    payload = {"machine": C.machine_facts(), "args": vars(args), "target_ratio": TARGET, "models": {}}
    for name in args.models:
        payload["models"][name] = run_model(name, args, deadline=time.time() + args.budget_s)
        print(f"\n{name}: {payload['models'][name]['description']}")
        print(_table(payload["models"][name], "simple"))
    payload["machine"]["loadavg_end"] = os.getloadavg()
    payload["total_s"] = time.time() - t0
    C.write_json(args.out, payload)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(to_markdown(payload) + "\n")
    print(f"\n{torch.get_num_threads()} threads; total {payload['total_s']:.0f} s; wrote {args.out} and {md}")
    return payload


if __name__ == "__main__":
    main()
