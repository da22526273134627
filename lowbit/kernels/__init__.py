"""Quantized matmul ops (torch.library custom ops) with reference and fast implementations."""

from lowbit.kernels.int8 import int8_activation_linear, int8_weight_only_linear
from lowbit.kernels.preference import KernelPreference

__all__ = ["KernelPreference", "int8_weight_only_linear", "int8_activation_linear"]
