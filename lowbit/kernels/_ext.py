"""Lazily built C++ kernels (torch.utils.cpp_extension), cached per source, torch and CPU.

Each ``csrc/<name>.cpp`` is its own extension module (``lowbit_<name>``). ``load(name)`` returns
it, or None when it can't be built here (no compiler, no ninja, not x86, a CPU feature the
source needs is missing): callers then use the pure-PyTorch path. Each build happens once per
machine (about 20 s) into ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``; set ``LOWBIT_NO_EXT=1`` to
skip them all.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

__all__ = ["load"]

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


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def load(name: str = "int8_gemv"):
    """The compiled extension ``csrc/<name>.cpp``, or None (logged once) when it can't be built."""
    if name not in _FEATURES:
        raise ValueError(f"unknown C++ kernel source {name!r}; known: {sorted(_FEATURES)}")
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        return None
    flags = _cpu_flags()
    missing = [f for f in _FEATURES[name] if f" {f} " not in f"{flags} "]
    if platform.machine() != "x86_64" or missing:
        _log.info("lowbit C++ kernel %s needs x86-64 with %s (missing %s); using the PyTorch paths",
                  name, ", ".join(_FEATURES[name]), ", ".join(missing) or "x86-64")
        return None
    src = _CSRC / f"{name}.cpp"
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))
    extra = repr(_CFLAGS.get(name, ())).encode()
    key = hashlib.sha256(src.read_bytes() + headers + extra + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    build = root / f"{name}-{key}"
    try:
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
    except Exception as e:  # a missing compiler or ninja must not break quantization
        _log.warning("lowbit C++ kernels could not be built (%s); using the PyTorch paths", e)
        return None
