"""Benchmark: every CPU linear kernel, lowbit's and its peers', as a fraction of this host's own limits, in one process.

Limits (measured first, then again after the kernels; the larger is kept):

* DRAM read bandwidth with 1 and N threads: ``torch.sum`` over a 1 GiB float32 tensor (no L3 reuse);
* compute peaks: ``F.linear`` in bf16 and in float32 on 1024^3 (what torch reaches, not the silicon's datasheet
  peak); int8: on a CPU with AVX-512 VNNI the unit's own limit, ``vpdpbusd`` on registers alone on every thread
  (the int8_act build's ``vnni_peak_gops``; ``torch._int_mm`` on 1024^3 is reported beside it), elsewhere
  ``torch._int_mm``'s rate. On a CPU without AVX-512 BF16 and VNNI (this project's AVX2 hosts) bf16 and int8 run
  far below float32: the table says so.

Kernels (eager, N threads, interleaved rounds, medians; _common.py drops samples taken while other processes used
> 10% of the cores). Every lowbit config and, when installed, its peers: torchao (int4 g128 in its CPU layout,
int8 weight-only, W8A8 dynamic, float8 weight-only, 8da4w), bitsandbytes (nf4, LLM.int8) and optimum-quanto (qint4
g128 and qint8 weights, qint8 weights x calibrated qint8 activations). All quantize the same bf16 weights and run
in the same rounds:

* decode, M = 1 and 4, on 8 stacked ``Linear(4096, 4096)`` (bf16 weights 256 MiB), or more where the int4 copy
  of 8 (69 MiB) would be read from this guest's share of the cache (``decode_layers``: 24 on one Intel host whose
  guest read 64 MiB at twice DRAM speed): the fraction is weight bytes / time / DRAM bandwidth (activations are negligible).
  Weight bytes are what the layers really hold after a forward pass: every storage reachable from the modules
  (tensor subclasses flattened, bitsandbytes' row scales and nf4 block statistics included), counted once;
* M = 16 (a small batch of decodes, speculative drafts), on the same stack: neither limit alone binds on
  every host, so the fraction is the roofline's own bound, the larger of bytes / DRAM bandwidth and ops / peak
  (the peak as at M = 256 below), over the time; the table says which of the two bound it;
* prefill, M = 256, on one ``Linear(4096, 4096)``: 2 M N K / time over the peak of the arithmetic the kernel
  runs (int8 peak for W8A8 and 8da4w where ``_int_mm`` beats float32, else the better of the bf16 and float32
  peaks: on a CPU without VNNI lowbit's exact int8 products run on float32 FMAs or its own AVX2 kernel). At M=256
  fp8 x int4 fake-quantizes its activations then runs the int4 weight-only path (README's design notes).
  A ``float32`` row (bf16 x widened, float32 ``F.linear``, output rounded back) is the baseline to read beside
  bf16 on a CPU without native bf16 matmul. bitsandbytes' LLM.int8 uses ``torch._int_mm`` only on AVX-512 CPUs and a float32
  matmul of the int8 values elsewhere, so its peak follows the host.

A peer that is not installed, fails to quantize or fails its first forward on CPU gets one row saying why.
SQNR (dB) is each kernel's M = 256 output against bf16's, so a peer that silently kept bf16 weights shows.

    python benchmarks/roofline.py                 # writes results/roofline.{json,md}
    python benchmarks/roofline.py --quick         # 2 rounds, M = 1 and 256: a smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved, machine_facts, tensor_bytes, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N = K = 4096
DECODE_LAYERS = 8  # at least; decode_layers() takes more where 8 layers' int4 fits this guest's cache
LAYER_CHOICES = (8, 16, 24, 32)
CACHE_MARGIN = 1.15  # a buffer read faster than this x the 1 GiB rate is (partly) served from cache
M_VALUES, M_QUICK = (1, 4, 16, 256), (1, 256)
DECODE_MAX_M = 4  # rows with M <= this are read-bound (bytes / bandwidth)
STACK_MAX_M = 16  # rows with M <= this run on the decode stack; above DECODE_MAX_M: max(bytes, ops) bound
# rows with M > STACK_MAX_M run on one layer and are compute-bound (ops / peak)
INT4_PROTO = "torchao.prototype.quantization.int4.inference_workflow"


@dataclass(frozen=True)
class Entry:
    """One row group of the table: how to quantize a fresh bf16 stack and which peak its M = 256 row is held to.

    ``build`` takes an ``nn.Sequential`` of bf16 ``Linear(4096, 4096)`` and returns the quantized module (in place
    or new); it imports its library itself, so a missing peer raises ``ImportError`` there.
    """

    name: str
    library: str
    int8_peak: bool
    build: Callable[[nn.Sequential], nn.Module]


def _lowbit(config) -> Callable[[nn.Sequential], nn.Module]:
    def build(m):
        import lowbit

        lowbit.quantize_(m, config)
        return m

    return build


class _Float32Linear(nn.Module):
    """The float32 baseline on bf16 activations: x widened, multiplied in float32, the output rounded back. On a
    CPU without native bf16 matmul this is what a user should compare against, not bf16."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear.float()

    def forward(self, x):
        return self.linear(x.float()).to(x.dtype)


