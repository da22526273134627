"""``python -m lowbit.eval.demo``: every lowbit config on the real glassllm model: size, perplexity, speed."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.configs.base import QuantConfig
from lowbit.eval.glassllm import eval_text, glassllm_tokenizer, load_glassllm
from lowbit.eval.perplexity import perplexity
from lowbit.granularity import PerGroup, PerRow
from lowbit.quantize import quantize_
from lowbit.tensors import QuantizedTensor

__all__ = ["linear_weight_bytes", "calibrate_act_amax", "main"]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of ``model``'s ``nn.Linear`` layers.

    A quantized weight counts every inner tensor (``qdata``, ``scale``, ``zero_point``...); a
    float weight counts its elements. A tied weight counts once per layer that uses it as a
    linear weight.
    """
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


@torch.no_grad()
def calibrate_act_amax(model: nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """``{fqn: max |input|}`` of every ``nn.Linear`` over ``windows: (W, T)`` token ids (batch 1 each)."""
    amax: dict[str, float] = {}

    def hook(fqn):
        def record(module, args):
            amax[fqn] = max(amax.get(fqn, 0.0), args[0].detach().abs().max().item())

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        for row in windows:
            model(row.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return amax


@torch.no_grad()
def _tokens_per_s(model: nn.Module, ids: torch.Tensor, reps: int) -> float:
    x = ids.unsqueeze(0)
    for _ in range(3):  # warm-up: first calls pick kernels and fill caches
        model(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return x.numel() / statistics.median(times)


_GROUP = 32


def _unsplittable(model: nn.Module, group: int) -> list[str]:
    """Linear layers whose in_features groups of ``group`` can't split (glassllm's down_proj: 341)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % group]


def _grouped(model: nn.Module, config: QuantConfig, group: int) -> dict:
    """``config`` on every linear whose in_features splits into groups of ``group``; the others stay float."""
    return {**dict.fromkeys(_unsplittable(model, group)), "re:.*": config}


def _configs(model: nn.Module, amax: dict[str, float]) -> list[tuple[str, QuantConfig | dict]]:
    group = _GROUP
    static = {n: Int8StaticActivationInt8WeightConfig(act_scale=max(a, 1e-8) / 127) for n, a in amax.items()}
    rows = [
        ("Int8WeightOnlyConfig()", Int8WeightOnlyConfig()),
        (f"Int8WeightOnlyConfig(PerGroup({group}))", _grouped(model, Int8WeightOnlyConfig(PerGroup(group)), group)),
        ("Int8DynamicActivationInt8WeightConfig()", Int8DynamicActivationInt8WeightConfig()),
        ("Int8DynamicActivationInt8WeightConfig(act_symmetric=False)",
         Int8DynamicActivationInt8WeightConfig(act_symmetric=False)),
        ("Int8StaticActivationInt8WeightConfig(act_scale=amax/127)", static),
    ]
    for config in (
        Int4WeightOnlyConfig(group_size=32),
        Int4WeightOnlyConfig(group_size=128),
        Int4WeightOnlyConfig(group_size=32, symmetric=True),
        Int8DynamicActivationInt4WeightConfig(),
        Float8DynamicActivationInt4WeightConfig(group_size=32),
    ):
        rows.append((repr(config), _grouped(model, config, config.group_size)))
    rows += [
        ("Float8WeightOnlyConfig()", Float8WeightOnlyConfig()),
        ("Float8DynamicActivationFloat8WeightConfig()", Float8DynamicActivationFloat8WeightConfig()),
        ("Float8DynamicActivationFloat8WeightConfig(PerRow())", Float8DynamicActivationFloat8WeightConfig(PerRow())),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit.eval.demo", description=__doc__)
    parser.add_argument("--windows", type=int, default=128, help="perplexity windows (default 128)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window, at most 128 (default 128)")
    parser.add_argument("--calib-windows", type=int, default=8, help="static calibration windows (default 8)")
    parser.add_argument("--reps", type=int, default=30, help="timed forward passes of 1 x seq-len (default 30)")
    args = parser.parse_args(argv)
    from tabulate import tabulate  # the demo's own dependency (the dev/demo extras); fail before any work
    for name in ("windows", "seq_len", "calib_windows", "reps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.seq_len > 128:
        parser.error("--seq-len must be at most 128 (glassllm's max_len)")

    ids = torch.tensor(glassllm_tokenizer().encode(eval_text()))
    # Calibration windows come from the end of the text, away from the evaluation windows.
    n_calib = args.calib_windows * args.seq_len
    if ids.numel() < n_calib + args.seq_len + 1:
        parser.error("--calib-windows x --seq-len leaves no text to evaluate on")
    calib = ids[-n_calib:].view(args.calib_windows, args.seq_len)
    evaluate = ids[:-n_calib]
    timing = evaluate[: args.seq_len]

    base = load_glassllm(torch.float32)
    n_windows = min(args.windows, (evaluate.numel() - 1) // args.seq_len)
    print(f"glassllm-en ({sum(p.numel() for p in base.parameters()):,} params), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; text: pydoc_data.topics, {n_windows} windows x {args.seq_len} tokens; "
          f"speed: median of {args.reps} forward passes of 1 x {args.seq_len}")
    ref_bytes = linear_weight_bytes(base)
    ref_ppl = perplexity(base, evaluate, args.seq_len, args.windows)
    ref_tps = _tokens_per_s(base, timing, args.reps)
    rows = [["fp32", f"{ref_bytes:,}", "1.00x", f"{ref_ppl:.2f}", "-", f"{ref_tps:,.0f}"]]

    amax = calibrate_act_amax(base, calib)
    for label, config in _configs(base, amax):
        model = quantize_(copy.deepcopy(base), config)
        nbytes = linear_weight_bytes(model)
        ppl = perplexity(model, evaluate, args.seq_len, args.windows)
        rows.append([
            label, f"{nbytes:,}", f"{nbytes / ref_bytes:.2f}x", f"{ppl:.2f}",
            f"{100 * (ppl / ref_ppl - 1):+.2f}%", f"{_tokens_per_s(model, timing, args.reps):,.0f}",
        ])

    headers = ["config", "linear weight bytes", "vs fp32", "perplexity", "delta ppl", "tokens/s"]
    print(tabulate(rows, headers=headers, colalign=("left",) + ("right",) * 5, disable_numparse=True))
    skipped = _unsplittable(base, _GROUP)
    if skipped:
        print(f"PerGroup({_GROUP}) and the int4 configs leave {len(skipped)} layers in fp32 (in_features not "
              f"divisible by the group size): {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
