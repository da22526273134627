"""SmolLM2-135M's decode linears with cold weights: every config against bf16 at M = 1 (issue 18).

``benchmarks/linear_overhead.py`` calls one small layer in a loop, so its weight sits in cache and
the numbers are fixed costs. A decoded token instead runs 210 different linears (30 layers of q, k,
v, o, gate, up, down: 576x576, 192x576, 192x576, 576x576, 1536x576, 1536x576, 576x1536), each weight
read from DRAM once. This benchmark runs exactly that: ``--layers`` stacks of those seven shapes
(default 60, twice SmolLM2's depth, so that even the int4 weights, ~29 MB at 30 layers, exceed the
32 MiB L3), each ``nn.Linear`` with its own random bf16 weight (std 0.02), quantized in place by
each config, called once per pass on a fixed bf16 ``x`` of its width (M = 1, no grad). Attention,
norms and the lm_head are left out: this is the linears' share of a decode step.

Per thread count, variants are interleaved (start rotated each round; ``_common.interleaved``, which
drops samples taken while other processes kept > 10% of the cores busy) and the median sample is
reported: ms per pass, speed against bf16 in the same rounds, and the stored weight bytes per second
as a fraction of this host's DRAM read bandwidth at that thread count (``roofline.dram_bandwidth``,
measured in the same process). Group sizes: g128 where the width allows, else 64 (576 is not a
multiple of 128), as ``benchmarks/e2e.py`` does.

Run: ``python benchmarks/decode_linears.py [--threads 1,2] [--rounds 9] [--configs ...]``; writes
``benchmarks/results/decode_linears.{json,md}`` (``--out``). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CONTAMINATED_SHARE, calibrate_inner, interleaved, machine_facts, tensor_bytes, write_json  # noqa: E402
from roofline import dram_bandwidth  # noqa: E402

from lowbit import quantize_  # noqa: E402
from lowbit.configs.float8 import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig  # noqa: E402
from lowbit.configs.int4 import (  # noqa: E402
    Float8DynamicActivationInt4WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
)
from lowbit.configs.int8 import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig  # noqa: E402
from lowbit.kernels import _ext  # noqa: E402

OUT = Path(__file__).parent / "results" / "decode_linears"
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
# name -> config for a linear of width k (None: leave it bf16)
CONFIGS = {
    "int8wo": lambda k: Int8WeightOnlyConfig(),
    "w8a8": lambda k: Int8DynamicActivationInt8WeightConfig(),
    "int4wo-g128": lambda k: Int4WeightOnlyConfig(group_size=128 if k % 128 == 0 else 64),
    "int4wo-g32": lambda k: Int4WeightOnlyConfig(group_size=32),
    "8da4w": lambda k: Int8DynamicActivationInt4WeightConfig(group_size=32),
    "fp8wo": lambda k: Float8WeightOnlyConfig(),
    "fp8dq": lambda k: Float8DynamicActivationFloat8WeightConfig(),
    "fp8a-int4w": lambda k: Float8DynamicActivationInt4WeightConfig(group_size=128 if k % 128 == 0 else 64),
}


def build(layers: int) -> nn.ModuleList:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        for n, k in LAYER:
            lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            nn.init.normal_(lin.weight, std=0.02)
            mods.append(lin)
    return nn.ModuleList(mods)


def quantized(base: nn.ModuleList, name: str) -> nn.ModuleList:
    m = copy.deepcopy(base)
    make = CONFIGS[name]
    quantize_(m, {str(i): make(lin.in_features) for i, lin in enumerate(m)})
    return m


def runner(mods: nn.ModuleList):
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in {lin.in_features for lin in mods}}
    pairs = [(lin, xs[lin.in_features]) for lin in mods]

    def run():
        with torch.no_grad():
            for lin, x in pairs:
                lin(x)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in threads):
        ap.error(f"--threads: positive integers, got {args.threads!r}")

    facts = machine_facts()
    base = build(args.layers)
    models = {"bf16": base, **{n: quantized(base, n) for n in names}}
    nbytes = {n: tensor_bytes(list(m.parameters()) + list(m.buffers()))["total"] for n, m in models.items()}
    fns = {n: runner(m) for n, m in models.items()}
    results = {}
    for t in threads:
        torch.set_num_threads(t)
        bw = dram_bandwidth(t)
        for fn in fns.values():  # warm-up: decode plans made, extensions loaded, thread pool started
            fn()
        inner = {n: calibrate_inner(fn, 150.0) for n, fn in fns.items()}
        samples = interleaved(fns, inner, args.rounds, max_rounds=2 * args.rounds, quiet_wait_s=10.0)
        ms = {n: s.median() for n, s in samples.items()}
        results[str(t)] = {
            "dram_gb_s": bw,
            "rows": {n: {"ms": ms[n], "vs_bf16": ms["bf16"] / ms[n], "weight_mb": nbytes[n] / 1e6,
                         "gb_s": nbytes[n] / ms[n] / 1e6, "of_dram": nbytes[n] / ms[n] / 1e6 / bw,
                         "clean_samples": sum(f <= CONTAMINATED_SHARE for f in s.foreign), "samples": len(s.ms)}
                     for n, s in samples.items()},
        }
    payload = {"what": __doc__.split("\n\n")[0], "layers": args.layers, "linears": len(base), "rounds": args.rounds,
               "machine": facts, "loadavg_end": os.getloadavg(), "isa": {b: _ext.active_isa(b) for b in _ext.BUILDS},
               "results": results}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "decode_linears.json"), payload)
    md = render(payload)
    with open(os.path.join(args.out, "decode_linears.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def render(p: dict) -> str:
    m = p["machine"]
    lines = [f"# SmolLM2 decode linears, cold weights (benchmarks/decode_linears.py)", "",
             f"{m['cpu_model']} | torch {m['torch_version']} | {m['timestamp_utc']} | load "
             f"{m['loadavg_start'][0]:.2f} -> {p['loadavg_end'][0]:.2f} | kernels {p['isa']}", "",
             f"{p['linears']} linears ({p['layers']} x SmolLM2-135M's q, k, v, o, gate, up, down), each its own "
             "weight, M = 1 bf16, one pass per call; median of interleaved rounds.", ""]
    for t, r in p["results"].items():
        lines += [f"## {t} thread(s): DRAM read {r['dram_gb_s']:.1f} GB/s", ""]
        rows = [[n, f"{v['ms']:.2f}", f"{v['vs_bf16']:.2f}x", f"{v['weight_mb']:.1f}", f"{v['gb_s']:.1f}",
                 f"{v['of_dram']:.2f}", f"{v['clean_samples']}/{v['samples']}"] for n, v in r["rows"].items()]
        lines += [tabulate(rows, headers=["variant", "ms per pass", "vs bf16", "weight MB", "GB/s", "of DRAM", "clean"],
                           tablefmt="github"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
