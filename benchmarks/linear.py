"""Benchmark: 8 stacked bf16 Linear(4096, 4096) layers, lowbit configs against bf16 and peers.

One family per run (``--family int8 | int4 | float8``), each with its peers; results go to
``results/linear.json`` (int8) or ``results/linear_<family>.json``.

Every variant runs in one process, eager and torch.compile'd (inductor freezing), timed in
interleaved rounds; compiled variants are compared with compiled bf16, eager with eager bf16.
Weight bytes of compiled variants are the constants the compiled graphs hold (see _common.py).

    python benchmarks/linear.py                       # int8 family, writes benchmarks/results/linear.json
    python benchmarks/linear.py --family int4         # writes benchmarks/results/linear_int4.json
    python benchmarks/linear.py --family float8 --m 1 --rounds 3 --no-peers
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from lowbit.configs import (  # noqa: E402
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.eval.metrics import sqnr  # noqa: E402
from lowbit.granularity import PerRow  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402

D, LAYERS, DTYPE = 4096, 8, torch.bfloat16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(seed: int = 0) -> nn.Sequential:
    """8 bias-free linears; weights ~ N(0, 1/D) so activations keep unit scale through the stack."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(D, D, bias=False) for _ in range(LAYERS)]
    for l in layers:
        with torch.no_grad():
            l.weight.copy_(torch.randn(D, D, generator=g) * D**-0.5)
    return nn.Sequential(*layers).to(DTYPE).eval()


def static_act_scale(model: nn.Module, sample: torch.Tensor) -> float:
    """One per-tensor scale for every layer: the largest |input| any layer sees, over 127."""
    amax = [0.0]

    def hook(mod, args):
        amax[0] = max(amax[0], args[0].detach().abs().max().float().item())

    hs = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    model(sample)
    for h in hs:
        h.remove()
    return amax[0] / 127


# --- variants -----------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    library: str
    scheme: str  # bf16, int8 weight-only, W8A8 dynamic, W8A8 static
    mode: str  # eager | compiled
    build: Callable[[nn.Module], nn.Module]  # takes a fresh copy of the bf16 model


def _lowbit(config):
    def build(m):
        return quantize_(m, config)

    return build


def _torchao(config_name, module="torchao.quantization", **kwargs):
    import importlib

    import torchao.quantization as aq

    cfg_cls = getattr(importlib.import_module(module), config_name)
    if "set_inductor_config" in cfg_cls.__dataclass_fields__:
        kwargs["set_inductor_config"] = False  # it changes global inductor settings for every variant

    def build(m):
        aq.quantize_(m, cfg_cls(**kwargs))
        return m

    return build


