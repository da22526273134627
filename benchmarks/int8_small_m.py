"""Int8 weight-only decode at M = 1..16 on CPU: lowbit's C++ GEMV against ``torch._weight_int8pack_mm``,
optimum-quanto's qint8 weights and bf16 ``F.linear``, on two weight sets, each well over the L3:

* ``4096x4096x8``: 8 x Linear(4096, 4096) (int8 per row: 128 MiB);
* ``smollm2``: SmolLM2-135M's decode linears, 30 x (q 576x576, k 192x576, v 192x576, o 576x576,
  gate 1536x576, up 1536x576, down 576x1536) + lm_head 49152x576 (211 calls, 128 MiB int8): small
  layers, where a call's fixed costs (thread fork/join, x conversion, allocations) count.

Random weights (int8 per row, float32 scale) with those shapes, x a bf16 (M, K). Variants:
``lowbit_kernel`` (``int8_weight_only_mm`` called directly), ``lowbit_routed``
(``int8_weight_only_linear_any``: the route lowbit's layers take, ``lowbit.kernels.int8``'s
thresholds), ``int8pack`` (``torch._weight_int8pack_mm``, bf16 scales), ``chunked`` (with
``--chunked``: lowbit's dequantize-in-chunks + float32 mm path, 10x slower than the others here), ``quanto`` (optimum-quanto qint8 weight ``QLinear`` modules,
frozen: ``_weight_int8pack_mm`` underneath, plus its module layers), ``bf16`` (``F.linear``). Every
variant runs the whole set once per round, rounds interleaved; the median round is reported (and
the median process CPU time: well below threads x wall means another process held a core).

Run: ``python benchmarks/int8_small_m.py [--m 1,2,4,8,16] [--sets 4096x4096x8,smollm2] [--rounds 7]``;
writes ``benchmarks/results/int8_small_m.json`` (``--out``). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.granularity import PerRow
from lowbit.kernels import _ext
from lowbit.kernels import int8 as K
from lowbit.primitives import choose_qparams_affine, quantize_affine
from lowbit.spec import QuantSpec

OUT = Path(__file__).parent / "results" / "int8_small_m.json"
SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SETS = {"4096x4096x8": [(4096, 4096)] * 8, "smollm2": SMOLLM2_BLOCK * 30 + [(49152, 576)]}
SPEC = QuantSpec("int8", PerRow(), symmetric=True)


def _quanto_modules(weights):
    """Frozen optimum-quanto qint8-weight QLinear modules with the given bf16 weights, or None."""
    try:
        import optimum.quanto as oq
    except ImportError:
        return None
    mods = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        seq = nn.Sequential(lin)
        oq.quantize(seq, weights=oq.qint8)
        oq.freeze(seq)
        mods.append(seq)
    return mods


def _layers(shapes, gen):
    out = []
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
        s, _ = choose_qparams_affine(w.float(), SPEC)
        q = quantize_affine(w.float(), s, None, SPEC)
        s = s.reshape(n, 1).contiguous()
        out.append({"bf16": w, "q": q, "s": s, "s_bf16": s.reshape(-1).bfloat16().contiguous()})
    return out


def _variants(layers, quanto, x, chunked):
    """name -> fn running the whole set once with x[k] (a (M, K) bf16 input per distinct K)."""
    ext = _ext.load("int8_gemv")
    v = {"bf16": lambda: [F.linear(x[L["q"].shape[1]], L["bf16"]) for L in layers]}
    if ext is not None:
        v["lowbit_kernel"] = lambda: [ext.int8_weight_only_mm(x[L["q"].shape[1]], L["q"], L["s"]) for L in layers]
    v["lowbit_routed"] = lambda: [K.int8_weight_only_linear_any(x[L["q"].shape[1]], L["q"], L["s"], None, None, SPEC, "auto")
                                  for L in layers]
    v["int8pack"] = lambda: [torch._weight_int8pack_mm(x[L["q"].shape[1]], L["q"], L["s_bf16"]) for L in layers]
    if chunked:
        v["chunked"] = lambda: [K._weight_only_chunked(x[L["q"].shape[1]], L["q"], L["s"], None) for L in layers]
    if quanto is not None:
        v["quanto"] = lambda: [mod(x[L["q"].shape[1]]) for mod, L in zip(quanto, layers)]
    return v


def _per_shape(args, gen) -> dict:
    """Our kernel alone, per distinct shape of the sets, at 1 and 2 threads (interleaved rounds): the
    data for the kernel's serial threshold (``LOWBIT_INT8_SERIAL_BYTES`` in csrc/int8_gemv_avx2.cpp).
    Each shape has as many distinct weights as fill 64 MiB, so they come from DRAM as in decode."""
    ext = _ext.load("int8_gemv")
    rows, threads = {}, torch.get_num_threads()
    shapes = sorted({s for name in args.sets.split(",") for s in SETS[name]}, key=lambda s: s[0] * s[1])
    for n, k in shapes:
        copies = max(1, (64 << 20) // (n * k))
        ws = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), torch.rand(n, 1, generator=gen))
              for _ in range(copies)]
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, generator=gen).bfloat16()
            times = {1: [], 2: []}
            for _ in range(args.rounds):
                for t in times:
                    torch.set_num_threads(t)
                    for q, s in ws[:2]:  # wake the thread team
                        ext.int8_weight_only_mm(x, q, s)
                    t0 = time.perf_counter()
                    for q, s in ws:
                        ext.int8_weight_only_mm(x, q, s)
                    times[t].append((time.perf_counter() - t0) / len(ws))
            for t, v in times.items():
                med = statistics.median(v)
                rows[f"{n}x{k}/M{m}/{t}t"] = {"N": n, "K": k, "M": m, "threads": t, "weight_bytes": n * k,
                                              "us_per_call": round(med * 1e6, 2), "GB_per_s": round(n * k / med / 1e9, 2)}
    torch.set_num_threads(threads)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16", help="comma-separated M (rows of x)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated weight sets: {', '.join(SETS)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-peers", action="store_true", help="skip optimum-quanto")
    ap.add_argument("--chunked", action="store_true", help="also time the chunked dequantize + mm path")
    ap.add_argument("--per-shape", action="store_true", help="instead: our kernel per distinct shape at 1 and 2 threads")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    rows = _per_shape(args, gen) if args.per_shape else {}
    for set_name in [] if args.per_shape else args.sets.split(","):
        shapes = SETS[set_name]
        layers = _layers(shapes, gen)
        quanto = None if args.no_peers else _quanto_modules([L["bf16"] for L in layers])
        wbytes = sum(L["q"].numel() + 4 * L["s"].numel() for L in layers)
        for m in [int(v) for v in args.m.split(",")]:
            x = {k: torch.randn(m, k, generator=gen).bfloat16() for k in {k for _, k in shapes}}
            variants = _variants(layers, quanto, x, args.chunked)
            with torch.no_grad():
                for fn in variants.values():  # warm up: builds, first touch, thread pools
                    fn()
                times = {name: [] for name in variants}
                cpu = {name: [] for name in variants}
                for _ in range(args.rounds):
                    for name, fn in variants.items():
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
            bf16_ms = statistics.median(times["bf16"]) * 1e3
            for name in variants:
                med = statistics.median(times[name]) * 1e3
                rows[f"{set_name}/M{m}/{name}"] = {
                    "set": set_name, "M": m, "variant": name, "calls": len(layers), "median_ms": round(med, 3),
                    "us_per_call": round(med * 1e3 / len(layers), 2), "cpu_median_ms": round(statistics.median(cpu[name]) * 1e3, 3),
                    "min_ms": round(min(times[name]) * 1e3, 3), "x_bf16": round(bf16_ms / med, 2),
                    "int8_GB_per_s": round(wbytes / med / 1e6, 2)}
        del layers, quanto
    result = {
        "what": "int8 weight-only (per-row scale) linears, bf16 x (M, K); each variant runs the whole set per round, "
                "rounds interleaved, median round; int8_GB_per_s = int8 weight + scale bytes / median time",
        "kernels": {"int8_gemv": _ext.status()["int8_gemv"]},
        "routing": {"ext_max_m": K._ext_max_m() if hasattr(K, "_ext_max_m") else K._EXT_MAX_M,
                    "_INT8PACK_MAX_M": K._INT8PACK_MAX_M},
        "LOWBIT_ISA": os.environ.get("LOWBIT_ISA", "auto"),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "torch": torch.__version__,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "results": rows,
    }
    print(f"{'set/M/variant':34s} {'median ms':>10s} {'cpu ms':>8s} {'us/call':>8s} {'x bf16':>7s} {'GB/s':>7s}")
    for name, r in rows.items():
        if args.per_shape:
            print(f"{name:34s} {'':>10s} {'':>8s} {r['us_per_call']:8.1f} {'':>7s} {r['GB_per_s']:7.2f}")
            continue
        print(f"{name:34s} {r['median_ms']:10.2f} {r['cpu_median_ms']:8.2f} {r['us_per_call']:8.1f} {r['x_bf16']:7.2f} "
              f"{r['int8_GB_per_s']:7.2f}")
    print("kernels:", result["kernels"], "| load", load_start, "->", result["loadavg_end"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
