"""KernelPreference: which implementation a quantized op runs; and the checks every route shares."""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["KernelPreference", "wants_grad", "check_static_act_scale", "static_act_scale_value"]


class KernelPreference(str, Enum):
    """``AUTO`` picks the fastest implementation for the device and shape; ``REFERENCE`` forces
    the pure-PyTorch reference (dequantize, then the float op), for debugging and tests."""

    AUTO = "auto"
    REFERENCE = "reference"


def wants_grad(x: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether autograd will record a call on ``x`` (and ``bias``): the routes into ops without an autograd
    kernel (the C++ decode GEMVs as dispatcher ops, the fused CPU entries) are taken only when it will not."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def check_static_act_scale(act_scale: torch.Tensor | None) -> None:
    """Refuse a static activation scale on the CPU that is not a positive finite number: a re-calibration or an
    in-place edit can leave one at 0, negative or NaN, and the PyTorch paths would then quantize every activation
    to a clamp bound and return (nearly) the bias, silently; the C++ kernels refused it already, now every route
    does, with one message. Not checked while torch.compile traces (reading the value would break the graph) nor
    on other devices (it would wait for the device).

    Raises:
        ValueError: naming ``act_scale`` and its value.
    """
    if act_scale is None or act_scale.device.type != "cpu" or torch.compiler.is_compiling():
        return
    static_act_scale_value(act_scale)


def static_act_scale_value(act_scale: torch.Tensor) -> float:
    """A one-element static activation scale's value, for a kernel that takes it as a number.

    Raises:
        ValueError: naming ``act_scale`` unless it is a positive finite float.
    """
    a = float(act_scale.reshape(-1)[0])
    if not 0.0 < a < float("inf"):
        raise ValueError(f"act_scale={a!r}: a static activation scale must be a positive finite float")
    return a


def check_kernel(kernel: str) -> str:
    allowed = [k.value for k in KernelPreference]
    if kernel not in allowed:
        raise ValueError(f"kernel={kernel!r}; allowed: {allowed}")
    return kernel
