"""The host-dependent CPU paths, timed against each other in one process (interleaved medians).

1. ``lowbit::int8_mm``'s three routes on a CPU without int8 dot products: our AVX2 ``mm_i8``, the exact
   float32 GEMMs (``_int8_mm_float32``) and ``torch._int_mm``, for 4096 x 4096 and SmolLM2's 1536 x 576
   and 576 x 1536 weights at M = 1 .. 512: where ``_MM_I8_MAX_M`` and ``_FLOAT_MM_MIN_M`` in
   ``lowbit/kernels/w8a8.py`` come from. (``mm_i8`` exists in the AVX2 build only: absent elsewhere.)
2. float8 activations at M = 1 on 8 x ``Linear(4096, 4096)`` bf16 (per-row scales): the one-pass C++ fake
   quantization against the aten ops it replaces, with float8 weight-only and bf16 beside them.

Run: ``python benchmarks/cpu_paths.py [--rounds 7]``; writes ``benchmarks/results/cpu_paths.json``.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, machine_facts, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SHAPES = [(4096, 4096), (1536, 576), (576, 1536)]
M_VALUES = [1, 16, 32, 64, 128, 256, 512]


def int8_mm_routes(rounds: int, log) -> list[dict]:
    from lowbit.kernels import _ext
    from lowbit.kernels.w8a8 import _int8_mm_float32

    mm_i8 = getattr(_ext.load("int8_act"), "mm_i8", None)
    rows = []
    for n, k in SHAPES:
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        for m in M_VALUES:
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(m))
            fns = {"_int_mm": lambda: torch._int_mm(a, b.t()), "float32": lambda: _int8_mm_float32(a, b)}
            if mm_i8 is not None:
                fns["mm_i8"] = lambda: mm_i8(a, b)
            samples = interleaved(fns, {x: 1 for x in fns}, rounds, quiet_wait_s=2.0)
            row = {"N": n, "K": k, "M": m, **{f"{x}_ms": s.median() for x, s in samples.items()}}
            log(row)
            rows.append(row)
    return rows


def float8_activations(rounds: int, log) -> dict:
    from lowbit import quantize_
    from lowbit.configs import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig
    from lowbit.granularity import PerRow
    from lowbit.kernels import float8 as f8

    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(8)]).bfloat16()
    dyn = quantize_(copy.deepcopy(base), Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    wo = quantize_(copy.deepcopy(base), Float8WeightOnlyConfig())
    x = torch.randn(1, 4096).bfloat16()
    fused = f8._fake_quantize_cpu

    def run(model):
        with torch.inference_mode():
            for layer in model:
                layer(x)

    def aten():
        f8._fake_quantize_cpu = lambda *a: None
        try:
            run(dyn)
        finally:
            f8._fake_quantize_cpu = fused

    fns = {"bf16": lambda: run(base), "float8 weight-only": lambda: run(wo),
           "float8 dynamic, one-pass activation": lambda: run(dyn), "float8 dynamic, aten activation": aten}
    for fn in fns.values():
        fn()
    samples = interleaved(fns, {x: 1 for x in fns}, 2 * rounds, quiet_wait_s=2.0)
    out = {f"{x}_ms": s.median() for x, s in samples.items()}
    log(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(RESULTS, "cpu_paths.json"))
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    facts = {**machine_facts(), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}
    data = {"machine": facts, "int8_mm": int8_mm_routes(args.rounds, log), "float8_m1": float8_activations(args.rounds, log)}
    data["machine"]["load_avg_end"] = os.getloadavg()
    write_json(args.out, data)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
