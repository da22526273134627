"""Benchmark on a CUDA GPU: lowbit's configs against bf16 on Llama-3-8B MLP shapes, eager and compiled.

A stack of 8 linears alternating 4096 -> 14336 and 14336 -> 4096 (random bf16 weights, 940 MB in
bf16, 235 MB in int4: every config's weights exceed the H200's 60 MB L2, so M = 1 streams them from
HBM). Each round times every variant (CUDA events around ``--inner`` calls after a warm-up);
variants are interleaved round by round and the median per call is reported, with the ratio to
bf16 in the same mode (eager against eager, ``torch.compile`` against compiled bf16) and, at
M = 1, the weight bytes read per second as a fraction of a read-only pass's bandwidth (``amax``
over 2 GiB) measured in the same process; the device-to-device copy is recorded too.

    python benchmarks/gpu_linear.py --out benchmarks/results/gpu_linear        # writes .json and .md
    python benchmarks/gpu_linear.py --rows 1 16 --compile-rows 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from lowbit import configs as LC  # noqa: E402
from lowbit.eval.metrics import sqnr  # noqa: E402
from lowbit.granularity import PerRow  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402

HIDDEN, FFN, LAYERS = 4096, 14336, 8
VARIANTS = {
    "bf16": None,
    "int8 weight-only": LC.Int8WeightOnlyConfig(),
    "W8A8 dynamic": LC.Int8DynamicActivationInt8WeightConfig(),
    "int4 g128": LC.Int4WeightOnlyConfig(group_size=128),
    "8da4w g128": LC.Int8DynamicActivationInt4WeightConfig(group_size=128),
    "fp8 weight-only": LC.Float8WeightOnlyConfig(),
    "fp8 dynamic (row)": LC.Float8DynamicActivationFloat8WeightConfig(PerRow()),
    "fp8 dynamic (tensor)": LC.Float8DynamicActivationFloat8WeightConfig(),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(LAYERS):
        k, n = (HIDDEN, FFN) if i % 2 == 0 else (FFN, HIDDEN)
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        nn.init.normal_(lin.weight, std=k**-0.5)
        layers.append(lin)
    return nn.Sequential(*layers)


def bandwidths(nbytes: int = 2 << 30, reps: int = 10) -> tuple[float, float]:
    """``(copy, read)`` bytes per second, medians of ``reps``: a device-to-device copy (bytes read +
    written) and a read-only pass (``amax`` of a bf16 tensor: bytes read)."""
    a = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)

    def median_s(fn):
        times = []
        for _ in range(reps + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times[2:])

    copy = 2 * nbytes / median_s(lambda: b.copy_(a))
    read = nbytes / median_s(lambda: torch.amax(a))
    del a, b
    return copy, read


def profile(fn, inner: int, path: str, title: str) -> None:
    """Append the CUDA kernels' time per call of ``fn`` (torch.profiler, ``inner`` calls) to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
    with open(path, "a") as f:
        f.write(f"\n=== {title} ({inner} calls) ===\n{table}\n")


