"""Quantized tensor subclasses."""

from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["QuantizedTensor", "Int8Tensor", "Int4Tensor", "Float8Tensor"]
