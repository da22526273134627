"""KernelPreference: which implementation a quantized op runs."""

from __future__ import annotations

from enum import Enum

__all__ = ["KernelPreference"]


class KernelPreference(str, Enum):
    """``AUTO`` picks the fastest implementation for the device and shape; ``REFERENCE`` forces
    the pure-PyTorch reference (dequantize, then the float op), for debugging and tests."""

    AUTO = "auto"
    REFERENCE = "reference"


def check_kernel(kernel: str) -> str:
    allowed = [k.value for k in KernelPreference]
    if kernel not in allowed:
        raise ValueError(f"kernel={kernel!r}; allowed: {allowed}")
    return kernel