def time_call(fn, inner: int) -> float:
    """Seconds per call: CUDA events around ``inner`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 2048], help="M values timed eager")
    p.add_argument("--compile-rows", type=int, nargs="*", default=[1, 256], help="M values also timed compiled")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--compile-variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants also timed compiled (each compile costs seconds to a minute)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting rounds after this long")
    p.add_argument("--profile-rows", type=int, nargs="*", default=[],
                   help="after timing, profile every variant at these M (eager, and compiled where timed) into OUT_profile.txt")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_linear"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_linear.py needs a CUDA device (torch.cuda.is_available() is False)")
    t0 = time.monotonic()
    facts = C.machine_facts()
    facts.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                 cuda=torch.version.cuda)
    bw_copy, bw = bandwidths()
    log(f"{facts['gpu']}: device copy {bw_copy / 1e9:.0f} GB/s (read + write), read {bw / 1e9:.0f} GB/s")

    models, weight_bytes, errors, accuracy = {}, {}, {}, {}
    probe = torch.randn(16, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=None)
    with torch.no_grad():
        for name in args.variants:
            try:
                m = make_stack()
                if VARIANTS[name] is not None:
                    quantize_(m, VARIANTS[name])
                models[name] = m
                weight_bytes[name] = C.module_weight_bytes(m)["total"]
                if name != "bf16":
                    accuracy[name] = sqnr(models["bf16"](probe).float(), m(probe).float())
            except Exception as e:  # noqa: BLE001 - a config that fails on this device is reported, not fatal
                errors[name] = f"quantize: {type(e).__name__}: {e}"
                log(f"{name}: {errors[name]}")
        log(f"quantized in {time.monotonic() - t0:.0f} s")

        modes = [("eager", m) for m in args.rows] + [("compiled", m) for m in args.compile_rows]
        fns, samples = {}, {}
        for mode, rows in modes:
            x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
            for name, model in models.items():
                if mode == "compiled" and name not in args.compile_variants:
                    continue
                key = (mode, rows, name)
                try:
                    f = model if mode == "eager" else torch.compile(model, fullgraph=True)
                    fn = (lambda f=f, x=x: f(x))
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    fns[key], samples[key] = fn, []
                except Exception as e:  # noqa: BLE001
                    errors[f"{mode} M={rows} {name}"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"{mode} M={rows} {name}: {errors[f'{mode} M={rows} {name}']}")
            log(f"{mode} M={rows} warmed ({time.monotonic() - t0:.0f} s)")
        for r in range(args.rounds):
            if r and time.monotonic() - t0 > args.budget_s:
                log(f"budget spent after {r} rounds")
                break
            for key, fn in fns.items():
                samples[key].append(time_call(fn, args.inner))
            log(f"round {r + 1} done ({time.monotonic() - t0:.0f} s)")

        if args.profile_rows:
            path = args.out + "_profile.txt"
            open(path, "w").close()
            for (mode, m, name), fn in fns.items():
                if m in args.profile_rows:
                    profile(fn, args.inner, path, f"{mode} M={m} {name}")
            log(f"profiles in {path} ({time.monotonic() - t0:.0f} s)")

    rows_out = []
    for (mode, m, name), s in samples.items():
        med = statistics.median(s)
        base = samples.get((mode, m, "bf16"))
        ratio = statistics.median(base) / med if base else None
        frac = weight_bytes[name] / med / bw if m == 1 else None  # weight bytes / s over the read pass's
        rows_out.append({"mode": mode, "M": m, "variant": name, "ms": med * 1e3, "samples": len(s),
                         "vs_bf16": ratio, "weight_MB": weight_bytes[name] / 1e6, "frac_of_read_bw": frac,
                         "sqnr_vs_bf16_db": accuracy.get(name)})
    payload = {"settings": {"model": f"{LAYERS} linears {HIDDEN}<->{FFN}, bias-free, bf16, random N(0, 1/K)",
                            "rows": args.rows, "compile_rows": args.compile_rows, "rounds": args.rounds,
                            "inner": args.inner, "copy_bw_GBps_read_plus_write": bw_copy / 1e9,
                            "read_bw_GBps": bw / 1e9},
               "machine": facts, "results": rows_out, "errors": errors}
    C.write_json(args.out + ".json", payload)
    table = [[r["mode"], r["M"], r["variant"], f"{r['ms']:.3f}", "-" if r["vs_bf16"] is None else f"{r['vs_bf16']:.2f}x",
              f"{r['weight_MB']:.0f}", "-" if r["frac_of_read_bw"] is None else f"{r['frac_of_read_bw']:.2f}",
              "-" if r["sqnr_vs_bf16_db"] is None else f"{r['sqnr_vs_bf16_db']:.1f}"] for r in rows_out]
    md = tabulate(table, headers=["mode", "M", "variant", "ms / call", "vs bf16", "weight MB", "of read BW", "SQNR dB"],
                  tablefmt="github")
    with open(args.out + ".md", "w") as f:
        f.write(f"{facts['gpu']}, torch {facts['torch_version']}, CUDA {facts['cuda']}; device copy "
                f"{bw_copy / 1e9:.0f} GB/s read + write, read pass {bw / 1e9:.0f} GB/s (the M = 1 fraction's "
                f"denominator); {payload['settings']['model']}; SQNR of the 8-layer output against bf16 at M = 16\n\n{md}\n")
        if errors:
            f.write("\nErrors:\n" + "".join(f"- {k}: {v}\n" for k, v in errors.items()))
    print(md)
    if errors:
        print("errors:", *(f"  {k}: {v}" for k, v in errors.items()), sep="\n")


if __name__ == "__main__":
    main()
