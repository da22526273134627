"""Decode (M = 1) GEMV bandwidth of lowbit's C++ kernels against a DRAM read probe, same process.

8 stacked Linear(4096, 4096) weights (int4 g128: 66 MiB, int8 per row: 128 MiB, float8 e4m3fn per
row: 128 MiB, bf16 for ``F.linear``: 256 MiB; each well over the 32 MiB L3), x of one bf16 token.
The probe is ``torch.sum`` over a 1 GiB float32 tensor. Every variant runs once per round, rounds
interleaved, and the median round time is reported with the bytes it reads per second and that as a
fraction of the probe's, and the median process CPU time beside the wall time (CPU time well
below threads x wall time means the process waited: another process held a core). Which build ran (``avx512`` or ``avx2``, ``LOWBIT_ISA`` forces one) is
written beside; so is the load average (other processes share the CPU).

Run: ``python benchmarks/avx2_gemv.py [--threads 2,1] [--rounds 15]``; writes
``benchmarks/results/avx2_gemv.json``. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.granularity import PerGroup, PerRow
from lowbit.kernels import _ext
from lowbit.primitives import choose_qparams_affine, pack_int4, quantize_affine
from lowbit.primitives.float8 import choose_qparams_float8, quantize_float8
from lowbit.spec import QuantSpec

N = K = 4096
LAYERS = 8
OUT = Path(__file__).parent / "results" / "avx2_gemv.json"


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _layers(gen):
    """Per layer: bf16 weight, int4 (qdata, scale, zp), int8 (qdata, scale), float8 (qdata, scale)."""
    int4_spec = QuantSpec("uint4", PerGroup(128), symmetric=False, zero_point_dtype=torch.int8)
    int8_spec = QuantSpec("int8", PerRow(), symmetric=True)
    fp8_spec = QuantSpec("float8_e4m3fn", PerRow())
    out = []
    for _ in range(LAYERS):
        w = torch.randn(N, K, generator=gen) * 0.02
        s4, z4 = choose_qparams_affine(w, int4_spec)
        q4 = pack_int4(quantize_affine(w, s4, z4, int4_spec))
        s8, _ = choose_qparams_affine(w, int8_spec)
        q8 = quantize_affine(w, s8, None, int8_spec)
        sf = choose_qparams_float8(w, fp8_spec)
        qf = quantize_float8(w, sf, fp8_spec)
        out.append({"bf16": w.bfloat16(), "int4": (q4, s4.contiguous(), z4.contiguous()),
                    "int8": (q8, s8.reshape(N, 1).contiguous()), "fp8": (qf, sf.reshape(N, 1).contiguous())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="2,1", help="comma-separated torch thread counts, each measured in turn")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    load_start = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    layers = _layers(gen)
    x = torch.randn(1, K, generator=gen).bfloat16()
    probe = torch.ones(256 * 1024 * 1024)  # 1 GiB float32
    e4, e8, ef = _ext.load("int4_cpu"), _ext.load("int8_gemv"), _ext.load("fp8_cpu")
    st = _ext.status()

    variants = {"dram_probe_sum_1GiB": (lambda: probe.sum(), _nbytes(probe)),
                "bf16_F.linear": (lambda: [F.linear(x, L["bf16"]) for L in layers], sum(_nbytes(L["bf16"]) for L in layers))}
    if e4 is not None:
        variants["int4_g128_gemv_bf16"] = (lambda: [e4.gemv_bf16(x, *L["int4"], None) for L in layers],
                                           sum(_nbytes(*L["int4"]) for L in layers))
    if e8 is not None:
        variants["int8_row_gemv"] = (lambda: [e8.int8_weight_only_mm(x, *L["int8"]) for L in layers],
                                     sum(_nbytes(*L["int8"]) for L in layers))
    if ef is not None:
        variants["fp8_e4m3fn_row_gemv"] = (lambda: [ef.fp8_linear(x, *L["fp8"], None, 4, 32, 256) for L in layers],
                                           sum(_nbytes(*L["fp8"]) for L in layers))
    rows = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for fn, _ in variants.values():  # warm up (first touch, builds, thread pools)
            fn()
        times = {name: [] for name in variants}
        cpu = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (fn, _) in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        probe_gbs = variants["dram_probe_sum_1GiB"][1] / statistics.median(times["dram_probe_sum_1GiB"]) / 1e9
        for name, (_, nbytes) in variants.items():
            med = statistics.median(times[name])
            gbs = nbytes / med / 1e9
            rows[f"{threads}t/{name}"] = {"threads": threads, "median_ms": round(med * 1e3, 3),
                                          "cpu_median_ms": round(statistics.median(cpu[name]) * 1e3, 3),
                                          "min_ms": round(min(times[name]) * 1e3, 3), "bytes": nbytes,
                                          "GB_per_s": round(gbs, 2), "fraction_of_probe": round(gbs / probe_gbs, 3)}
    result = {
        "what": "M=1 bf16 x, 8 x Linear(4096, 4096), weights read once per call; medians of interleaved rounds",
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()),
        "has_avx512f": " avx512f" in _ext._cpu_flags(),
        "kernels": {k: st[k] for k in ("int4_cpu", "int8_gemv", "fp8_cpu")},
        "LOWBIT_ISA": os.environ.get("LOWBIT_ISA", "auto"),
        "threads": args.threads,
        "note": "2 cores shared with other processes: a parallel region waits for a busy core's scheduler "
                "tick (4 ms), so 2-thread times are only meaningful when the other core is idle (see loadavg)",
        "rounds": args.rounds,
        "torch": torch.__version__,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "results": rows,
    }
    print(f"{'variant':28s} {'median ms':>10s} {'cpu ms':>8s} {'GB/s':>7s} {'of probe':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['median_ms']:10.2f} {r['cpu_median_ms']:8.2f} {r['GB_per_s']:7.2f} {r['fraction_of_probe']:8.2f}")
    print("kernels:", result["kernels"], "| load", load_start, "->", result["loadavg_end"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
