"""Lazily built C++ kernels (torch.utils.cpp_extension), one build per kernel chosen at run time
from the CPU's features, cached per source, torch and CPU.

Each kernel has an ordered list of builds (``BUILDS``): an AVX-512 source first, then an
AVX2 + FMA + F16C one (``csrc/<name>.cpp`` and ``csrc/<name>_avx2.cpp``, each its own extension
module ``lowbit_<source>``). ``load(name)`` builds the first one whose features the CPU has and
returns it, or None when none can run here; callers then use the pure-PyTorch path. Both builds of
a kernel define the same Python functions (and the same ``lowbit_cpu::`` dispatcher ops), so only
one build of a kernel is ever loaded in a process.

``LOWBIT_ISA`` forces a build: ``auto`` (default), ``avx512`` or ``avx2`` (e.g. ``LOWBIT_ISA=avx2``
runs and tests the AVX2 kernels on an AVX-512 machine); it is read at a kernel's first load.

``status()`` says, for each kernel, ``"ok (<isa>)"``, ``"disabled (LOWBIT_NO_EXT=1)"``,
``"not x86-64 (<machine>)"``, ``"cpu lacks <features> (<isa>); ..."`` (one entry per build it
could not use) or ``"build failed (<isa>): <error>"``. The first time a kernel can't run in a
process, a warning names it and the reason (a build failure also as a ``RuntimeWarning``: the CPU
could run it, so this is a broken install, not a missing feature). Each build happens once per
machine (about 20 s) into ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``; set ``LOWBIT_NO_EXT=1`` to
skip them all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["load", "status", "active_isa", "fitting_isa", "kernel_report", "needed_features", "forced_isa", "BUILDS", "ISAS", "OK",
           "DISABLED"]

_log = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"


@dataclass(frozen=True)
class Build:
    """One way to compile a kernel: its instruction set, its source ``csrc/<source>.cpp``, the CPU
    features it is compiled for (``/proc/cpuinfo`` names, passed as ``-m<flag>``) and extra flags."""

    isa: str
    source: str
    features: tuple[str, ...]
    cflags: tuple[str, ...] = ()


ISAS = ("avx512", "avx2")
_AVX2 = ("avx2", "fma", "f16c")
# int8_act must repeat the primitives' float32 ops exactly, so gcc may not fuse a multiply and an
# add into an FMA (its default -ffp-contract=fast would): both of its builds say so.
_EXACT = ("-ffp-contract=off",)
# Per kernel, its builds in order of preference: the first whose features the CPU has is used.
BUILDS: dict[str, tuple[Build, ...]] = {
    "int8_gemv": (Build("avx512", "int8_gemv", ("avx512f", "avx512bw", "f16c")), Build("avx2", "int8_gemv_avx2", _AVX2)),
    "int4_cpu": (Build("avx512", "int4_cpu", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "avx512_vnni")),
                 Build("avx2", "int4_cpu_avx2", _AVX2)),
    "fp8_cpu": (Build("avx512", "fp8_cpu", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi")),
                Build("avx2", "fp8_cpu_avx2", _AVX2)),
    "int8_act": (Build("avx512", "int8_act", ("avx512f", "avx512bw", "avx512vl", "f16c"), _EXACT),
                 Build("avx2", "int8_act_avx2", _AVX2, _EXACT)),
    "int8_int4": (Build("avx512", "int8_int4", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
                  Build("avx2", "int8_int4_avx2", _AVX2)),
}
_GCC_FLAG = {"avx512_bf16": "avx512bf16", "avx512_vnni": "avx512vnni"}
# Kernel names (older callers list them from here, e.g. benchmarks/accuracy.py): use BUILDS.
_FEATURES = {name: builds[-1].features for name, builds in BUILDS.items()}

OK = "ok"
DISABLED = "disabled (LOWBIT_NO_EXT=1)"
ISA_ENV = "LOWBIT_ISA"

# name -> (module or None, status, isa or None). One lock: a build runs once even when threads race.
_LOADED: dict[str, tuple[object | None, str, str | None]] = {}
_LOCK = threading.RLock()
_PREFETCH_SET: set[str] = set()  # kernels whose weight-stream prefetch was set (csrc/prefetch.h)
# name -> isa of the build imported into this process (never reset: a second build of the same
# kernel would register the same dispatcher ops again, which torch refuses).
_IMPORTED: dict[str, str] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _check_name(name: str) -> None:
    if name not in BUILDS:
        raise ValueError(f"unknown C++ kernel source {name!r}; known: {sorted(BUILDS)}")


def forced_isa() -> str | None:
    """The build ``LOWBIT_ISA`` forces (``"avx512"`` or ``"avx2"``), or None for ``auto``/unset.

    Raises:
        ValueError: ``LOWBIT_ISA`` is set to anything else.
    """
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ISAS:
        raise ValueError(f"{ISA_ENV}={os.environ[ISA_ENV]!r} is not a known instruction set; use one of "
                         f"{', '.join(('auto',) + ISAS)} (or leave it unset)")
    return value


def needed_features(name: str, isa: str | None = None) -> tuple[str, ...]:
    """The CPU features (``/proc/cpuinfo`` names) the ``isa`` build of kernel ``name`` is compiled
    for; ``isa=None``: those of its last (most widely runnable) build.

    Raises:
        ValueError: unknown ``name`` or ``isa``.
    """
    _check_name(name)
    if isa is None:
        return BUILDS[name][-1].features
    for b in BUILDS[name]:
        if b.isa == isa:
            return b.features
    raise ValueError(f"kernel {name!r} has no {isa!r} build; it has {[b.isa for b in BUILDS[name]]}")


def _missing(build: Build, flags: str) -> list[str]:
    return [f for f in build.features if f" {f} " not in f"{flags} "]


def _choose(name: str, flags: str, honour_no_ext: bool = True) -> tuple[Build | None, str | None]:
    """The build to compile for ``name`` on this machine, or (None, why none can run)."""
    if honour_no_ext and os.environ.get("LOWBIT_NO_EXT") == "1":
        return None, DISABLED
    if platform.machine() != "x86_64":
        return None, f"not x86-64 ({platform.machine() or 'unknown machine'})"
    forced = forced_isa()
    candidates = [b for b in BUILDS[name] if forced is None or b.isa == forced]
    if not candidates:  # e.g. LOWBIT_ISA=avx512 for int8_int4, which has an AVX2 build only
        return None, f"no {forced} build (has: {', '.join(b.isa for b in BUILDS[name])}) [forced by {ISA_ENV}={forced}]"
    lacks = []
    for b in candidates:
        missing = _missing(b, flags)
        if not missing:
            return b, None
        lacks.append(f"{', '.join(missing)} ({b.isa})")
    why = f"cpu lacks {'; '.join(lacks)}"
    return None, why + (f" [forced by {ISA_ENV}={forced}]" if forced else "")


# Hidden visibility: each module keeps its own copy of the headers' inline functions and of their statics
# (exported, the dynamic linker binds every module's calls to the first loaded module's copy: one weight-stream
# prefetch setting for all of them, say, where each kernel has its own).
_COMMON_CFLAGS = ("-O3", "-fvisibility=hidden")


def _build(build: Build, flags: str):
    src = _CSRC / f"{build.source}.cpp"
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))
    extra = repr((_COMMON_CFLAGS, build.cflags)).encode()
    key = hashlib.sha256(src.read_bytes() + headers + extra + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    out = root / f"{build.source}-{key}"
    from torch.utils.cpp_extension import load as cpp_load

    out.mkdir(parents=True, exist_ok=True)
    return cpp_load(
        name=f"lowbit_{build.source}",
        sources=[str(src)],
        build_directory=str(out),
        extra_include_paths=[str(_CSRC)],
        extra_cflags=[*_COMMON_CFLAGS, *build.cflags] + [f"-m{_GCC_FLAG.get(f, f)}" for f in build.features],
        verbose=False,
    )


def _load_once(name: str) -> tuple[object | None, str, str | None]:
    flags = _cpu_flags()
    build, reason = _choose(name, flags)
    if build is not None:
        other = _IMPORTED.get(name)
        if other is not None and other != build.isa:
            reason = f"the {other} build of {name} is already loaded in this process ({build.isa} asked for)"
        else:
            try:
                module = _build(build, flags)
                _IMPORTED[name] = build.isa
                return module, f"{OK} ({build.isa})", build.isa
            except Exception as e:  # noqa: BLE001 - any build error becomes a recorded, warned status
                text = " ".join(str(e).split())
                reason = f"build failed ({build.isa}): {type(e).__name__}: {text[:2000]}"
    if reason == DISABLED:
        _log.info("lowbit C++ kernel %s disabled (LOWBIT_NO_EXT=1); using the PyTorch paths", name)
    elif reason.startswith("build failed"):
        msg = (f"lowbit C++ kernel {name} could not be built although this CPU has {', '.join(build.features)} "
               f"({reason}); its ops run the slower PyTorch paths")
        _log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        _log.warning("lowbit C++ kernel %s can't run here (%s); its ops run the PyTorch paths", name, reason)
    return None, reason, None


def load(name: str = "int8_gemv"):
    """The compiled extension for kernel ``name`` (its first build this CPU can run), or None when
    none can run here (see ``status``).

    Built (or loaded from the cache) on the first call in a process; later calls return the same
    result. Thread-safe.

    Raises:
        ValueError: ``name`` is not one of lowbit's C++ kernels, or ``LOWBIT_ISA`` is invalid.
    """
    module = built(name)
    if module is not None and name not in _PREFETCH_SET:
        with _LOCK:
            if name not in _PREFETCH_SET:
                setter = getattr(module, "set_prefetch", None)
                if setter is not None:
                    from lowbit.kernels import prefetch  # imports this module

                    hint, distance, _ = prefetch.choice(name)
                    setter(prefetch.HINTS[hint], distance)
                _PREFETCH_SET.add(name)
    return module


def built(name: str):
    """``load`` without applying the weight-stream prefetch setting (``lowbit.kernels.prefetch``
    measures its candidates on the module this returns)."""
    hit = _LOADED.get(name)
    if hit is None:
        _check_name(name)
        with _LOCK:
            hit = _LOADED.get(name)
            if hit is None:
                hit = _LOADED[name] = _load_once(name)
    return hit[0]


def status() -> dict[str, str]:
    """``{name: reason}`` for every C++ kernel (loading each one first): ``"ok (avx512)"``,
    ``"ok (avx2)"``, ``"disabled (LOWBIT_NO_EXT=1)"``, ``"not x86-64 (...)"``,
    ``"cpu lacks <features> (<isa>); ..."`` or ``"build failed (<isa>): <error>"``."""
    for name in BUILDS:
        load(name)
    return {name: _LOADED[name][1] for name in BUILDS}


def active_isa(name: str) -> str | None:
    """The instruction set of the loaded build of kernel ``name`` (``"avx512"``, ``"avx2"``), or None
    when none runs here (loading it first).

    Raises:
        ValueError: unknown ``name``.
    """
    load(name)
    return _LOADED[name][2]


def fitting_isa(name: str) -> str | None:
    """The instruction set of the build of kernel ``name`` this CPU runs (``LOWBIT_ISA`` honoured), whether or not
    it is built, loads or is disabled by ``LOWBIT_NO_EXT``; None on a CPU no build fits. For choices made while a
    graph is traced that must not depend on whether the extension loaded: torch.compile's on-disk caches key a
    graph without them, so a graph traced with the extension can be served to a run without it (the ops' bodies
    then compute the reference).

    Raises:
        ValueError: unknown ``name``, or ``LOWBIT_ISA`` is invalid.
    """
    _check_name(name)
    build, _ = _choose(name, _cpu_flags(), honour_no_ext=False)
    return None if build is None else build.isa


def kernel_report() -> list[str]:
    """One line per C++ kernel for ``lowbit info --kernels``: its name, its status, and the builds it
    has with the CPU features each needs, e.g.
    ``int4_cpu: ok (avx2) [builds: avx512 (avx512f, ...), avx2 (avx2, fma, f16c)]``; then the
    weight-stream prefetch settings (``prefetch.report``: the int8 GEMV's, which the kernels not measured
    on their own take, then each other measured kernel's) of the GEMVs loaded, and a last
    line naming ``LOWBIT_ISA`` when it forces a build. Loads every kernel first."""
    st = status()
    lines = []
    for name in BUILDS:
        builds = ", ".join(f"{b.isa} ({', '.join(b.features)})" for b in BUILDS[name])
        lines.append(f"{name}: {st[name]} [builds: {builds}]")
    from lowbit.kernels import prefetch

    lines += [f"{what}: {setting}" for what, setting in prefetch.report()]
    forced = forced_isa()
    if forced:
        lines.append(f"{ISA_ENV}={forced} forces the {forced} builds")
    return lines