def _float32(m: nn.Sequential) -> nn.Module:
    return nn.Sequential(*[_Float32Linear(layer) for layer in m])


def _lowbit_entries() -> list[Entry]:
    import lowbit

    configs = {
        "int8 weight-only": lowbit.Int8WeightOnlyConfig(),
        "int4 weight-only g128": lowbit.Int4WeightOnlyConfig(group_size=128),
        "float8 weight-only": lowbit.Float8WeightOnlyConfig(),
        "W8A8 dynamic": lowbit.Int8DynamicActivationInt8WeightConfig(),
        "W8A8 static": lowbit.Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=0),
        "8da4w": lowbit.Int8DynamicActivationInt4WeightConfig(),
        "float8 dynamic": lowbit.Float8DynamicActivationFloat8WeightConfig(),
        "fp8 x int4": lowbit.Float8DynamicActivationInt4WeightConfig(),
    }
    int8 = ("W8A8 dynamic", "W8A8 static", "8da4w")
    return [Entry("bf16", "torch", False, lambda m: m), Entry("float32", "torch", False, _float32)] + [
        Entry(name, "lowbit", name in int8, _lowbit(c)) for name, c in configs.items()]


def _torchao(config_name: str, module: str = "torchao.quantization", **kwargs) -> Callable[[nn.Sequential], nn.Module]:
    def build(m):
        import importlib

        import torchao.quantization as aq

        cls = getattr(importlib.import_module(module), config_name)
        if "set_inductor_config" in cls.__dataclass_fields__:
            kwargs["set_inductor_config"] = False  # it would change global inductor settings for every row
        aq.quantize_(m, cls(**kwargs))
        return m

    return build


def _bnb(quant_type: str) -> Callable[[nn.Sequential], nn.Module]:
    """bitsandbytes layers holding the same weights; the move to a device is what quantizes them."""

    def build(m):
        import bitsandbytes as bnb

        layers = []
        for lin in m:
            w = lin.weight.data.clone()
            if quant_type == "int8":  # LLM.int8 as published: columns of |x| > 6 stay in 16 bits
                q = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type)
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type)
            layers.append(q.to("cpu"))
        return nn.Sequential(*layers).eval()

    return build


def _quanto(weights: str, calib: torch.Tensor | None) -> Callable[[nn.Sequential], nn.Module]:
    """optimum-quanto weights (and, given ``calib``, static int8 activations calibrated on it), frozen."""

    def build(m):
        import optimum.quanto as oq

        oq.quantize(m, weights=getattr(oq, weights), activations=oq.qint8 if calib is not None else None)
        if calib is not None:
            with torch.no_grad(), oq.Calibration():
                for layer in m:  # each layer on the same input, as the benchmark runs them
                    layer(calib)
        oq.freeze(m)
        return m

    return build


