"""Float8 configs: weight-only, float8 weights x dynamic float8 activations, and x static
(calibrated) float8 activations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.configs.base import QuantConfig, check_act_scale_field, check_kernel_field, float_weight, register_handler, swap_weight
from lowbit.granularity import Granularity, PerRow, PerTensor, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.spec import QuantSpec
from lowbit.tensors.float8_tensor import Float8Tensor

__all__ = ["Float8WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig", "Float8StaticActivationFloat8WeightConfig"]

_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def _check(config) -> None:
    name = type(config).__name__
    if not isinstance(config.granularity, (PerRow, PerTensor)):
        raise ValueError(f"{name}(granularity={config.granularity!r}) is not supported; allowed: PerRow(), PerTensor()")
    if config.dtype not in _DTYPES:
        raise ValueError(f"{name}(dtype={config.dtype!r}); allowed: torch.float8_e4m3fn, torch.float8_e5m2")
    check_kernel_field(config)


@dataclass(frozen=True, repr=False)
class Float8WeightOnlyConfig(QuantConfig):
    """Float8 weights (scale per row or per tensor), float activations.

    Args:
        granularity: ``PerRow()`` (default) or ``PerTensor()``.
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
        kernel: ``KernelPreference``.
    """

    granularity: Granularity = field(default_factory=PerRow)
    dtype: torch.dtype = torch.float8_e4m3fn
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check(self)


@dataclass(frozen=True, repr=False)
class Float8DynamicActivationFloat8WeightConfig(QuantConfig):
    """Float8 weights and float8 activations scaled at run time (per tensor, or per token with a
    per-row weight). CUDA SM >= 8.9 runs ``torch._scaled_mm``; elsewhere see ``lowbit.kernels.float8``.

    Args:
        granularity: ``PerTensor()`` (default) or ``PerRow()`` (activations per token).
        dtype: float8 dtype of weights and activations, ``torch.float8_e4m3fn`` (default) or
            ``torch.float8_e5m2``.
        kernel: ``KernelPreference``.
    """

    granularity: Granularity = field(default_factory=PerTensor)
    dtype: torch.dtype = torch.float8_e4m3fn
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check(self)


@dataclass(frozen=True, repr=False)
class Float8StaticActivationFloat8WeightConfig(QuantConfig):
    """Float8 weights and float8 activations with a fixed per-tensor scale (from calibration:
    ``lowbit.static``). The activation is ``clamp(x / act_scale, -fmax, fmax)`` cast to float8.

    Args:
        act_scale: the activation scale, a positive finite float (``amax / fmax``).
        granularity: weight granularity, ``PerRow()`` or ``PerTensor()`` (default).
        dtype: float8 dtype of weights and activations, ``torch.float8_e4m3fn`` (default) or
            ``torch.float8_e5m2``.
        kernel: ``KernelPreference``.
    """

    act_scale: float
    granularity: Granularity = field(default_factory=PerTensor)
    dtype: torch.dtype = torch.float8_e4m3fn
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        check_act_scale_field(self)
        _check(self)


@register_handler(Float8WeightOnlyConfig)
def _(module: nn.Module, config: Float8WeightOnlyConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    spec = QuantSpec(_DTYPES[config.dtype], config.granularity)
    swap_weight(module, Float8Tensor.from_float(w, spec, kernel=config.kernel), config)


@register_handler(Float8DynamicActivationFloat8WeightConfig)
def _(module: nn.Module, config: Float8DynamicActivationFloat8WeightConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    spec = QuantSpec(_DTYPES[config.dtype], config.granularity)
    act = QuantSpec(_DTYPES[config.dtype], PerToken() if isinstance(config.granularity, PerRow) else PerTensor())
    swap_weight(module, Float8Tensor.from_float(w, spec, act_spec=act, kernel=config.kernel), config)


@register_handler(Float8StaticActivationFloat8WeightConfig)
def _(module: nn.Module, config: Float8StaticActivationFloat8WeightConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    spec = QuantSpec(_DTYPES[config.dtype], config.granularity)
    act = QuantSpec(_DTYPES[config.dtype], PerTensor())
    q = Float8Tensor.from_float(w, spec, act_spec=act, act_scale=torch.tensor(config.act_scale), kernel=config.kernel)
    swap_weight(module, q, config)
