"""The C++ GEMVs' weight-stream prefetch (``csrc/prefetch.h``): into which cache level and how far
ahead of the loads, chosen once per CPU by measurement.

A decode GEMV reads each weight byte once; how many cache misses it keeps in flight decides whether it
streams at the DRAM's rate. The kernels were first tuned on an AVX-512 Intel host, where a
non-temporal prefetch (NTA) 32 KiB ahead was best; on an AMD Zen 4 (EPYC, 2.6 GHz) the same prefetch
held the int8 GEMV to 10.7 GB/s on one core against a 28 GB/s read probe, and a prefetch into L2 (T1)
64 KiB ahead gave 24 GB/s. So the setting is measured, not assumed: the first process on a CPU times
the int8 GEMV on a 256 MiB weight (over any guest's share of L3 seen here) with each of ``CANDIDATES``, interleaved,
and keeps the fastest if it beats the original setting by ``MIN_GAIN`` (about 0.1 s, once; the
result is cached in ``$LOWBIT_CACHE/prefetch-<cpu>.json``). The setting is per kernel where the
best distance differs: on a Zen 2 the AVX2 int4 GEMV (more work per byte: two weights a byte, two
planes of x) ran 8-9% faster with T1 16-32 KiB ahead than with the int8 GEMV's 64 KiB (three runs,
benchmarks/results/avx2_zen2/scratch/README.md), so ``int4_cpu`` is timed on its own GEMV
(``prefetch-<cpu>-int4_cpu.json``); the other kernels take the int8 GEMV's choice (``MEASURED``).
``LOWBIT_PREFETCH`` overrides every kernel's: ``nta``, ``t0`` or ``t1``, optionally with
``:<bytes ahead>`` (a multiple of 64 up to 1 MiB), e.g. ``LOWBIT_PREFETCH=t1:65536``. Only where
bytes are fetched to changes, never a value.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

__all__ = ["ENV", "HINTS", "DEFAULT", "CANDIDATES", "MEASURED", "MIN_GAIN", "parse", "choice", "report"]

_log = logging.getLogger("lowbit.kernels")

ENV = "LOWBIT_PREFETCH"
HINTS = {"nta": 0, "t0": 1, "t1": 2}  # csrc/prefetch.h's PrefetchHint
DEFAULT = ("nta", 32768)  # the setting the kernels were first tuned with
# T0 too since a 2-core Intel Xeon (AMX) guest: there its int4 GEMV through nn.Linear (16 x 4096^2 g128, M = 1)
# read 21.3 GB/s with t0 16 KiB ahead against 18.1 with t1 32 KiB, the choice among the others then (probe 24.5;
# benchmarks/results/avx512_amx_xeon/scratch/int4_gemv_prefetch_sweep.txt), though this measurement, run again
# at 23:37 on its own call, put every t0 / t1 setting within 8% (int4 19.15 / 19.91, int8 27.58 / 27.04 GB/s)
CANDIDATES = (DEFAULT, ("t1", 16384), ("t1", 32768), ("t1", 65536), ("t0", 16384), ("t0", 32768))
MEASURED = ("int8_gemv", "int4_cpu")  # kernels timed on their own GEMV; the others take int8_gemv's choice
MIN_GAIN = 1.05  # a candidate replaces DEFAULT only when this much faster (run-to-run noise is a few %)
_MAX_DISTANCE = 1 << 20
_BYTES = 256 << 20  # the measured weight: over any guest's share of L3 seen here (~100 MiB read at L3 speed on
# the Intel guest above, whose /proc/cpuinfo says 480 MiB)
_K = 4096
_ROUNDS = 3


def parse(value: str) -> tuple[str, int]:
    """``"t1:65536"`` -> ``("t1", 65536)``; a hint alone keeps ``DEFAULT``'s distance.

    Raises:
        ValueError: naming ``LOWBIT_PREFETCH`` and what is allowed.
    """
    hint, _, dist = value.strip().lower().partition(":")
    if hint not in HINTS:
        raise ValueError(f"{ENV}={value!r}: the hint must be one of {sorted(HINTS)}, optionally followed by "
                         f"':<bytes ahead>', e.g. 't1:65536'")
    if not dist:
        return hint, DEFAULT[1]
    try:
        distance = int(dist)
    except ValueError:
        distance = -1
    if not (0 <= distance <= _MAX_DISTANCE and distance % 64 == 0):
        raise ValueError(f"{ENV}={value!r}: the distance must be a multiple of 64 bytes in [0, {_MAX_DISTANCE}]")
    return hint, distance


def _cache_path(kernel: str = "int8_gemv") -> Path:
    from lowbit.kernels import _ext

    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    key = hashlib.sha256((model + _ext._cpu_flags()).encode()).hexdigest()[:16]
    return root / (f"prefetch-{key}.json" if kernel == "int8_gemv" else f"prefetch-{key}-{kernel}.json")


def _gemv_call(ext, kernel: str):
    """The kernel's M = 1 GEMV on a ``_BYTES`` weight, as a call: ``int8_gemv``'s ``int8_weight_only_mm``, or
    ``int4_cpu``'s ``gemv_bf16`` (g128, int8 zero points, x from a normal distribution: the integer GEMV with both
    of its planes on the AVX2 build)."""
    x = torch.randn(1, _K, generator=torch.Generator().manual_seed(0)).bfloat16()
    if kernel == "int4_cpu":
        n = _BYTES // (_K // 2)
        q = torch.full((n, _K // 2), 0x5A, dtype=torch.uint8)
        s = torch.full((n, _K // 128), 0.01)
        z = torch.full((n, _K // 128), 8, dtype=torch.int8)
        return lambda: ext.gemv_bf16(x, q, s, z, None)
    n = _BYTES // _K
    w = torch.ones(n, _K, dtype=torch.int8)
    s = torch.ones(n, 1)
    return lambda: ext.int8_weight_only_mm(x, w, s)


def _measure(ext, kernel: str = "int8_gemv") -> dict[tuple[str, int], float]:
    """GB/s of the kernel's M = 1 GEMV (``_gemv_call``) on a ``_BYTES`` weight per candidate (medians of
    ``_ROUNDS`` interleaved rounds); the module's setting is restored afterwards."""
    call = _gemv_call(ext, kernel)
    before = ext.get_prefetch()
    times: dict[tuple[str, int], list[float]] = {c: [] for c in CANDIDATES}
    try:
        call()  # first touch
        for _ in range(_ROUNDS):
            for c in CANDIDATES:
                ext.set_prefetch(HINTS[c[0]], c[1])
                t0 = time.perf_counter()
                call()
                times[c].append(time.perf_counter() - t0)
    finally:
        ext.set_prefetch(*before)
    return {c: _BYTES / statistics.median(t) / 1e9 for c, t in times.items()}