def _peer_entries(calib: torch.Tensor) -> list[Entry]:
    """torchao 0.18, bitsandbytes 0.50 and optimum-quanto 0.2.7 schemes next to lowbit's.

    torchao's ``Int4WeightOnlyConfig`` has no CPU packing format in 0.18 (plain and preshuffled need the CUDA
    mslk kernels, tile_packed_to_4d CUDA, plain_int32 XPU): its CPU int4 is the prototype opaque layout
    (``_weight_int4pack_mm_for_cpu``). The plain row is kept so the table says why.
    """
    bnb_int8_on_int_mm = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return [
        Entry("torchao int4 g128 (Int4WeightOnlyConfig plain)", "torchao", False,
              _torchao("Int4WeightOnlyConfig", group_size=128)),
        Entry("torchao int4 g128 (CPU opaque layout)", "torchao", False,
              _torchao("PrototypeInt4WeightOnlyConfig", INT4_PROTO, group_size=128)),
        Entry("torchao int8 weight-only", "torchao", False, _torchao("Int8WeightOnlyConfig")),
        Entry("torchao W8A8 dynamic", "torchao", True, _torchao("Int8DynamicActivationInt8WeightConfig")),
        Entry("torchao float8 weight-only", "torchao", False, _torchao("Float8WeightOnlyConfig")),
        Entry("torchao 8da4w g32", "torchao", True,
              _torchao("Int8DynamicActivationInt4WeightConfig", INT4_PROTO, group_size=32)),
        Entry("bnb nf4 (blocks of 64)", "bitsandbytes", False, _bnb("nf4")),
        Entry("bnb LLM.int8 (threshold 6)", "bitsandbytes", bnb_int8_on_int_mm, _bnb("int8")),
        Entry("quanto qint4 g128 weights", "optimum-quanto", False, _quanto("qint4", None)),
        Entry("quanto qint8 weights", "optimum-quanto", False, _quanto("qint8", None)),
        Entry("quanto qint8 weights x qint8 acts", "optimum-quanto", True, _quanto("qint8", calib)),
    ]


def _bf16_stack(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(K, N, bias=False) for _ in range(layers)]).to(torch.bfloat16).eval()


def _reachable_tensors(obj, seen: set, depth: int = 0):
    """Tensors held by ``obj``: module parameters, buffers and any other attribute (bitsandbytes keeps its int8 row
    scales in ``module.state`` after the first forward and nf4 statistics in ``weight.quant_state``), recursively."""
    if depth > 12 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        attrs = getattr(obj, "__dict__", {})
    elif isinstance(obj, dict):
        attrs = obj
    elif isinstance(obj, (list, tuple)):
        attrs = dict(enumerate(obj))
    elif isinstance(obj, nn.Module) or (hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in (
            "bitsandbytes", "optimum", "torchao", "lowbit")):
        attrs = vars(obj)
    else:
        return
    for value in attrs.values():
        yield from _reachable_tensors(value, seen, depth + 1)


