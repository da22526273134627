"""Quantized tensor subclasses."""

from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["QuantizedTensor", "Int8Tensor"]
