"""Lazily built C++ kernels (torch.utils.cpp_extension), cached per source, torch and CPU.

``load()`` returns the extension module or None when it can't be built here (no compiler, no
ninja, not x86 with AVX-512): callers then use the pure-PyTorch path. The build happens once per
machine (about 20 s) into ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``; set ``LOWBIT_NO_EXT=1`` to
skip it entirely.
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
_SRC = Path(__file__).parent / "csrc" / "int8_gemv.cpp"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def load():
    """The compiled extension, or None (logged once) when it can't be built or loaded."""
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        return None
    flags = _cpu_flags()
    if platform.machine() != "x86_64" or " avx512f " not in f"{flags} ":
        _log.info("lowbit C++ kernels need x86-64 with AVX-512; using the PyTorch paths")
        return None
    key = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    build = root / f"ext-{key}"
    try:
        from torch.utils.cpp_extension import load as cpp_load

        build.mkdir(parents=True, exist_ok=True)
        return cpp_load(
            name="lowbit_cpu_kernels",
            sources=[str(_SRC)],
            build_directory=str(build),
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja must not break quantization
        _log.warning("lowbit C++ kernels could not be built (%s); using the PyTorch paths", e)
        return None
