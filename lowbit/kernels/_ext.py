"""Lazily built C++ kernels (torch.utils.cpp_extension), cached per source, torch and CPU.

Each ``csrc/<name>.cpp`` is its own extension module (``lowbit_<name>``). ``load(name)`` returns
it, or None when it can't run here; callers then use the pure-PyTorch path. ``status()`` says
why for each one: ``"ok"``, ``"disabled (LOWBIT_NO_EXT=1)"``, ``"not x86-64 (<machine>)"``,
``"cpu lacks <features>"`` or ``"build failed: <error>"``. The first time a kernel can't run in a
process, a warning names it and the reason (a build failure also as a ``RuntimeWarning``: the
CPU could run it, so this is a broken install, not a missing feature). Each build happens once
per machine (about 20 s) into ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``; set ``LOWBIT_NO_EXT=1``
to skip them all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["load", "status", "needed_features", "OK", "DISABLED"]

_log = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
# CPU features each source is compiled for (gcc -m<flag>, /proc/cpuinfo names).
_FEATURES = {
    "int8_gemv": ("avx512f", "avx512bw"),
    "int4_cpu": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "avx512_vnni"),
    "fp8_cpu": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi"),
    "int8_act": ("avx512f", "avx512bw", "avx512vl", "f16c"),
}
# Extra compiler flags per source: int8_act must repeat the primitives' float32 ops exactly, so
# gcc may not fuse a multiply and an add into an FMA (its default -ffp-contract=fast would).
_CFLAGS = {"int8_act": ("-ffp-contract=off",)}
_GCC_FLAG = {"avx512_bf16": "avx512bf16", "avx512_vnni": "avx512vnni"}

OK = "ok"
DISABLED = "disabled (LOWBIT_NO_EXT=1)"

# name -> (module or None, status). One lock: a build runs once even when threads race to it.
_LOADED: dict[str, tuple[object | None, str]] = {}
_LOCK = threading.RLock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _check_name(name: str) -> None:
    if name not in _FEATURES:
        raise ValueError(f"unknown C++ kernel source {name!r}; known: {sorted(_FEATURES)}")


def needed_features(name: str) -> tuple[str, ...]:
    """The CPU features (``/proc/cpuinfo`` names) the kernel ``name`` is compiled for."""
    _check_name(name)
    return _FEATURES[name]


def _unavailable_reason(name: str, flags: str) -> str | None:
    """Why ``name`` can't be built on this machine before trying, or None when it should build."""
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        return DISABLED
    if platform.machine() != "x86_64":
        return f"not x86-64 ({platform.machine() or 'unknown machine'})"
    missing = [f for f in _FEATURES[name] if f" {f} " not in f"{flags} "]
    if missing:
        return f"cpu lacks {', '.join(missing)}"
    return None


def _build(name: str, flags: str):
    src = _CSRC / f"{name}.cpp"
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))
    extra = repr(_CFLAGS.get(name, ())).encode()
    key = hashlib.sha256(src.read_bytes() + headers + extra + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    build = root / f"{name}-{key}"
    from torch.utils.cpp_extension import load as cpp_load

    build.mkdir(parents=True, exist_ok=True)
    return cpp_load(
        name=f"lowbit_{name}",
        sources=[str(src)],
        build_directory=str(build),
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3", *_CFLAGS.get(name, ())] + [f"-m{_GCC_FLAG.get(f, f)}" for f in _FEATURES[name]],
        verbose=False,
    )


def _load_once(name: str) -> tuple[object | None, str]:
    flags = _cpu_flags()
    reason = _unavailable_reason(name, flags)
    if reason is None:
        try:
            return _build(name, flags), OK
        except Exception as e:  # noqa: BLE001 - any build error becomes a recorded, warned status
            text = " ".join(str(e).split())
            reason = f"build failed: {type(e).__name__}: {text[:2000]}"
    if reason == DISABLED:
        _log.info("lowbit C++ kernel %s disabled (LOWBIT_NO_EXT=1); using the PyTorch paths", name)
    elif reason.startswith("build failed"):
        msg = (f"lowbit C++ kernel {name} could not be built although this CPU has {', '.join(_FEATURES[name])} "
               f"({reason}); its ops run the slower PyTorch paths")
        _log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        _log.warning("lowbit C++ kernel %s can't run here (%s); its ops run the PyTorch paths", name, reason)
    return None, reason


def load(name: str = "int8_gemv"):
    """The compiled extension ``csrc/<name>.cpp``, or None when it can't run here (see ``status``).

    Built (or loaded from the cache) on the first call in a process; later calls return the same
    result. Thread-safe.

    Raises:
        ValueError: ``name`` is not one of lowbit's C++ kernels.
    """
    hit = _LOADED.get(name)
    if hit is None:
        _check_name(name)
        with _LOCK:
            hit = _LOADED.get(name)
            if hit is None:
                hit = _LOADED[name] = _load_once(name)
    return hit[0]


def status() -> dict[str, str]:
    """``{name: reason}`` for every C++ kernel (loading each one first): ``"ok"``,
    ``"disabled (LOWBIT_NO_EXT=1)"``, ``"not x86-64 (...)"``, ``"cpu lacks <features>"`` or
    ``"build failed: <error>"``."""
    for name in _FEATURES:
        load(name)
    return {name: _LOADED[name][1] for name in _FEATURES}