@functools.cache
def choice(kernel: str = "int8_gemv") -> tuple[str, int, str]:
    """``(hint, distance, where it came from)`` for kernel ``kernel``'s module in this process:
    ``LOWBIT_PREFETCH``, else this CPU's cached measurement for it (the int8 GEMV's for a kernel not in
    ``MEASURED``), else a measurement now (cached), else ``DEFAULT`` when its GEMV can't run.

    Raises:
        ValueError: an invalid ``LOWBIT_PREFETCH``.
    """
    env = os.environ.get(ENV, "").strip()
    if env:
        hint, distance = parse(env)
        return hint, distance, f"{ENV}={env}"
    if kernel not in MEASURED:
        return choice("int8_gemv")
    path = _cache_path(kernel)
    try:
        data = json.loads(path.read_text())
        hint, distance = parse(f"{data['hint']}:{data['distance']}")
        return hint, distance, f"measured {data['utc']}, cached in {path}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from lowbit.kernels import _ext

    ext = _ext.built(kernel)
    if ext is None or not hasattr(ext, "set_prefetch"):
        return (*DEFAULT, f"default ({kernel} is not built here, nothing to measure with)")
    rates = _measure(ext, kernel)
    best = max(rates, key=rates.get)
    pick = best if rates[best] >= MIN_GAIN * rates[DEFAULT] else DEFAULT
    utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {"hint": pick[0], "distance": pick[1], "utc": utc, "threads": torch.get_num_threads(),
              "gb_per_s": {f"{h}:{d}": round(r, 2) for (h, d), r in rates.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: measure again next process
        _log.info("lowbit could not cache the prefetch choice in %s: %s", path, e)
    _log.info("lowbit weight-stream prefetch for %s: %s %d bytes ahead (GEMV GB/s %s)", kernel, pick[0], pick[1],
              record["gb_per_s"])
    return pick[0], pick[1], f"measured {utc} ({kernel} GEMV GB/s {record['gb_per_s']})"


def report() -> list[tuple[str, str]]:
    """``(what, setting)`` per measured kernel whose built module takes a setting (nothing is built or measured
    here that is not already): the int8 GEMV's first (the kernels not in ``MEASURED`` take it), then the others'.
    For ``lowbit info --kernels``."""
    from lowbit.kernels import _ext

    rows = []
    for kernel in MEASURED:
        if hasattr(_ext._LOADED.get(kernel, (None,))[0], "set_prefetch"):
            hint, distance, source = choice(kernel)
            who = "int8_gemv and the kernels not measured apart" if kernel == "int8_gemv" else kernel
            rows.append((f"weight-stream prefetch ({who})", f"{hint} {distance} bytes ahead ({source})"))
    return rows
