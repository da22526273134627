"""Quantized softmax: attention probabilities on a fixed grid, no observer needed.

Softmax outputs lie in ``[0, 1]``, so their scale is known before any data: int8 uses the
unsigned 8-bit grid (``scale = 1/255``, zero point 0, ``q = clamp(round(p * 255), 0, 255)``);
float8 uses the scale that maps 1.0 to the format's largest value (``1/448`` for e4m3fn,
``1/57344`` for e5m2). The output is the dequantized value (``fake quantization``) in the input
dtype, what a kernel consuming the 8-bit probabilities computes with.

The scale is a buffer made once when the module is converted, on the device of the model's
parameters, shaped for 4-D attention scores ``(B, H, Tq, Tk)``; it moves with ``model.to()``.
Nothing is recorded during calibration, so a model converted without calibration data still
quantizes its softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.granularity import PerTensor
from lowbit.primitives.affine import fake_quantize_affine
from lowbit.primitives.float8 import fake_quantize_float8
from lowbit.spec import QuantSpec

__all__ = ["QuantizedSoftmax", "softmax_spec", "quantize_softmax_module"]

_RANK = 4  # attention scores (B, H, Tq, Tk): the shape the scale buffer is made in


def softmax_spec(dtype: str) -> tuple[QuantSpec, float]:
    """The fixed ``(spec, scale)`` for softmax outputs quantized to ``dtype``.

    Args:
        dtype: ``"int8"`` (stored as the uint8 grid), ``"float8_e4m3fn"`` or ``"float8_e5m2"``.

    Raises:
        ValueError: another dtype.
    """
    if dtype == "int8":
        return QuantSpec("uint8", PerTensor(), symmetric=False), 1.0 / 255.0
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        spec = QuantSpec(dtype, PerTensor())
        return spec, 1.0 / spec.qmax
    raise ValueError(f"softmax dtype={dtype!r}; allowed: 'int8', 'float8_e4m3fn', 'float8_e5m2'")


class QuantizedSoftmax(nn.Softmax):
    """``nn.Softmax`` whose output is quantized on the fixed grid of ``softmax_spec(dtype)``.

    Made from an ``nn.Softmax`` in place by ``quantize_softmax_module`` (the object stays, so
    parents keep their reference). Buffers: ``scale`` float32 and, for int8, ``zero_point``
    int32, both shaped ``(1, 1, 1, 1)``.
    """

    qdtype: str

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        p = F.softmax(input, self.dim)
        spec, _ = softmax_spec(self.qdtype)
        scale = self.scale if p.dim() == _RANK else self.scale.reshape([1] * p.dim())
        if spec.dtype.is_float:
            return fake_quantize_float8(p, spec, scale)
        zero_point = self.zero_point if p.dim() == _RANK else self.zero_point.reshape([1] * p.dim())
        return fake_quantize_affine(p, spec, scale, zero_point)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would round the float32 scale (1/255 in bf16 is another grid):
        # keep the device change, restore the exact float32 value.
        super()._apply(fn, recurse)
        _, scale = softmax_spec(self.qdtype)
        if self.scale.dtype != torch.float32:
            self.scale = torch.full_like(self.scale, scale, dtype=torch.float32)
        if getattr(self, "zero_point", None) is not None and self.zero_point.dtype != torch.int32:
            self.zero_point = self.zero_point.to(torch.int32)
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}, quant={self.qdtype}"


def quantize_softmax_module(module: nn.Softmax, dtype: str, device: torch.device | str = "cpu") -> QuantizedSoftmax:
    """Turn ``module`` (exactly ``nn.Softmax``) into a ``QuantizedSoftmax`` in place and return it.

    Raises:
        TypeError: another module class. ValueError: an unknown ``dtype``; ``dim=None``.
    """
    if type(module) is not nn.Softmax:
        raise TypeError(f"quantize_softmax_module takes an nn.Softmax, got {type(module).__name__}")
    if module.dim is None:
        raise ValueError("nn.Softmax(dim=None) picks its dim from the input rank; give it an explicit dim")
    _, scale = softmax_spec(dtype)
    module.__class__ = QuantizedSoftmax
    module.qdtype = dtype
    module.register_buffer("scale", torch.full((1,) * _RANK, scale, dtype=torch.float32, device=device))
    if dtype == "int8":
        module.register_buffer("zero_point", torch.zeros((1,) * _RANK, dtype=torch.int32, device=device))
    return module
