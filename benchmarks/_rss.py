"""Peak resident memory (RSS) of this process while a block of code runs, in MB (Linux only).

Used by ``algorithms.py`` in-process and by ``llmc_driver.py`` inside llm-compressor's own venv,
so it needs nothing but the standard library. The peak is the kernel's own high-water mark
(``VmHWM``), reset at the start by writing ``5`` to ``/proc/self/clear_refs``; where that file
can't be written, a thread samples ``VmRSS`` every 2 ms instead (and may miss short spikes).
Before the start, garbage is collected and glibc's free heap is handed back (``malloc_trim``) so
that memory freed by earlier work is not reused unseen: the growth is then what the block needed.
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.start_mb``, ``m.peak_mb`` and ``m.growth_mb``
    (peak minus the RSS at the start) and ``m.how`` (``"VmHWM"`` or ``"sampled"``)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM"
        except OSError:
            self.how = "sampled"
        self._start = _status_kb("VmRSS")
        self._peak = self._start
        self._stop = threading.Event()
        if self.how == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.how == "sampled":
            self._thread.join()
            self._peak = max(self._peak, _status_kb("VmRSS"))
        else:
            self._peak = _status_kb("VmHWM")

    @property
    def start_mb(self) -> float:
        return self._start / 1024

    @property
    def peak_mb(self) -> float:
        return self._peak / 1024

    @property
    def growth_mb(self) -> float:
        return (self._peak - self._start) / 1024
