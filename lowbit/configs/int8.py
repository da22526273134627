"""Int8 configs: weight-only, dynamic int8 activations, static int8 activations."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.configs.base import (
    QuantConfig,
    check_act_scale_field,
    check_kernel_field,
    check_qparams_field,
    fit_group,
    float_weight,
    register_handler,
    swap_weight,
)
from lowbit.granularity import Granularity, PerGroup, PerRow, PerTensor, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.spec import QuantSpec
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = [
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8StaticActivationInt8WeightConfig",
    "int8_static_act_spec",
]


class _Int8Weights:
    """The int8 weight scheme the three int8 configs share."""

    def weight_spec(self) -> QuantSpec:
        """Symmetric int8 (``scale = amax / 127``, no zero point) per block of ``granularity``."""
        return QuantSpec("int8", self.granularity)

    @property
    def scale_rule(self) -> str:
        """How ``Int8Tensor.from_float`` chooses the weight's scales: ``qparams`` ("minmax" or "hqq")."""
        return self.qparams


def int8_static_act_spec(symmetric: bool) -> QuantSpec:
    """Static int8 activations: one fixed scale per tensor (and a zero point when asymmetric); the
    spec ``Int8StaticActivationInt8WeightConfig`` states and calibration observes with."""
    return QuantSpec("int8", PerTensor(), symmetric=symmetric)

# Int8WeightOnlyConfig(PerGroup(g)) falls back to halved groups no smaller than this (a float32 scale
# per 16 int8 values is already 1.25 bytes per weight)
MIN_FALLBACK_GROUP = 16


def _check_granularity(granularity, allowed: tuple[type, ...], config: str) -> None:
    if not isinstance(granularity, allowed):
        names = ", ".join(f"{c.__name__}()" if c is not PerGroup else "PerGroup(g)" for c in allowed)
        raise ValueError(f"{config}(granularity={granularity!r}) is not supported; allowed: {names}")


@dataclass(frozen=True, repr=False)
class Int8WeightOnlyConfig(_Int8Weights, QuantConfig):
    """Int8 symmetric weights, float activations.

    Args:
        granularity: ``PerRow()`` (default), ``PerGroup(g)`` or ``PerTensor()``.
        kernel: ``KernelPreference``.
        qparams: how the weight's scales are chosen: "minmax" (default, ``amax / 127`` per
            block) or "hqq" (HQQ's solver fits each block's scale, ``lowbit.primitives.hqq``; no
            calibration data). Any other value: ValueError.
    """

    granularity: Granularity = field(default_factory=PerRow)
    kernel: KernelPreference = KernelPreference.AUTO
    qparams: str = "minmax"

    def __post_init__(self):
        _check_granularity(self.granularity, (PerRow, PerGroup, PerTensor), type(self).__name__)
        check_kernel_field(self)
        check_qparams_field(self)

    def for_weight(self, shape):
        """``PerGroup(g)`` where ``g`` does not divide in_features: the largest of g/2, g/4, ... (down
        to ``MIN_FALLBACK_GROUP``) that does (see ``QuantConfig.for_weight``); other granularities fit any shape."""
        g = self.granularity
        if not isinstance(g, PerGroup):
            return self
        smaller = [g.group_size >> i for i in range(1, g.group_size.bit_length())
                   if g.group_size % (1 << i) == 0 and g.group_size >> i >= MIN_FALLBACK_GROUP]
        return fit_group(self, shape, "PerGroup group_size", g.group_size, smaller,
                         lambda n: replace(self, granularity=PerGroup(n)))


@dataclass(frozen=True, repr=False)
class Int8DynamicActivationInt8WeightConfig(_Int8Weights, QuantConfig):
    """Int8 weights, activations quantized to int8 per token at run time (scales in float32).

    Args:
        act_symmetric: symmetric activations, or asymmetric with the zero point corrected
            exactly (``zp_x * s_x * s_w * rowsum(W)``).
        granularity: weight granularity, ``PerRow()`` (default) or ``PerTensor()``.
        kernel: ``KernelPreference``.
        qparams: how the weight's scales are chosen: "minmax" (default, ``amax / 127`` per
            block) or "hqq" (HQQ's solver fits each block's scale, ``lowbit.primitives.hqq``; no
            calibration data). Any other value: ValueError.
    """

    act_symmetric: bool = True
    granularity: Granularity = field(default_factory=PerRow)
    kernel: KernelPreference = KernelPreference.AUTO
    qparams: str = "minmax"

    def __post_init__(self):
        _check_granularity(self.granularity, (PerRow, PerTensor), type(self).__name__)
        check_kernel_field(self)
        check_qparams_field(self)
        if not isinstance(self.act_symmetric, bool):
            raise ValueError(f"act_symmetric={self.act_symmetric!r} must be a bool")

    def act_spec(self) -> QuantSpec:
        """Int8 per token, chosen at run time; symmetric, or asymmetric with an int32 zero point."""
        return QuantSpec("int8", PerToken(), symmetric=self.act_symmetric)


@dataclass(frozen=True, repr=False)
class Int8StaticActivationInt8WeightConfig(_Int8Weights, QuantConfig):
    """Int8 weights, activations quantized with a fixed per-tensor scale (from calibration).

    Args:
        act_scale: the activation scale, a positive finite float.
        act_zero_point: None (symmetric) or an int in [-128, 127] (asymmetric).
        granularity: weight granularity, ``PerRow()`` (default) or ``PerTensor()``.
        kernel: ``KernelPreference``.
        qparams: how the weight's scales are chosen: "minmax" (default, ``amax / 127`` per
            block) or "hqq" (HQQ's solver fits each block's scale, ``lowbit.primitives.hqq``; no
            calibration data). Any other value: ValueError.
    """

    act_scale: float
    act_zero_point: int | None = None
    granularity: Granularity = field(default_factory=PerRow)
    kernel: KernelPreference = KernelPreference.AUTO
    qparams: str = "minmax"

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
        check_qparams_field(self)

    def act_spec(self) -> QuantSpec:
        """Int8 per tensor with the fixed ``act_scale`` (and ``act_zero_point``: asymmetric)."""
        return int8_static_act_spec(self.act_zero_point is None)


@register_handler(Int8WeightOnlyConfig)
def _(module: nn.Module, config: Int8WeightOnlyConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    q = Int8Tensor.from_float(w, config.weight_spec(), scale_rule=config.scale_rule, kernel=config.kernel)
    swap_weight(module, q, config)


@register_handler(Int8DynamicActivationInt8WeightConfig)
def _(module: nn.Module, config: Int8DynamicActivationInt8WeightConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    q = Int8Tensor.from_float(w, config.weight_spec(), scale_rule=config.scale_rule, act_spec=config.act_spec(),
                              kernel=config.kernel)
    swap_weight(module, q, config)


@register_handler(Int8StaticActivationInt8WeightConfig)
def _(module: nn.Module, config: Int8StaticActivationInt8WeightConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    zp = None if config.act_zero_point is None else torch.tensor(config.act_zero_point)
    q = Int8Tensor.from_float(
        w, config.weight_spec(), scale_rule=config.scale_rule, act_spec=config.act_spec(),
        act_scale=torch.tensor(config.act_scale), act_zero_point=zp, kernel=config.kernel,
    )
    swap_weight(module, q, config)