def _bnb(m):
    import bitsandbytes as bnb

    layers = []
    for lin in m:
        q = bnb.nn.Linear8bitLt(D, D, bias=False, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        layers.append(q.to("cpu"))  # the move to a device quantizes (Int8Params._quantize)
    return nn.Sequential(*layers).eval()


def _bnb_nf4(m):
    import bitsandbytes as bnb

    layers = []
    for lin in m:
        q = bnb.nn.Linear4bit(D, D, bias=False, compute_dtype=DTYPE, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        layers.append(q.to("cpu"))  # the move to a device quantizes
    return nn.Sequential(*layers).eval()


def _quanto(activations: bool, calib: torch.Tensor, weights: str = "qint8"):
    def build(m):
        import optimum.quanto as oq
        from optimum.quanto import Calibration, freeze, qint8, quantize

        quantize(m, weights=getattr(oq, weights), activations=qint8 if activations else None)
        if activations:
            with Calibration():
                m(calib)
        freeze(m)
        return m

    return build


def _lowbit_variants(family: str, act_scale: float, modes: list[str]) -> list[Variant]:
    out: list[Variant] = []
    for mode in modes:
        out.append(Variant(f"bf16 {mode}", "torch", "bf16", mode, lambda m: m))
        if family == "int8":
            out += [
                Variant(f"lowbit int8wo {mode}", "lowbit", "int8 weight-only", mode, _lowbit(Int8WeightOnlyConfig())),
                Variant(f"lowbit w8a8-dyn {mode}", "lowbit", "W8A8 dynamic", mode,
                        _lowbit(Int8DynamicActivationInt8WeightConfig())),
                Variant(f"lowbit w8a8-static {mode}", "lowbit", "W8A8 static", mode,
                        _lowbit(Int8StaticActivationInt8WeightConfig(act_scale=act_scale))),
            ]
        elif family == "int4":
            out += [
                Variant(f"lowbit int4wo-g128 {mode}", "lowbit", "int4 weight-only g128 asym", mode,
                        _lowbit(Int4WeightOnlyConfig())),
                Variant(f"lowbit int4wo-g32 {mode}", "lowbit", "int4 weight-only g32 asym", mode,
                        _lowbit(Int4WeightOnlyConfig(group_size=32))),
                Variant(f"lowbit 8da4w {mode}", "lowbit", "int8 dyn act x int4 g32 sym", mode,
                        _lowbit(Int8DynamicActivationInt4WeightConfig())),
                Variant(f"lowbit fp8a-int4w {mode}", "lowbit", "float8 dyn act x int4 g128 (fp8 rule)", mode,
                        _lowbit(Float8DynamicActivationInt4WeightConfig())),
            ]
        else:
            out += [
                Variant(f"lowbit fp8wo {mode}", "lowbit", "float8 e4m3 weight-only per row", mode,
                        _lowbit(Float8WeightOnlyConfig())),
                Variant(f"lowbit fp8-dyn-row {mode}", "lowbit", "float8 dyn act per token x weight per row", mode,
                        _lowbit(Float8DynamicActivationFloat8WeightConfig(PerRow()))),
            ]
    return out


def _peer_variants(family: str, calib: torch.Tensor, modes: list[str]) -> list[tuple[str, Callable[[], list[Variant]]]]:
    def each_mode(name, scheme, build):
        return [Variant(f"{name} {mode}", name.split()[0], scheme, mode, build) for mode in modes]

    if family == "int8":
        def ao():
            return each_mode("torchao int8wo", "int8 weight-only", _torchao("Int8WeightOnlyConfig")) + each_mode(
                "torchao w8a8-dyn", "W8A8 dynamic", _torchao("Int8DynamicActivationInt8WeightConfig"))

        def bnb():
            import bitsandbytes  # noqa: F401

            return [Variant("bnb int8 eager", "bitsandbytes", "W8A8 (LLM.int8, threshold 0)", "eager", _bnb)]

        def quanto():
            import optimum.quanto  # noqa: F401

            return [
                Variant("quanto w8 eager", "optimum-quanto", "int8 weight-only", "eager", _quanto(False, calib)),
                Variant("quanto w8a8 eager", "optimum-quanto", "W8A8 static (calibrated)", "eager", _quanto(True, calib)),
            ]
    elif family == "int4":
        proto = "torchao.prototype.quantization.int4.inference_workflow"

        def ao():
            return each_mode("torchao int4wo-g128", "int4 weight-only g128 (CPU prototype)",
                             _torchao("PrototypeInt4WeightOnlyConfig", proto, group_size=128)) + each_mode(
                "torchao 8da4w", "int8 dyn act x int4 g32 (CPU prototype)",
                _torchao("Int8DynamicActivationInt4WeightConfig", proto, group_size=32))

        def bnb():
            import bitsandbytes  # noqa: F401

            return [Variant("bnb nf4 eager", "bitsandbytes", "nf4 weight-only (blocks of 64)", "eager", _bnb_nf4)]

        def quanto():
            import optimum.quanto  # noqa: F401

            return [Variant("quanto w4 eager", "optimum-quanto", "int4 weight-only g128", "eager",
                            _quanto(False, calib, "qint4"))]
    else:
        def ao():
            return each_mode("torchao fp8wo", "float8 e4m3 weight-only per row", _torchao("Float8WeightOnlyConfig"))

        def bnb():
            raise ImportError("bitsandbytes has no float8 weight-only linear")

        def quanto():
            import optimum.quanto  # noqa: F401

            return [Variant("quanto f8 eager", "optimum-quanto", "float8 e4m3 weight-only", "eager",
                            _quanto(False, calib, "qfloat8"))]
    return [("torchao", ao), ("bitsandbytes", bnb), ("optimum-quanto", quanto)]


def variants(family: str, act_scale: float, calib: torch.Tensor, peers: bool, compile_: bool
             ) -> tuple[list[Variant], list[dict]]:
    modes = ["eager", "compiled"] if compile_ else ["eager"]
    out = _lowbit_variants(family, act_scale, modes)
    skipped: list[dict] = []
    if not peers:
        return out, skipped
    for lib, make in _peer_variants(family, calib, modes):
        try:
            out += make()
        except Exception as e:  # noqa: BLE001 - an absent or broken peer is skipped, with the reason
            skipped.append({"library": lib, "reason": f"{type(e).__name__}: {e}"})
            log(f"skipping {lib}: {type(e).__name__}: {e}")
    return out, skipped


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["int8", "int4", "float8"], default="int8", help="which configs (default int8)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 256], help="tokens per call (default: 1 16 256)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    p.add_argument("--max-rounds", type=int, default=None, help="extra rounds allowed to replace contaminated samples (default: 2x rounds)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; extra rounds stop when it is spent")
    p.add_argument("--sample-ms", type=float, default=150.0, help="target length of one timing sample")
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    p.add_argument("--no-peers", action="store_true", help="skip torchao, bitsandbytes, optimum-quanto")
    p.add_argument("--out", default=None, help="JSON path (default: results/linear.json for int8, else linear_<family>.json)")
    args = p.parse_args()
    if args.out is None:
        name = "linear.json" if args.family == "int8" else f"linear_{args.family}.json"
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)

    t_start = time.time()
    torch.manual_seed(0)
    machine = C.machine_facts()
    log(f"{machine['cpu_model']}, torch {machine['torch_version']}, {machine['torch_threads']} threads")

    with torch.no_grad():
        base = make_model()
        inputs = {m: torch.randn(m, D, generator=torch.Generator().manual_seed(m)).to(DTYPE) for m in args.m}
        calib = torch.randn(256, D, generator=torch.Generator().manual_seed(1)).to(DTYPE)
        act_scale = static_act_scale(base, calib)
        refs = {m: base(x).float() for m, x in inputs.items()}
        vs, skipped = variants(args.family, act_scale, calib, not args.no_peers, not args.no_compile)

        # build (and compile, warm up every shape) before any timing
        built: dict[str, dict] = {}
        for v in vs:
            t0 = time.time()
            try:
                model = v.build(copy.deepcopy(base))
                eager_bytes = C.module_weight_bytes(model)
                info = {"variant": v, "eager_bytes": eager_bytes, "compiled_bytes": None}
                if v.mode == "compiled":
                    fn, out_list, compiled_info = C.compile_and_capture(model, list(inputs.values()))
                    outs = dict(zip(inputs, out_list))
                    info.update(compiled_info)
                else:
                    fn = model
                    outs = {m: fn(x) for m, x in inputs.items()}
                info["fn"] = fn
                info["sqnr_db"] = {m: round(sqnr(refs[m], o.float()), 2) for m, o in outs.items()}
                info["inner"] = {m: C.calibrate_inner(lambda: fn(x), args.sample_ms) for m, x in inputs.items()}
                built[v.name] = info
                log(f"built {v.name} in {time.time() - t0:.1f}s  sqnr {info['sqnr_db']}")
            except Exception as e:  # noqa: BLE001 - a variant that fails to build is reported, not fatal
                skipped.append({"variant": v.name, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
                log(f"FAILED {v.name}: {type(e).__name__}: {str(e)[:300]}")

        timings = {}
        for i, (m, x) in enumerate(inputs.items()):
            log(f"timing M={m}: {len(built)} variants x {args.rounds} rounds")
            fns = {n: (lambda f=b["fn"], x=x: f(x)) for n, b in built.items()}
            left = t_start + args.budget_s - time.time()
            deadline = time.time() + max(0.0, left) / (len(inputs) - i)
            timings[m] = C.interleaved(fns, {n: b["inner"][m] for n, b in built.items()}, args.rounds, log,
                                       max_rounds=args.max_rounds or 2 * args.rounds, deadline=deadline)

    rows, results = [], []
    bf16_bytes = built["bf16 eager"]["eager_bytes"]["total"] if "bf16 eager" in built else None
    for m in args.m:
        for n, b in built.items():
            v: Variant = b["variant"]
            base_name = f"bf16 {v.mode}"
            s = timings[m][n].summary()
            base_ms = timings[m][base_name].median() if base_name in built else None
            wb = b["compiled_bytes"] if v.mode == "compiled" else b["eager_bytes"]
            speedup = None if base_ms is None else base_ms / s["median_ms"]
            wratio = None if not bf16_bytes else wb["total"] / bf16_bytes
            results.append({
                "variant": n, "library": v.library, "scheme": v.scheme, "mode": v.mode, "m": m,
                **s, "baseline": base_name, "speedup_vs_baseline": speedup,
                "weight_bytes": wb["total"], "weight_bytes_by_dtype": wb["by_dtype"], "weight_bytes_vs_bf16": wratio,
                "weight_bytes_method": "get_attr constants of the largest frozen inductor graph (after prepack and constant folding), unique storages; "
                "all_graphs_weight_bytes: union over the per-shape graphs"
                if v.mode == "compiled" else "module parameters and buffers, subclasses flattened, unique storages",
                "module_weight_bytes": b["eager_bytes"]["total"],
                "all_graphs_weight_bytes": wb.get("all_graphs_total"),
                "sqnr_db": b["sqnr_db"][m],
                **({"graph_breaks": b["graph_breaks"], "dynamo_graphs": b["dynamo_graphs"],
                    "graph_break_reasons": b["graph_break_reasons"], "inductor_graphs": wb["graphs"]}
                   if v.mode == "compiled" else {}),
            })
            rows.append([
                m, n, f"{s['median_ms']:.2f}", f"{s['iqr_ms']:.2f}", f"{s['clean_samples']}/{len(s['samples_ms'])}",
                "-" if speedup is None else f"{speedup:.2f}x", C.fmt_mb(wb["total"]),
                "-" if wratio is None else f"{wratio:.2f}", _dtypes(wb["by_dtype"]),
                C.fmt_mb(wb.get("all_graphs_total", wb["total"])), b["sqnr_db"][m],
            ])
    headers = ["M", "variant", "median ms", "IQR ms", "clean", "speedup", "weight MB", "w/bf16", "weight dtypes (MB)",
               "all graphs MB", "SQNR dB"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    targets = evaluate_targets(args.family, results)
    ttable = tabulate([[t["target"], t["measured"], "met" if t["met"] else "MISSED"] for t in targets],
                      headers=["target", "measured", ""], tablefmt="github")
    print(f"\n{machine['cpu_model']} | torch {machine['torch_version']} | {machine['torch_threads']} threads | "
          f"{machine['timestamp_utc']}\n8 x Linear(4096, 4096) bf16; speedup = matching bf16 median / variant median "
          f"(eager vs eager, compiled vs compiled-frozen)\n")
    print(table)
    print()
    print(ttable)
    if skipped:
        print("\nskipped:", *[f"  {s}" for s in skipped], sep="\n")
    machine["loadavg_end"] = os.getloadavg()
    C.write_json(args.out, {
        "benchmark": "linear", "family": args.family, "machine": machine,
        "settings": {"layers": LAYERS, "d": D, "dtype": "bfloat16", "m": args.m, "rounds": args.rounds,
                     "sample_ms": args.sample_ms, "static_act_scale": act_scale,
                     "contaminated_share": C.CONTAMINATED_SHARE, "peers": not args.no_peers,
                     "compile": not args.no_compile, "wall_s": round(time.time() - t_start, 1)},
        "results": results, "targets": targets, "skipped": skipped,
    })
    log(f"wrote {args.out} ({time.time() - t_start:.0f}s)")


def _dtypes(by_dtype: dict) -> str:
    return " ".join(f"{k}:{v / 1e6:.0f}" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1]) if v >= 1e6)


TARGETS = {  # (variant, M, minimum speedup vs the matching bf16) per family, from the issues
    "int8": [
        ("lowbit int8wo eager", 1, 2.0), ("lowbit int8wo compiled", 1, 1.8),
        ("lowbit w8a8-dyn eager", 256, 1.6), ("lowbit w8a8-dyn compiled", 256, 1.5),
        ("lowbit int8wo eager", 256, 0.95), ("lowbit int8wo compiled", 256, 0.95),
    ],
    "int4": [
        ("lowbit int4wo-g128 eager", 1, 5.3), ("lowbit int4wo-g128 compiled", 1, 4.0),
        ("lowbit int4wo-g128 eager", 16, 2.5), ("lowbit int4wo-g128 compiled", 16, 1.8),
        ("lowbit int4wo-g128 eager", 256, 0.95), ("lowbit int4wo-g128 compiled", 256, 0.95),
    ],
    "float8": [(f"lowbit fp8wo {mode}", m, 0.95) for mode in ("eager", "compiled") for m in (1, 16, 256)],
}
MAX_WEIGHT_BYTES_VS_BF16 = {"int8": 0.51, "float8": 0.51}


def evaluate_targets(family: str, results: list[dict]) -> list[dict]:
    """The issue's targets, checked against this run (None when a variant or shape was not run)."""
    r = {(x["variant"], x["m"]): x for x in results}
    out = []
    for name, m, need in TARGETS[family]:
        x = r.get((name, m))
        if x is None or x["speedup_vs_baseline"] is None:
            continue
        out.append({"target": f"{name} M={m} speedup >= {need}x", "measured": f"{x['speedup_vs_baseline']:.2f}x",
                    "met": x["speedup_vs_baseline"] >= need})
    seen = set()
    limit = MAX_WEIGHT_BYTES_VS_BF16.get(family)
    for x in results:
        if x["library"] == "lowbit" and x["variant"] not in seen and x["weight_bytes_vs_bf16"] is not None:
            seen.add(x["variant"])
            if family == "int4":  # int4-sized: the compiled graph holds no more than the quantized module
                ok = x["weight_bytes"] <= 1.02 * x["module_weight_bytes"]
                out.append({"target": f"{x['variant']} weight bytes <= 1.02x its quantized module (int4-sized)",
                            "measured": f"{x['weight_bytes'] / x['module_weight_bytes']:.3f}x "
                                        f"({x['weight_bytes_vs_bf16']:.3f}x bf16)", "met": ok})
                continue
            out.append({"target": f"{x['variant']} weight bytes <= {limit}x bf16",
                        "measured": f"{x['weight_bytes_vs_bf16']:.3f}x", "met": x["weight_bytes_vs_bf16"] <= limit})
    return out


if __name__ == "__main__":
    main()
