"""Shared benchmark harness: machine facts, interleaved timing, weight bytes before and after compile."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Inductor freezing for every compiled variant (the compiled bf16 baseline streams its weights
# ~40% faster with it). Caches off: a cache hit would skip the lowering we inspect for constants.
torch._inductor.config.freezing = True
# every variant compiles the same forward code object (guarded by module identity) for every
# shape: without room for all of them, dynamo silently falls back to eager after 8 recompiles
torch._dynamo.config.cache_size_limit = 256
torch._dynamo.config.accumulated_cache_size_limit = 4096
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

CONTAMINATED_SHARE = 0.10  # a sample is dropped when other processes used > 10% of the cores meanwhile


# --- machine facts ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a peer that fails to import is simply absent
        return None


def machine_facts() -> dict:
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "isa": [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8") if f" {f}" in flags],
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "versions": {m: _version(m) for m in ("lowbit", "torchao", "bitsandbytes", "optimum.quanto")},
        "inductor": {"freezing": True, "fx_graph_cache": False, "autograd_cache": False},
    }


# --- weight bytes ---------------------------------------------------------------------------------


def _leaves(t: torch.Tensor):
    """Plain tensors inside ``t`` (tensor subclasses are flattened recursively)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _leaves(getattr(t, n))
        return
    yield t
    for extra in ("SCB",):  # bitsandbytes Int8Params keeps its row scales beside the data
        s = getattr(t, extra, None)
        if isinstance(s, torch.Tensor):
            yield s


def _key_and_bytes(t: torch.Tensor):
    if t.is_mkldnn:  # an inductor-packed weight is an opaque MKLDNN tensor without a storage
        return ("mkldnn", id(t)), t.numel() * t.element_size()
    st = t.untyped_storage()
    return ("storage", st.data_ptr()), st.nbytes()


def tensor_bytes(tensors) -> dict:
    """Bytes of the unique storages behind ``tensors`` (subclasses flattened), total and per dtype."""
    seen, by_dtype = set(), {}
    for t in tensors:
        for leaf in _leaves(t):
            key, nbytes = _key_and_bytes(leaf)
            if key in seen:
                continue
            seen.add(key)
            name = str(leaf.dtype).removeprefix("torch.") + ("/mkldnn" if leaf.is_mkldnn else "")
            by_dtype[name] = by_dtype.get(name, 0) + nbytes
    return {"total": sum(by_dtype.values()), "by_dtype": by_dtype}


def module_weight_bytes(model: torch.nn.Module) -> dict:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


class ConstantCapture:
    """Records the constants each frozen inductor graph holds.

    Wraps ``torch._inductor.freezing.freeze`` (compile_fx imports it at call time): its output is
    the graph after parameters were inlined as constants, weights prepacked and constants folded,
    so a quantized weight whose dequantize ops were folded into one float constant shows up here
    with the float dtype. Every ``get_attr`` tensor of that graph is counted.
    """

    def __init__(self):
        self.graphs: list[dict[str, torch.Tensor]] = []
        self._orig = None

    def __enter__(self):
        import torch._inductor.freezing as freezing

        self._orig = freezing.freeze
        capture = self

        def freeze(dynamo_gm, aot_gm, example_inputs):
            gm, preserved = capture._orig(dynamo_gm, aot_gm, example_inputs)
            consts = {}
            for node in gm.graph.find_nodes(op="get_attr"):
                t = getattr(gm, node.target, None)
                if isinstance(t, torch.Tensor):
                    consts[node.target] = t
            capture.graphs.append(consts)
            return gm, preserved

        freezing.freeze = freeze
        return self

    def __exit__(self, *exc):
        import torch._inductor.freezing as freezing

        freezing.freeze = self._orig

    def constant_bytes(self) -> dict:
        """The largest graph's constants (what one compiled shape holds) and the union over all the
        shape-specialized graphs (what the process holds for them: a weight packed per shape
        counts once per graph)."""
        per_graph = [tensor_bytes([t for t in g.values() if isinstance(t, torch.Tensor)]) for g in self.graphs]
        union = tensor_bytes([t for g in self.graphs for t in g.values() if isinstance(t, torch.Tensor)])
        largest = max(per_graph, key=lambda b: b["total"], default={"total": 0, "by_dtype": {}})
        return {**largest, "graphs": len(self.graphs), "per_graph_total": [b["total"] for b in per_graph],
                "all_graphs_total": union["total"], "all_graphs_by_dtype": union["by_dtype"]}


# --- timing ---------------------------------------------------------------------------------------