def stored_weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage reachable from ``model`` (subclasses flattened; each storage counted once)."""
    return tensor_bytes(list(_reachable_tensors(model, set())))["total"]


def _stacked(model: nn.Module, x: torch.Tensor):
    """Each layer applied to the same x (not chained: the output of one is not the next's input scale);
    returns the last layer's output."""
    layers = list(model)

    def run():
        with torch.inference_mode():
            for layer in layers:
                y = layer(x)
        return y

    return run


def dram_bandwidth(threads: int, rounds: int = 5, nbytes: int = 2**30) -> float:
    """GB/s of ``torch.sum`` over ``nbytes`` (1 GiB) of float32 with ``threads`` threads (median of ``rounds``), the
    buffer on 2 MiB pages as lowbit's quantized weights are (``lowbit.kernels.hugepages``; since session 26: on 4 KiB
    pages the same read was ~13% slower on the Zen 4 guest, 29.4-29.9 against 33.9-34.0 GB/s:
    avx512_zen4/scratch/dram_probe_pages_session26.txt)."""
    import statistics
    import time

    from lowbit.kernels import hugepages

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        hugepages.advise(t)
        t.sum()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            t.sum()
            times.append(time.perf_counter() - t0)
        return t.nbytes / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(old)


def decode_layers(threads: int, dram_gbs: float, log) -> int:
    """The fewest layers (8, 16, 24, 32) whose int4 g128 copy, the smallest of the table's decode weights, reads
    at DRAM speed: a buffer of its size summed at most ``CACHE_MARGIN`` x the 1 GiB rate. The L3 size a VM reports
    is the socket's, not this guest's share (480 MiB reported on one Intel host, where 64 MiB read at 50 GB/s, 2x
    DRAM, and 8 layers' 69 MiB of int4 would have been timed from cache)."""
    per_layer = N * K // 2 + 2 * N * (K // 128) * 2  # nibbles, bf16 scale and zero point per group of 128
    for layers in LAYER_CHOICES:
        gbs = dram_bandwidth(threads, nbytes=layers * per_layer)
        log(f"decode stack: {layers} layers' int4 ({layers * per_layer / 2**20:.0f} MiB) read at {gbs:.1f} GB/s "
            f"(1 GiB: {dram_gbs:.1f})")
        if gbs <= CACHE_MARGIN * dram_gbs:
            return layers
    return LAYER_CHOICES[-1]


def _vnni_peak_gops() -> float | None:
    """GOP/s of ``vpdpbusd`` on registers alone on every thread (the AVX-512 int8_act build), or None where that
    build or the CPU's avx512_vnni is missing."""
    from lowbit.kernels import w8a8 as k8

    ext = k8._vnni_ext()
    if ext is None or not hasattr(ext, "vnni_peak_gops"):
        return None
    return max(ext.vnni_peak_gops(20_000_000) for _ in range(3))


def compute_peaks(rounds: int = 3) -> dict:
    """GFLOP/s of ``F.linear`` in bf16 and float32 and GOP/s of ``torch._int_mm`` (int8) on 1024 x 1024 x 1024:
    what torch reaches on this host (on a CPU without AVX-512 BF16 / VNNI, bf16 and int8 are far below fp32).
    ``int8`` is the VNNI register peak where there is one (``_vnni_peak_gops``), else ``_int_mm``'s rate, which
    is also kept as ``int8_int_mm``; where there is one, the larger of the two (oneDNN runs ``_int_mm`` on AMX tiles)."""
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
    out["int8_int_mm"] = out["int8"]
    vnni = _vnni_peak_gops()
    if vnni is not None:  # AMX (oneDNN's _int_mm) can go past vpdpbusd's register peak
        out["int8_vnni"] = vnni
        out["int8"] = max(vnni, out["int8_int_mm"])
    return out


def _limits(threads: int) -> dict:
    return {"dram_gbs_1_thread": dram_bandwidth(1), f"dram_gbs_{threads}_threads": dram_bandwidth(threads),
            **{f"{k}_peak_gops": v for k, v in compute_peaks().items()}}


def _one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text if len(text) <= 150 else text[:147] + "..."


def _prepare(entries: list[Entry], m_values: tuple[int, ...], layers: int, log) -> tuple[dict, dict, dict, dict]:
    """Quantize each entry's decode and prefill stacks, warm every shape up once (kernel builds, derived layouts)
    and count the bytes held afterwards. An entry whose build or warm-up raises is dropped with its reason.

    Returns (timed functions by "name | M=m", weight bytes by (name, M), SQNR of the M = 256 output by name,
    failure reason by name).
    """
    from lowbit.eval import sqnr

    xs = {m: torch.randn(m, K, generator=torch.Generator().manual_seed(1 + m)).bfloat16() for m in m_values}
    prefill_m = [m for m in m_values if m > STACK_MAX_M]
    ref = {}
    if prefill_m:
        with torch.inference_mode():
            ref = {m: _bf16_stack(1)[0](xs[m]) for m in prefill_m}
    fns, nbytes, sqnr_db, failed = {}, {}, {}, {}
    for e in entries:
        log(f"preparing {e.name}")
        try:
            decode = e.build(_bf16_stack(layers)) if any(m <= STACK_MAX_M for m in m_values) else None
            prefill = e.build(_bf16_stack(1)) if prefill_m else None
            mine = {}
            for m in m_values:
                fn = _stacked(decode if m <= STACK_MAX_M else prefill, xs[m])
                out = fn()
                if m > STACK_MAX_M:
                    sqnr_db[e.name] = sqnr(ref[m], out)
                mine[f"{e.name} | M={m}"] = fn
            for m in m_values:
                nbytes[(e.name, m)] = stored_weight_bytes(decode if m <= STACK_MAX_M else prefill)
            fns.update(mine)
        except Exception as exc:  # noqa: BLE001 - a peer that fails on CPU gets a row saying why, never a crash
            failed[e.name] = _one_line(exc)
            log(f"{e.name}: {failed[e.name]}")
    return fns, nbytes, sqnr_db, failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 rounds (no extra ones), M = 1 and 256; prints the table, writes no results")
    ap.add_argument("--no-peers", action="store_true", help="lowbit and bf16 only")
    ap.add_argument("--decode-layers", type=int, choices=LAYER_CHOICES,
                    help="layers in the M <= 16 stack (default: the fewest whose int4 copy reads at DRAM speed)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "roofline"))
    args = ap.parse_args(argv)
    faulthandler.enable()  # a crash inside a native kernel (ours or a peer's) prints the Python stack
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    rounds, m_values = (2, M_QUICK) if args.quick else (args.rounds, M_VALUES)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    limits = _limits(threads)
    log(f"limits before: {limits}")
    calib = torch.randn(256, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    entries = _lowbit_entries() + ([] if args.no_peers else _peer_entries(calib))
    layers = args.decode_layers or decode_layers(threads, limits[f"dram_gbs_{threads}_threads"], log)
    fns, nbytes, sqnr_db, failed = _prepare(entries, m_values, layers, log)
    if "bf16" in failed:
        raise RuntimeError(f"the bf16 baseline failed: {failed['bf16']}")
    # --quick takes what the rounds give (no extra rounds for contaminated samples, shorter waits for quiet)
    samples = interleaved(fns, {n: 1 for n in fns}, rounds, log=log, max_rounds=rounds if args.quick else rounds + 4,
                          quiet_wait_s=5.0 if args.quick else 20.0)
    after = _limits(threads)
    log(f"limits after: {after}")
    limits = {k: max(v, after[k]) for k, v in limits.items()}
    bw = limits[f"dram_gbs_{threads}_threads"]
    float_peak = max(("bf16", "fp32"), key=lambda k: limits[f"{k}_peak_gops"])
    bf16_ms = {m: samples[f"bf16 | M={m}"].median() for m in m_values}
    rows, table = [], []
    for e in entries:
        if e.name in failed:
            rows.append({"config": e.name, "library": e.library, "error": failed[e.name]})
            table.append([e.name, e.library, "-", "-", "-", "-", f"not run: {failed[e.name]}", "-", "-"])
            continue
        for m_rows in m_values:
            ms = samples[f"{e.name} | M={m_rows}"].median()
            moved = nbytes[(e.name, m_rows)]
            gbs = moved / (ms / 1e3) / 1e9
            # without VNNI, _int_mm's peak is below float32's, and lowbit's exact int8 routes run on float32
            # FMAs or our own AVX2 kernel: int8 configs are held to the better of the int8 and float peaks
            peak = "int8" if e.int8_peak and limits["int8_peak_gops"] >= limits[f"{float_peak}_peak_gops"] \
                else float_peak
            peak_gops = limits[f"{peak}_peak_gops"]
            ops = 2 * m_rows * N * K * (layers if m_rows <= STACK_MAX_M else 1)
            gops = ops / (ms / 1e3) / 1e9
            bytes_bound = moved / bw >= ops / peak_gops  # which limit's time is the longer (both in ns)
            if m_rows <= DECODE_MAX_M:
                frac, what = gbs / bw, f"{gbs:.1f} GB/s of {bw:.1f}"
            elif m_rows <= STACK_MAX_M and bytes_bound:  # M = 16 where the bytes take longer than the ops at peak
                frac, what = gbs / bw, f"{gbs:.1f} GB/s of {bw:.1f} (bytes bound)"
            else:
                frac = gops / peak_gops
                what = f"{gops:.0f} of {peak} {peak_gops:.0f} GOP/s" + (" (ops bound)" if m_rows <= STACK_MAX_M else "")
            sq = sqnr_db.get(e.name)
            finite_sq = sq if sq is not None and sq != float("inf") else None  # bf16 against itself: inf, JSON null
            row = {"config": e.name, "library": e.library, "M": m_rows, "ms": ms, "fraction_of_roofline": frac,
                   "vs_bf16": bf16_ms[m_rows] / ms, "weight_bytes": moved, "sqnr_db": finite_sq,
                   **samples[f"{e.name} | M={m_rows}"].summary()}
            rows.append(row)
            table.append([e.name, e.library, m_rows, f"{moved / 2**20:.1f}", f"{ms:.2f}", f"{frac:.2f}", what,
                          f"{row['vs_bf16']:.2f}x", "-" if finite_sq is None else f"{finite_sq:.1f}"])
    md = tabulate(table, headers=["config", "library", "M", "weight MiB", "ms", "fraction", "of what", "vs bf16",
                                  "SQNR dB"], tablefmt="github")
    facts = {**machine_facts(), "threads": threads, "load_avg": os.getloadavg(),
             "kernels": __import__("lowbit.kernels._ext", fromlist=["status"]).status()}
    int8_what = ("vpdpbusd on registers" if limits["int8_peak_gops"] != limits["int8_int_mm_peak_gops"]
                 else "torch._int_mm on 1024^3" + (f", above vpdpbusd's {limits['int8_vnni_peak_gops']:.0f}"
                                                   if "int8_vnni_peak_gops" in limits else ""))
    note = (f"{facts['cpu_model']}, {threads} threads, eager; M<={DECODE_MAX_M}: {layers} x Linear(4096, 4096) "
            f"(stored weight bytes / time / DRAM read bandwidth); M={STACK_MAX_M}: the same stack, the larger of "
            f"bytes / bandwidth and ops / peak over the time; M=256: one Linear(4096, 4096) (ops / time / peak). "
            f"Limits: DRAM 1 thread {limits['dram_gbs_1_thread']:.1f} GB/s, {threads} threads {bw:.1f} GB/s; F.linear "
            f"bf16 {limits['bf16_peak_gops']:.0f} GFLOP/s, fp32 {limits['fp32_peak_gops']:.0f}; int8 "
            f"{limits['int8_peak_gops']:.0f} GOP/s ({int8_what}; torch._int_mm {limits['int8_int_mm_peak_gops']:.0f}). Peers: {facts['versions']}. Kernels: {facts['kernels']}. "
            f"SQNR: M=256 output against bf16's.")
    print(md)
    print(note)
    if args.quick:
        log("--quick: results not written")
        return 0
    write_json(args.out + ".json", {"machine": facts, "limits": limits, "decode_layers": layers, "rows": rows,
                                    "args": vars(args)})
    with open(args.out + ".md", "w") as f:
        f.write(f"# Kernels and peers as fractions of this host's limits (benchmarks/roofline.py)\n\n{note}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
