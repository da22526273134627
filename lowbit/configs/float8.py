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

__all__ = [
    "Float8WeightOnlyConfig",
    "Float8DynamicActivationFloat8WeightConfig",
    "Float8StaticActivationFloat8WeightConfig",
    "float8_act_spec",
]

_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


class _Float8Weights:
    """The float8 weight scheme the three float8 configs share."""

    def weight_spec(self) -> QuantSpec:
        """``dtype`` values, float32 scale ``amax / fmax`` per row or per tensor (``granularity``)."""
        return QuantSpec(_DTYPES[self.dtype], self.granularity)


def float8_act_spec(dtype: torch.dtype, granularity: Granularity) -> QuantSpec:
    """Float8 activations of ``dtype``, one scale per token (``PerToken()``) or per tensor
    (``PerTensor()``, dynamic or static): what the float8 x float8 configs state and calibration
    observes with."""
    return QuantSpec(_DTYPES[dtype], granularity)


def _check(config) -> None:
    name = type(config).__name__
    if not isinstance(config.granularity, (PerRow, PerTensor)):
        raise ValueError(f"{name}(granularity={config.granularity!r}) is not supported; allowed: PerRow(), PerTensor()")
    if config.dtype not in _DTYPES:
        raise ValueError(f"{name}(dtype={config.dtype!r}); allowed: torch.float8_e4m3fn, torch.float8_e5m2")
    check_kernel_field(config)


@dataclass(frozen=True, repr=False)
class Float8WeightOnlyConfig(_Float8Weights, QuantConfig):
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
class Float8DynamicActivationFloat8WeightConfig(_Float8Weights, QuantConfig):
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

    def act_spec(self) -> QuantSpec:
        """``dtype`` per token (with a per-row weight) or per tensor, chosen at run time."""
        return float8_act_spec(self.dtype, PerToken() if isinstance(self.granularity, PerRow) else PerTensor())


@dataclass(frozen=True, repr=False)
class Float8StaticActivationFloat8WeightConfig(_Float8Weights, QuantConfig):
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

    def act_spec(self) -> QuantSpec:
        """``dtype`` per tensor with the fixed ``act_scale``."""
        return float8_act_spec(self.dtype, PerTensor())


@register_handler(Float8WeightOnlyConfig)
@register_handler(Float8DynamicActivationFloat8WeightConfig)
@register_handler(Float8StaticActivationFloat8WeightConfig)
def _(module: nn.Module, config: QuantConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    act_scale = getattr(config, "act_scale", None)
    q = Float8Tensor.from_float(
        w, config.weight_spec(), act_spec=config.act_spec(), kernel=config.kernel,
        act_scale=None if act_scale is None else torch.tensor(act_scale),
    )
    swap_weight(module, q, config)
