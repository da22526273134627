"""Quantized matmul ops (torch.library custom ops) with reference and fast implementations."""

# first: the lowbit_cpu:: dispatcher ops exist in every process, extension or not (see its docstring)
from lowbit.kernels import _cpu_ops  # noqa: F401
from lowbit.kernels.int8 import int8_weight_only_linear
from lowbit.kernels.w8a8 import int8_activation_linear
from lowbit.kernels.preference import KernelPreference

__all__ = ["KernelPreference", "int8_weight_only_linear", "int8_activation_linear"]
