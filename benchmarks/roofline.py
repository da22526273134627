"""Benchmark: every CPU linear kernel as a fraction of this host's own limits, measured in the same process.

Limits (measured first, then again after the kernels; the larger is kept):

* DRAM read bandwidth with 1 and N threads: ``torch.sum`` over a 1 GiB float32 tensor (no L3 reuse);
* compute peaks on 1024^3: ``F.linear`` in bf16 and in float32, ``torch._int_mm`` in int8 (VNNI where the CPU
  has it). These are what torch reaches, not the silicon's datasheet peak. On a CPU without AVX-512 BF16 and
  VNNI (this project's AVX2 hosts) bf16 and int8 run far below float32: the table says so.

Kernels (every lowbit config, eager, N threads, interleaved rounds, medians; _common.py drops samples taken
while other processes used > 10% of the cores):

* decode, M = 1 and 4, on 8 stacked ``Linear(4096, 4096)`` (bf16 weights 256 MiB; every quantized copy is
  over the 32 MiB L3): the fraction is weight bytes read / time / DRAM bandwidth (activations are negligible);
* prefill, M = 256, on one ``Linear(4096, 4096)``: 2 M N K / time over the peak of the arithmetic the config
  promises (int8 peak for W8A8 and 8da4w, the better of the bf16 and float32 peaks for the rest). 8da4w and fp8 x int4 fake-quantize their
  activations then run the int4 weight-only kernel (README's design notes): their int8 fraction shows the gap.

Peers (torchao, bitsandbytes, optimum-quanto) are not in this table yet: benchmarks/linear.py times them.

    python benchmarks/roofline.py                 # writes results/roofline.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved, machine_facts, module_weight_bytes, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N = K = 4096
DECODE_LAYERS = 8
INT8_CONFIGS = ("W8A8 dynamic", "W8A8 static", "8da4w")


def _configs() -> dict:
    import lowbit

    return {
        "bf16": None,
        "int8 weight-only": lowbit.Int8WeightOnlyConfig(),
        "int4 weight-only g128": lowbit.Int4WeightOnlyConfig(group_size=128),
        "float8 weight-only": lowbit.Float8WeightOnlyConfig(),
        "W8A8 dynamic": lowbit.Int8DynamicActivationInt8WeightConfig(),
        "W8A8 static": lowbit.Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=0),
        "8da4w": lowbit.Int8DynamicActivationInt4WeightConfig(),
        "float8 dynamic": lowbit.Float8DynamicActivationFloat8WeightConfig(),
        "fp8 x int4": lowbit.Float8DynamicActivationInt4WeightConfig(),
    }


def _model(layers: int, config) -> nn.Module:
    import lowbit

    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(K, N, bias=False) for _ in range(layers)]).to(torch.bfloat16).eval()
    if config is not None:
        lowbit.quantize_(m, config)
    return m


def _stacked(model: nn.Module, x: torch.Tensor):
    """Each layer applied to the same x (not chained: the output of one is not the next's input scale)."""
    layers = list(model)

    def run():
        with torch.inference_mode():
            for layer in layers:
                layer(x)

    return run


def dram_bandwidth(threads: int, rounds: int = 5) -> float:
    """GB/s of ``torch.sum`` over 1 GiB of float32 with ``threads`` threads (median of ``rounds``)."""
    import statistics
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.ones(2**28, dtype=torch.float32)
        t.sum()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            t.sum()
            times.append(time.perf_counter() - t0)
        return t.nbytes / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(old)


def compute_peaks(rounds: int = 3) -> dict:
    """GFLOP/s of ``F.linear`` in bf16 and float32 and GOP/s of ``torch._int_mm`` (int8) on 1024 x 1024 x 1024:
    what torch reaches on this host (on a CPU without AVX-512 BF16 / VNNI, bf16 and int8 are far below fp32)."""
    import statistics
    import time

    import torch.nn.functional as F

    n = 1024
    x, w = torch.randn(n, n), torch.randn(n, n)
    xb, wb = x.bfloat16(), w.bfloat16()
    ai, bi = torch.randint(-128, 127, (n, n), dtype=torch.int8), torch.randint(-128, 127, (n, n), dtype=torch.int8)
    out = {}
    for name, fn in (("bf16", lambda: F.linear(xb, wb)), ("fp32", lambda: F.linear(x, w)),
                     ("int8", lambda: torch._int_mm(ai, bi))):
        fn()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 2 * n**3 / statistics.median(times) / 1e9
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(RESULTS, "roofline"))
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    limits = {"dram_gbs_1_thread": dram_bandwidth(1), f"dram_gbs_{threads}_threads": dram_bandwidth(threads),
              **{f"{k}_peak_gops": v for k, v in compute_peaks().items()}}
    log(f"limits before: {limits}")
    configs = _configs()
    decode = {name: _model(DECODE_LAYERS, c) for name, c in configs.items()}
    prefill = {name: _model(1, c) for name, c in configs.items()}
    weight_bytes = {name: module_weight_bytes(m)["total"] for name, m in decode.items()}
    fns, shapes = {}, {}
    for name in configs:
        for m_rows in (1, 4):
            x = torch.randn(m_rows, K, generator=torch.Generator().manual_seed(1)).bfloat16()
            fns[f"{name} | M={m_rows}"] = _stacked(decode[name], x)
        x = torch.randn(256, K, generator=torch.Generator().manual_seed(2)).bfloat16()
        fns[f"{name} | M=256"] = _stacked(prefill[name], x)
    for fn in fns.values():  # warm-up: kernel builds, derived layouts
        fn()
    samples = interleaved(fns, {n: 1 for n in fns}, args.rounds, log=log, max_rounds=args.rounds + 4)
    after = {"dram_gbs_1_thread": dram_bandwidth(1), f"dram_gbs_{threads}_threads": dram_bandwidth(threads),
             **{f"{k}_peak_gops": v for k, v in compute_peaks().items()}}
    log(f"limits after: {after}")
    limits = {k: max(v, after[k]) for k, v in limits.items()}
    bw = limits[f"dram_gbs_{threads}_threads"]
    rows, table = [], []
    bf16_ms = {m: samples[f"bf16 | M={m}"].median() for m in (1, 4, 256)}
    for name in configs:
        for m_rows in (1, 4, 256):
            ms = samples[f"{name} | M={m_rows}"].median()
            if m_rows <= 4:
                moved = weight_bytes[name]
                frac, what = moved / (ms / 1e3) / 1e9 / bw, f"{moved / (ms / 1e3) / 1e9:.1f} GB/s of {bw:.1f}"
            else:
                peak_name = "int8" if name in INT8_CONFIGS else max(("bf16", "fp32"), key=lambda k: limits[f"{k}_peak_gops"])
                gops = 2 * m_rows * N * K / (ms / 1e3) / 1e9
                frac, what = gops / limits[f"{peak_name}_peak_gops"], f"{gops:.0f} of {peak_name} {limits[f'{peak_name}_peak_gops']:.0f} GOP/s"
            row = {"config": name, "M": m_rows, "ms": ms, "fraction_of_roofline": frac, "vs_bf16": bf16_ms[m_rows] / ms,
                   "weight_bytes": weight_bytes[name] if m_rows <= 4 else weight_bytes[name] // DECODE_LAYERS,
                   **samples[f"{name} | M={m_rows}"].summary()}
            rows.append(row)
            table.append([name, m_rows, f"{ms:.2f}", f"{frac:.2f}", what, f"{row['vs_bf16']:.2f}x"])
    md = tabulate(table, headers=["config", "M", "ms", "fraction", "of what", "vs bf16"], tablefmt="github")
    facts = {**machine_facts(), "threads": threads, "load_avg": os.getloadavg(),
             "kernels": __import__("lowbit.kernels._ext", fromlist=["status"]).status()}
    note = (f"{facts['cpu_model']}, {threads} threads, eager; M<=4: {DECODE_LAYERS} x Linear(4096, 4096) (bytes / time / "
            f"DRAM read bandwidth); M=256: one Linear(4096, 4096) (ops / time / peak). Limits: DRAM 1 thread "
            f"{limits['dram_gbs_1_thread']:.1f} GB/s, {threads} threads {bw:.1f} GB/s; F.linear bf16 "
            f"{limits['bf16_peak_gops']:.0f} GFLOP/s, fp32 {limits['fp32_peak_gops']:.0f}; int8 _int_mm {limits['int8_peak_gops']:.0f} GOP/s. Kernels: {facts['kernels']}")
    print(md)
    print(note)
    write_json(args.out + ".json", {"machine": facts, "limits": limits, "rows": rows, "args": vars(args)})
    with open(args.out + ".md", "w") as f:
        f.write(f"# Kernels as fractions of this host's limits (benchmarks/roofline.py)\n\n{note}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
