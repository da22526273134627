"""Per-call cost of a quantized ``F.linear`` at decode (M = 1, bf16) against its kernel floor (issue 18).

On SmolLM2-135M's linear shapes (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down) and
one thread, for every lowbit config the decode benchmark runs, three timings per shape:

* ``bf16``: ``F.linear(x, w)`` with the float weight;
* ``<config>``: ``F.linear(x, w_q)`` with the quantized tensor subclass (what a model's layer runs:
  ``__torch_function__``, the tensor's linear, the kernels' routing, the C++ kernel);
* ``<config>/floor``: the same C++ kernel(s) called directly with arguments prepared once (for
  activation configs the one-call entry the decode plan runs, where the build has it).

``<config> - <config>/floor`` is the Python overhead per call. The weight stays in cache (one small
layer called in a loop), so this measures the fixed costs, not DRAM streaming. Every variant of a
shape runs ``--inner`` calls per sample, variants interleaved (start rotated) for ``--rounds``
rounds; the median sample is reported in microseconds per call.

Run: ``python benchmarks/linear_overhead.py [--rounds 15] [--inner 200] [--threads 1]``; writes
``benchmarks/results/linear_overhead.json`` (``--out``). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import quantize_
from lowbit.configs.float8 import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig
from lowbit.configs.int4 import (
    Float8DynamicActivationInt4WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
)
from lowbit.configs.int8 import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
from lowbit.kernels import _ext

OUT = Path(__file__).parent / "results" / "linear_overhead.json"
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out_features, in_features)
CONFIGS = {
    "int8wo": lambda: Int8WeightOnlyConfig(),
    "w8a8": lambda: Int8DynamicActivationInt8WeightConfig(),
    "int4wo-g128": lambda: Int4WeightOnlyConfig(group_size=128),
    "8da4w": lambda: Int8DynamicActivationInt4WeightConfig(group_size=32),
    "fp8wo": lambda: Float8WeightOnlyConfig(),
    "fp8dq": lambda: Float8DynamicActivationFloat8WeightConfig(),
    "fp8a-int4w": lambda: Float8DynamicActivationInt4WeightConfig(group_size=128),
}


def _floor(name: str, w, x: torch.Tensor):
    """A function calling ``name``'s C++ kernel(s) directly on ``w``'s fields (prepared once), or None
    when the extension is not built here."""
    n = w.shape[0]
    if name == "int8wo":
        if _ext.load("int8_gemv") is None:
            return None
        s = w.scale.expand(n, -1)
        op = torch.ops.lowbit_cpu.int8_weight_only_mm
        return lambda: op(x, w.qdata, s)
    if name == "w8a8":
        ext = _ext.load("int8_act")
        if ext is None or not hasattr(ext, "mm_i8"):
            return None
        s_w, eps = w.scale.expand(n, 1).reshape(-1).contiguous(), w.act_spec.eps
        if hasattr(ext, "w8a8_dynamic_linear"):  # the one-call entry the decode plan runs
            return lambda: ext.w8a8_dynamic_linear(x, w.qdata, s_w, None, eps)

        def f():
            xq, s_x = ext.quantize_i8(x, -1.0, 0, eps)
            return ext.w8a8_epilogue(ext.mm_i8(xq, w.qdata), s_x, s_w, None, None, x)
        return f
    if name == "int4wo-g128":
        if _ext.load("int4_cpu") is None:
            return None
        op = torch.ops.lowbit_cpu.int4_gemv_bf16
        return lambda: op(x, w.qdata, w.scale, w.zero_point, None)
    if name == "8da4w":
        ext = _ext.load("int8_int4")
        if ext is None:
            return None
        a = w.act_spec
        if hasattr(ext, "int8_int4_dynamic_linear"):
            return lambda: ext.int8_int4_dynamic_linear(x, w.qdata, w.scale, None, a.qmin, a.qmax, a.eps)

        def f():
            xq, s, zp, _ = ext.quantize_act_asym(x, a.qmin, a.qmax, a.eps)
            out = torch.empty(1, n, dtype=x.dtype)
            return ext.int8_int4_linear(xq, s, zp.to(torch.int32), w.qdata, w.scale, None, out)
        return f
    fp8 = _ext.load("fp8_cpu")
    act = _ext.load("int8_act")
    if name == "fp8wo":
        if fp8 is None:
            return None
        return lambda: fp8.fp8_linear(x, w.qdata, w.scale, None, 4, 32, 256)
    if name == "fp8dq":
        if fp8 is None or act is None:
            return None
        eps = w.act_spec.eps
        if hasattr(fp8, "fp8_linear_act"):  # the fake quantization inside the GEMV's call
            return lambda: fp8.fp8_linear_act(x, w.qdata, w.scale, None, 4, 32, 256, False, eps, False)

        def f():
            xf, _ = act.fake_quant_fp8(x, -1.0, False, eps, False)
            return fp8.fp8_linear(xf, w.qdata, w.scale, None, 4, 32, 256)
        return f
    if name == "fp8a-int4w":
        if act is None or _ext.load("int4_cpu") is None:
            return None
        op, eps = torch.ops.lowbit_cpu.int4_gemv_bf16, w.act_spec.eps
        i4 = _ext.load("int4_cpu")
        if hasattr(i4, "gemv_bf16_act"):
            return lambda: i4.gemv_bf16_act(x, w.qdata, w.scale, None, None, True, eps, False)

        def f():
            xf, _ = act.fake_quant_fp8(x, -1.0, True, eps, False)
            return op(xf, w.qdata, w.scale, None, None)
        return f
    raise ValueError(f"unknown config {name!r}")


def _variants(n: int, k: int, configs: list[str]) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.05
    fns = {"bf16": lambda: F.linear(x, w)}
    for name in configs:
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        quantize_(lin, CONFIGS[name]())
        wq = lin.weight
        fns[name] = lambda wq=wq: F.linear(x, wq)
        floor = _floor(name, wq, x)
        if floor is not None:
            fns[f"{name}/floor"] = floor
    return fns


def _measure(fns: dict, rounds: int, inner: int) -> dict:
    names = list(fns)
    samples = {n: [] for n in names}
    for fn in fns.values():  # warm up (and build the extensions)
        for _ in range(20):
            fn()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e6 / inner)
    return {n: statistics.median(s) for n, s in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    load0 = os.getloadavg()[0]
    rows = {}
    with torch.no_grad():
        for n, k in SHAPES:
            rows[f"{n}x{k}"] = _measure(_variants(n, k, configs), args.rounds, args.inner)
    shapes = list(rows)
    print(f"us per call, M=1 bf16, {args.threads} thread(s), median of {args.rounds} rounds x {args.inner} calls "
          f"(load {load0:.2f} -> {os.getloadavg()[0]:.2f})")
    print(f"{'variant':<22}" + "".join(f"{s:>12}" for s in shapes) + f"{'overhead':>12}")
    for name in ["bf16"] + configs:
        for v in (name, f"{name}/floor"):
            if v not in rows[shapes[0]]:
                continue
            line = f"{v:<22}" + "".join(f"{rows[s][v]:>12.1f}" for s in shapes)
            if v == name and f"{name}/floor" in rows[shapes[0]]:
                gap = statistics.mean(rows[s][name] - rows[s][f"{name}/floor"] for s in shapes)
                line += f"{gap:>12.1f}"
            print(line)
    payload = {
        "what": "us per call of F.linear at M=1 bf16 on SmolLM2-135M shapes; <config>/floor = its C++ kernels "
                "called directly; overhead = config - floor",
        "threads": args.threads, "rounds": args.rounds, "inner": args.inner,
        "load_before_after": [load0, os.getloadavg()[0]],
        "isa": {name: _ext.active_isa(name) for name in ("int8_gemv", "int8_act", "int4_cpu", "int8_int4", "fp8_cpu")},
        "torch": torch.__version__,
        "us_per_call": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
