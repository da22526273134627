"""Int8 configs: weight-only, dynamic int8 activations, static int8 activations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.configs.base import QuantConfig, check_act_scale_field, check_kernel_field, float_weight, register_handler, swap_weight
from lowbit.granularity import Granularity, PerGroup, PerRow, PerTensor, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.spec import QuantSpec
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Int8StaticActivationInt8WeightConfig"]


def _check_granularity(granularity, allowed: tuple[type, ...], config: str) -> None:
    if not isinstance(granularity, allowed):
        names = ", ".join(f"{c.__name__}()" if c is not PerGroup else "PerGroup(g)" for c in allowed)
        raise ValueError(f"{config}(granularity={granularity!r}) is not supported; allowed: {names}")


@dataclass(frozen=True, repr=False)
class Int8WeightOnlyConfig(QuantConfig):
    """Int8 symmetric weights, float activations.

    Args:
        granularity: ``PerRow()`` (default), ``PerGroup(g)`` or ``PerTensor()``.
        kernel: ``KernelPreference``.
    """

    granularity: Granularity = field(default_factory=PerRow)
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check_granularity(self.granularity, (PerRow, PerGroup, PerTensor), type(self).__name__)
        check_kernel_field(self)


@dataclass(frozen=True, repr=False)
class Int8DynamicActivationInt8WeightConfig(QuantConfig):
    """Int8 weights, activations quantized to int8 per token at run time (scales in float32).

    Args:
        act_symmetric: symmetric activations, or asymmetric with the zero point corrected
            exactly (``zp_x * s_x * s_w * rowsum(W)``).
        granularity: weight granularity, ``PerRow()`` (default) or ``PerTensor()``.
        kernel: ``KernelPreference``.
    """

    act_symmetric: bool = True
    granularity: Granularity = field(default_factory=PerRow)
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check_granularity(self.granularity, (PerRow, PerTensor), type(self).__name__)
        check_kernel_field(self)
        if not isinstance(self.act_symmetric, bool):
            raise ValueError(f"act_symmetric={self.act_symmetric!r} must be a bool")


@dataclass(frozen=True, repr=False)
class Int8StaticActivationInt8WeightConfig(QuantConfig):
    """Int8 weights, activations quantized with a fixed per-tensor scale (from calibration).

    Args:
        act_scale: the activation scale, a positive finite float.
        act_zero_point: None (symmetric) or an int in [-128, 127] (asymmetric).
        granularity: weight granularity, ``PerRow()`` (default) or ``PerTensor()``.
        kernel: ``KernelPreference``.
    """

    act_scale: float
    act_zero_point: int | None = None
    granularity: Granularity = field(default_factory=PerRow)
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        name = type(self).__name__
        check_act_scale_field(self)
        if isinstance(self.act_zero_point, torch.Tensor):
            object.__setattr__(self, "act_zero_point", int(self.act_zero_point))
        zp = self.act_zero_point
        if zp is not None and (not isinstance(zp, int) or not -128 <= zp <= 127):
            raise ValueError(f"{name}(act_zero_point={zp!r}) must be None or an int in [-128, 127]")
        _check_granularity(self.granularity, (PerRow, PerTensor), name)
        check_kernel_field(self)


def _weight_spec(granularity: Granularity) -> QuantSpec:
    return QuantSpec("int8", granularity)


@register_handler(Int8WeightOnlyConfig)
def _(module: nn.Module, config: Int8WeightOnlyConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    swap_weight(module, Int8Tensor.from_float(w, _weight_spec(config.granularity), kernel=config.kernel), config)


@register_handler(Int8DynamicActivationInt8WeightConfig)
def _(module: nn.Module, config: Int8DynamicActivationInt8WeightConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    act = QuantSpec("int8", PerToken(), symmetric=config.act_symmetric)
    q = Int8Tensor.from_float(w, _weight_spec(config.granularity), act_spec=act, kernel=config.kernel)
    swap_weight(module, q, config)


@register_handler(Int8StaticActivationInt8WeightConfig)
def _(module: nn.Module, config: Int8StaticActivationInt8WeightConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    act = QuantSpec("int8", PerTensor(), symmetric=config.act_zero_point is None)
    zp = None if config.act_zero_point is None else torch.tensor(config.act_zero_point)
    q = Int8Tensor.from_float(
        w, _weight_spec(config.granularity), act_spec=act, act_scale=torch.tensor(config.act_scale),
        act_zero_point=zp, kernel=config.kernel,
    )
    swap_weight(module, q, config)
