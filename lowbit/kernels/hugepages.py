"""Large CPU weight buffers on transparent huge pages (Linux).

A decode GEMV streams every weight byte from DRAM once per token. On 4 KiB pages the CPU's hardware
prefetchers stop at every page boundary and each page costs a TLB entry; on 2 MiB pages they run on. On
the 2-core Zen 4 guest (session 26), int4's bf16 GEMV at M = 1 on 8 x 4096^2 took 0.84x the time on the
same bytes collapsed into huge pages (benchmarks/results/avx512_zen4/scratch/hugepages_session26.txt).
Linux gives anonymous memory huge pages only where a range is advised (``enabled`` is ``madvise`` on most
distributions, as here), and PyTorch's CPU allocator advises nothing unless ``THP_MEM_ALLOC_ENABLE=1`` is
set before its first allocation.

:func:`advise` takes a tensor's memory where it lies: the whole 2 MiB pages inside it are advised
``MADV_HUGEPAGE`` and collapsed now with ``MADV_COLLAPSE`` (Linux 6.1+; on older kernels khugepaged
collapses them later, in the background). Nothing is copied or moved: the tensor, its strides and what
is saved are unchanged, and a tensor smaller than two huge pages (whose interior may hold none) is left
as it is. ``quantize_`` and ``lowbit.formats.from_pretrained`` / ``lowbit.pretrained.from_pretrained`` advise the
weights they make on CPU (:func:`advise_model`), and the kernels' decode plans advise a weight's tensors when the
plan is made (its first eager call on CPU: weights made any other way). ``LOWBIT_HUGEPAGES=0`` switches it
off; where the call is refused (another OS, a kernel without THP, a file mapping) nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import torch

__all__ = ["advise", "advise_all", "advise_model", "advised", "advise_quantized", "enabled", "HUGE_PAGE", "MIN_BYTES", "ENV"]

ENV = "LOWBIT_HUGEPAGES"
HUGE_PAGE = 2 << 20  # x86-64's PMD-sized transparent huge page
MIN_BYTES = 2 * HUGE_PAGE  # below this a buffer may hold no whole huge page
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether :func:`advise` acts here: Linux, and ``LOWBIT_HUGEPAGES`` is not ``0``."""
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1") != "0" and _madvise() is not None


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise(t: torch.Tensor) -> int:
    """Put the whole huge pages inside ``t``'s memory on huge pages; returns the bytes advised (0: none).

    Only plain CPU tensors of at least ``MIN_BYTES`` whose elements are one block of memory; the rest of
    the process is untouched. Safe to call again (pages already huge are left as they are)."""
    if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor or t.device.type != "cpu" or not enabled():
        return 0
    if not t.is_contiguous():
        return 0
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES:
        return 0
    start = t.data_ptr()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi - lo < HUGE_PAGE:
        return 0
    fn = _madvise()
    if fn(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        return 0
    if fn(lo, hi - lo, _MADV_COLLAPSE) != 0:  # older kernel, no free huge page: khugepaged later, or never
        _collapse_refused(ctypes.get_errno())
    return hi - lo


@functools.cache
def _collapse_refused(errno: int) -> None:
    """Said once per reason (INFO on this module's logger): the pages stay advised but small for now."""
    _log.info("MADV_COLLAPSE refused (%s): weights are advised onto huge pages, collapsed later by khugepaged if at "
              "all (%s=0 switches advising off)", os.strerror(errno), ENV)


def advise_all(tensors) -> int:
    """:func:`advise` over ``tensors`` (None entries skipped); the bytes advised."""
    return sum(advise(t) for t in tensors if t is not None)


def advised(t: torch.Tensor) -> bool:
    """Whether the first whole huge page inside ``t``'s memory lies in a mapping advised ``MADV_HUGEPAGE`` (its
    ``hg`` flag in ``/proc/self/smaps``); False where there is none or no such file."""
    page = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    if page + HUGE_PAGE > t.data_ptr() + t.numel() * t.element_size():
        return False
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= page < hi
                elif inside and head == "VmFlags:":
                    return "hg" in line.split()[1:]
    except OSError:
        pass
    return False


def advise_model(model) -> int:
    """:func:`advise_quantized` over a module's quantized CPU parameters (``quantize_`` and the checkpoint loaders
    call it on what they make); the bytes advised."""
    return sum(advise_quantized(p) for p in model.parameters() if p.device.type == "cpu")


def advise_quantized(t) -> int:
    """:func:`advise` over a quantized tensor's data fields (``tensor_data_names`` and the optional ones); 0 for
    anything else."""
    names = (*getattr(type(t), "tensor_data_names", ()), *getattr(type(t), "optional_tensor_data_names", ()))
    return advise_all(getattr(t, name, None) for name in names)