def compile_and_capture(model: torch.nn.Module, calls: list) -> tuple[Callable, list, dict]:
    """``torch.compile`` ``model``, run it on every input of ``calls`` twice (warm-up), and report
    the constant bytes the frozen graphs hold and dynamo's graph and graph-break counts.

    Returns ``(compiled_fn, outputs_of_first_calls, info)``.
    """
    torch._dynamo.utils.counters.clear()
    fn = torch.compile(model, dynamic=False)
    with ConstantCapture() as cap:
        outs = [fn(x) for x in calls]
        for x in calls:
            fn(x)
    cnt = torch._dynamo.utils.counters
    info = {
        "compiled_bytes": cap.constant_bytes(),
        "graph_breaks": sum(cnt["graph_break"].values()),
        "graph_break_reasons": sorted(cnt["graph_break"])[:5],
        "dynamo_graphs": cnt["stats"].get("unique_graphs", 0),
    }
    return fn, outs, info


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait (steal counts as taken from us)


def _own_jiffies(hz: int) -> float:
    t = os.times()
    return (t.user + t.system) * hz


@dataclass
class Samples:
    """Per-call times (ms) of one variant at one shape, one sample per round."""

    ms: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)  # share of the cores other processes used
    inner: int = 1

    def clean(self) -> list[float]:
        ok = [m for m, f in zip(self.ms, self.foreign) if f <= CONTAMINATED_SHARE]
        return ok if len(ok) >= 3 else list(self.ms)

    def median(self) -> float:
        return statistics.median(self.clean())

    def summary(self) -> dict:
        c = self.clean()
        return {
            "median_ms": self.median(),
            "min_ms": min(self.ms),
            "iqr_ms": _iqr(c),
            "samples_ms": [round(m, 3) for m in self.ms],
            "foreign_cpu_share": [round(f, 3) for f in self.foreign],
            "clean_samples": sum(f <= CONTAMINATED_SHARE for f in self.foreign),
            "calls_per_sample": self.inner,
        }


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def calibrate_inner(fn: Callable[[], object], target_ms: float) -> int:
    """Calls per sample so that one sample lasts about ``target_ms`` (at least one call)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return max(1, min(50, math.ceil(target_ms / max(ms, 1e-3))))


def machine_busy_share(seconds: float = 0.5) -> float:
    """Share of all cores busy over ``seconds`` while this process sleeps (other processes' load)."""
    b0, t0 = _busy_jiffies(), time.perf_counter()
    time.sleep(seconds)
    return (_busy_jiffies() - b0) / ((time.perf_counter() - t0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1))


def wait_quiet(max_wait_s: float, log=None) -> float:
    """Sleep until other processes use <= CONTAMINATED_SHARE of the cores, at most ``max_wait_s``.
    Returns the seconds waited."""
    t0 = time.perf_counter()
    while (busy := machine_busy_share()) > CONTAMINATED_SHARE and time.perf_counter() - t0 < max_wait_s:
        if log:
            log(f"  machine busy ({busy:.0%} of the cores used by others), waiting")
        time.sleep(2.0)
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], object]], inner: dict[str, int], rounds: int, log=None,
    max_rounds: int | None = None, deadline: float | None = None, quiet_wait_s: float = 20.0,
) -> dict[str, Samples]:
    """Round-robin over the variants (start rotated each round); one sample per variant per round.

    Each sample also records the share of the machine's cores that other processes kept busy
    meanwhile (from /proc/stat minus this process's CPU time), to drop contaminated samples.
    Before each round it waits (up to ``quiet_wait_s``) for a quiet machine; after ``rounds``
    rounds it keeps going, up to ``max_rounds`` and the ``deadline`` (a ``time.time()``), while
    some variant has fewer than ``rounds`` clean samples.
    """
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    names = list(fns)
    out = {n: Samples(inner=inner[n]) for n in names}
    max_rounds = max_rounds or rounds
    for r in range(max_rounds):
        if r >= rounds:
            short = min(sum(f <= CONTAMINATED_SHARE for f in s.foreign) for s in out.values())
            if short >= rounds or (deadline is not None and time.time() > deadline):
                break
        if quiet_wait_s > 0:
            wait_quiet(quiet_wait_s if deadline is None else max(0.0, min(quiet_wait_s, deadline - time.time())), log)
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            fn, k = fns[n], inner[n]
            b0, o0 = _busy_jiffies(), _own_jiffies(hz)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            wall = time.perf_counter() - t0
            foreign = (_busy_jiffies() - b0) - (_own_jiffies(hz) - o0)
            out[n].ms.append(wall * 1e3 / k)
            out[n].foreign.append(max(0.0, foreign) / (wall * hz * ncpu))
        if log:
            worst = max(out[n].foreign[-1] for n in names)
            log(f"  round {r + 1} done (max foreign share {worst:.0%})")
    return out


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def fmt_mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f}"
