"""KernelPreference: which implementation a quantized op runs."""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["KernelPreference", "wants_grad"]


class KernelPreference(str, Enum):
    """``AUTO`` picks the fastest implementation for the device and shape; ``REFERENCE`` forces
    the pure-PyTorch reference (dequantize, then the float op), for debugging and tests."""

    AUTO = "auto"
    REFERENCE = "reference"


def wants_grad(x: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether autograd will record a call on ``x`` (and ``bias``): the routes into ops without an autograd
    kernel (the C++ decode GEMVs as dispatcher ops, the fused CPU entries) are taken only when it will not."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def check_kernel(kernel: str) -> str:
    allowed = [k.value for k in KernelPreference]
    if kernel not in allowed:
        raise ValueError(f"kernel={kernel!r}; allowed: {allowed}")
    return kernel
