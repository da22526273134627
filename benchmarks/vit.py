"""Benchmark: a ViT-B/16-shaped encoder (random weights, batch 8 of 224x224, bf16) with lowbit W8A8.

Same rules as linear.py: one process, interleaved rounds, compiled variants (inductor freezing)
against compiled bf16, eager against eager bf16. Every nn.Linear is quantized (the patch conv,
norms and embeddings stay bf16); the 197 tokens x 8 images make M = 1576 rows per linear.

    python benchmarks/vit.py                          # full run, writes benchmarks/results/vit.json
    python benchmarks/vit.py --rounds 3 --no-peers
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from lowbit.configs import Int8DynamicActivationInt8WeightConfig  # noqa: E402
from lowbit.eval.metrics import sqnr  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402

DTYPE = torch.bfloat16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-B/16: 16x16 patches -> 768, cls token, learned positions, 12 pre-LN blocks, 1000 classes."""

    def __init__(self, img: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp: int = 3072, classes: int = 1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def make_model(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT().to(DTYPE).eval()


# --- variants ----------------------------------------------------------------------------------


def _lowbit_dyn(m):
    return quantize_(m, Int8DynamicActivationInt8WeightConfig())


def _torchao_dyn(m):
    import torchao.quantization as aq

    aq.quantize_(m, aq.Int8DynamicActivationInt8WeightConfig())
    return m


def _quanto_w8a8(calib):
    def build(m):
        from optimum.quanto import Calibration, freeze, qint8, quantize

        linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
        quantize(m, weights=qint8, activations=qint8, include=linears)  # linears only, like the others
        with Calibration():
            m(calib)
        freeze(m)
        return m

    return build


def variants(calib, peers: bool, compile_: bool):
    out: list[tuple[str, str, str, str, Callable]] = [  # name, library, scheme, mode, build
        ("bf16 eager", "torch", "bf16", "eager", lambda m: m),
        ("lowbit w8a8-dyn eager", "lowbit", "W8A8 dynamic", "eager", _lowbit_dyn),
    ]
    if compile_:
        out += [
            ("bf16 compiled", "torch", "bf16", "compiled", lambda m: m),
            ("lowbit w8a8-dyn compiled", "lowbit", "W8A8 dynamic", "compiled", _lowbit_dyn),
        ]
    skipped = []
    if peers:
        if compile_:
            try:
                import torchao  # noqa: F401

                out.append(("torchao w8a8-dyn compiled", "torchao", "W8A8 dynamic", "compiled", _torchao_dyn))
            except Exception as e:  # noqa: BLE001
                skipped.append({"library": "torchao", "reason": f"{type(e).__name__}: {e}"})
        try:
            import optimum.quanto  # noqa: F401

            out.append(("quanto w8a8 eager", "optimum-quanto", "W8A8 static (calibrated)", "eager", _quanto_w8a8(calib)))
        except Exception as e:  # noqa: BLE001
            skipped.append({"library": "optimum-quanto", "reason": f"{type(e).__name__}: {e}"})
    return out, skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (timed with a synchronize per call)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default: 8 on CPU, 32 on CUDA)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    p.add_argument("--max-rounds", type=int, default=None, help="extra rounds allowed to replace contaminated samples (default: 2x rounds)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; extra rounds stop when it is spent")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vit.json"))
    args = p.parse_args()
    if args.batch is None:
        args.batch = 32 if args.device.startswith("cuda") else 8
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    t_start = time.time()
    machine = C.machine_facts()
    log(f"{machine['cpu_model']}, torch {machine['torch_version']}, {machine['torch_threads']} threads")
    with torch.no_grad():
        base = make_model().to(args.device)
        x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device, DTYPE)
        calib = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(args.device, DTYPE)
        ref = base(x).float()
        vs, skipped = variants(calib, not args.no_peers, not args.no_compile)
        built = {}
        for name, lib, scheme, mode, build in vs:
            t0 = time.time()
            try:
                model = build(copy.deepcopy(base))
                info = {"library": lib, "scheme": scheme, "mode": mode, "eager_bytes": C.module_weight_bytes(model)}
                if mode == "compiled":
                    fn, (out,), compiled_info = C.compile_and_capture(model, [x])
                    info.update(compiled_info)
                else:
                    fn = model
                    out = fn(x)
                info["fn"], info["sqnr_db"] = fn, round(sqnr(ref, out.float()), 2)
                info["inner"] = C.calibrate_inner(lambda: (fn(x), sync()), 300.0)
                info["build_s"] = round(time.time() - t0, 1)
                built[name] = info
                log(f"built {name} in {info['build_s']}s, sqnr {info['sqnr_db']} dB")
            except Exception as e:  # noqa: BLE001
                skipped.append({"variant": name, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
                log(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}")
        log(f"timing: {len(built)} variants x {args.rounds} rounds")
        fns = {n: (lambda f=b["fn"]: (f(x), sync())) for n, b in built.items()}
        timings = C.interleaved(fns, {n: b["inner"] for n, b in built.items()}, args.rounds, log,
                                max_rounds=args.max_rounds or 2 * args.rounds, deadline=t_start + args.budget_s)

    bf16_bytes = built["bf16 eager"]["eager_bytes"]["total"] if "bf16 eager" in built else None
    rows, results = [], []
    for n, b in built.items():
        s = timings[n].summary()
        base_name = f"bf16 {b['mode']}"
        base_ms = timings[base_name].median() if base_name in built else None
        speedup = None if base_ms is None else base_ms / s["median_ms"]
        wb = b["compiled_bytes"] if b["mode"] == "compiled" else b["eager_bytes"]
        wratio = None if not bf16_bytes else wb["total"] / bf16_bytes
        results.append({
            "variant": n, "library": b["library"], "scheme": b["scheme"], "mode": b["mode"], "batch": args.batch,
            **s, "baseline": base_name, "speedup_vs_baseline": speedup, "images_per_s": args.batch * 1e3 / s["median_ms"],
            "weight_bytes": wb["total"], "weight_bytes_by_dtype": wb["by_dtype"], "weight_bytes_vs_bf16": wratio,
            "weight_bytes_method": "get_attr constants of the frozen inductor graph (after prepack and constant folding), unique storages"
            if b["mode"] == "compiled" else "module parameters and buffers, subclasses flattened, unique storages",
            "module_weight_bytes": b["eager_bytes"]["total"], "sqnr_db": b["sqnr_db"], "build_s": b["build_s"],
            **({k: b[k] for k in ("graph_breaks", "graph_break_reasons", "dynamo_graphs")} if b["mode"] == "compiled" else {}),
        })
        rows.append([
            n, f"{s['median_ms']:.1f}", f"{s['iqr_ms']:.1f}", f"{s['clean_samples']}/{len(s['samples_ms'])}",
            "-" if speedup is None else f"{speedup:.2f}x", f"{args.batch * 1e3 / s['median_ms']:.1f}",
            C.fmt_mb(wb["total"]), "-" if wratio is None else f"{wratio:.2f}", b["sqnr_db"],
            b.get("graph_breaks", "-"),
        ])
    headers = ["variant", "median ms", "IQR ms", "clean", "speedup", "img/s", "weight MB", "w/bf16", "SQNR dB", "graph breaks"]
    targets = []
    r = {x["variant"]: x for x in results}
    if "lowbit w8a8-dyn compiled" in r and r["lowbit w8a8-dyn compiled"]["speedup_vs_baseline"] is not None:
        sp = r["lowbit w8a8-dyn compiled"]["speedup_vs_baseline"]
        targets.append({"target": f"ViT batch {args.batch} lowbit w8a8-dyn compiled >= 1.25x bf16 compiled",
                        "measured": f"{sp:.2f}x", "met": sp >= 1.25})
    print(f"\n{machine['cpu_model']} | torch {machine['torch_version']} | {machine['torch_threads']} threads | "
          f"{machine['timestamp_utc']}\nViT-B/16 shape, batch {args.batch}, 224x224, bf16, random weights; speedup = "
          f"matching bf16 median / variant median (eager vs eager, compiled vs compiled-frozen)\n")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    if targets:
        print()
        print(tabulate([[t["target"], t["measured"], "met" if t["met"] else "MISSED"] for t in targets],
                       headers=["target", "measured", ""], tablefmt="github"))
    if skipped:
        print("\nskipped:", *[f"  {s}" for s in skipped], sep="\n")
    machine["loadavg_end"] = os.getloadavg()
    C.write_json(args.out, {
        "benchmark": "vit", "machine": machine,
        "settings": {"model": "ViT-B/16 shape (random weights)", "device": args.device, "batch": args.batch, "image": 224, "dtype": "bfloat16",
                     "rounds": args.rounds, "contaminated_share": C.CONTAMINATED_SHARE, "peers": not args.no_peers,
                     "compile": not args.no_compile, "wall_s": round(time.time() - t_start, 1)},
        "results": results, "targets": targets, "skipped": skipped,
    })
    log(f"wrote {args.out} ({time.time() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
