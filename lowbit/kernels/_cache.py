"""What the kernels keep between calls: values derived from a weight's tensors (thread-safe).
(lowbit's dispatcher ops, ``lowbit_cpu::``, are defined in ``_cpu_ops`` in every process.)

``DerivedCache`` serves a derived value only while every tensor it was derived from is the same
object, at the same address, with the same version counter: an in-place edit of any source
(``copy_``, ``load_state_dict``, an optimizer step) makes the next call recompute it. Inference
tensors (made under ``torch.inference_mode()``) have no version counter, so nothing derived from
them is cached: it is recomputed on each call.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["DerivedCache", "cached_bytes"]

_CACHES: "weakref.WeakSet[DerivedCache]" = weakref.WeakSet()


def _stamp(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride())


class DerivedCache:
    """Values derived from tensors, weakly keyed on the first source, recomputed when any source
    changed (see the module docstring).

    Example::

        _CORR = DerivedCache()
        corr = _CORR.get((zero_point, scale), "corr", lambda: (zero_point.round() - zero_point) * scale)
    """

    def __init__(self) -> None:
        self._entries = WeakTensorKeyDictionary()
        self._lock = threading.Lock()
        _CACHES.add(self)

    def get(self, sources: tuple[torch.Tensor, ...], tag, make: Callable[[], object]):
        """``make()``, cached for ``sources`` and ``tag`` (a hashable naming the variant)."""
        if torch.compiler.is_compiling() or any(t.is_inference() for t in sources):
            return make()
        stamp = (tag, tuple(_stamp(t) for t in sources))
        with self._lock:
            hit = self._entries.get(sources[0])
        if hit is not None and hit[0] == stamp and all(r() is t for r, t in zip(hit[1], sources[1:])):
            return hit[2]
        value = make()
        entry = (stamp, tuple(weakref.ref(t) for t in sources[1:]), value)
        with self._lock:
            self._entries[sources[0]] = entry
        return value

    def values(self) -> list:
        """The cached values (for memory accounting)."""
        with self._lock:
            return [entry[2] for entry in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def cached_bytes() -> int:
    """Bytes of the tensor storages held by every live ``DerivedCache`` (each storage once)."""
    seen, total = set(), 0
    for cache in list(_CACHES):
        for value in cache.values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
    return total
