"""Int4 configs: weight-only, int8 dynamic activations x int4 weights (8da4w), and float8
dynamic activations x int4 weights (fp8-then-int4 weight rule)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.configs.base import (
    QuantConfig,
    check_kernel_field,
    check_qparams_field,
    fit_group,
    float_weight,
    register_handler,
    swap_weight,
)
from lowbit.granularity import PerGroup, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.rules import int4_maxabs_spec
from lowbit.spec import QuantSpec
from lowbit.tensors.int4_tensor import GROUP_SIZES, Int4Tensor

__all__ = ["Int4WeightOnlyConfig", "Int8DynamicActivationInt4WeightConfig", "Float8DynamicActivationInt4WeightConfig"]


def _symmetric_int4(group_size: int) -> QuantSpec:
    """Symmetric int4 in [-8, 7] without zero point, ``scale = amax / 7`` per group."""
    return QuantSpec("int4", PerGroup(group_size), symmetric=True)


def _check_common(config) -> None:
    if config.group_size not in GROUP_SIZES:
        raise ValueError(f"{type(config).__name__}(group_size={config.group_size!r}); allowed: {GROUP_SIZES}")
    check_kernel_field(config)


@dataclass(frozen=True, repr=False)
class Int4WeightOnlyConfig(QuantConfig):
    """Int4 weights in groups along in_features, float activations.

    Args:
        group_size: 32, 64, 128 (default) or 256; must divide in_features.
        symmetric: False (default): uint4 with a zero point per group (min/max scale);
            True: int4 in [-8, 7] without zero point (scale ``amax / 7``).
        zero_point_domain: "int" (default): int8 zero point ``round(-min / s)``; "float": float32
            zero point ``-min / s`` kept unrounded (tinygemm/HQQ style; the group minimum maps
            exactly to 0), asymmetric only.
        kernel: ``KernelPreference``.
        qparams: how each group's scale and zero point are chosen: "minmax" (default) from the
            group's min/max (round to nearest); "hqq" by HQQ's half-quadratic solver
            (``lowbit.primitives.hqq``, no calibration data): int zero point, scale and zero point
            fitted, then the zero point rounded; float zero point, the zero point alone;
            symmetric, the scale. Same tensor, spec and kernels; slower to quantize. Any other
            value: ValueError.
    """

    group_size: int = 128
    symmetric: bool = False
    zero_point_domain: str = "int"
    kernel: KernelPreference = KernelPreference.AUTO
    qparams: str = "minmax"

    def __post_init__(self):
        _check_common(self)
        check_qparams_field(self)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"Int4WeightOnlyConfig(symmetric={self.symmetric!r}) must be a bool")
        if self.zero_point_domain not in ("int", "float"):
            raise ValueError(f"Int4WeightOnlyConfig(zero_point_domain={self.zero_point_domain!r}); allowed: 'int', 'float'")
        if self.zero_point_domain == "float" and self.symmetric:
            raise ValueError("Int4WeightOnlyConfig(zero_point_domain='float') needs symmetric=False")

    @property
    def scale_rule(self) -> str:
        """How ``Int4Tensor.from_float`` chooses the qparams: ``qparams`` ("minmax" or "hqq")."""
        return self.qparams

    def weight_spec(self) -> QuantSpec:
        """Groups of ``group_size`` along in_features: symmetric int4 in [-8, 7] (``amax / 7``), or
        uint4 with an int8 zero point ``round(-min / s)`` or (``zero_point_domain="float"``) an
        unrounded float32 one."""
        if self.symmetric:
            return _symmetric_int4(self.group_size)
        g = PerGroup(self.group_size)
        if self.zero_point_domain == "float":
            return QuantSpec("uint4", g, symmetric=False, zero_point_domain="float", zero_point_dtype=torch.float32)
        return QuantSpec("uint4", g, symmetric=False, zero_point_dtype=torch.int8)

    def for_weight(self, shape):  # noqa: D102  (QuantConfig.for_weight: a smaller group where this one can't split)
        return _fit_group(self, shape)


@dataclass(frozen=True, repr=False)
class Int8DynamicActivationInt4WeightConfig(QuantConfig):
    """"8da4w": int8 per-token asymmetric activations (at run time), int4 symmetric per-group weights.

    Args:
        group_size: 32 (default), 64, 128 or 256.
        kernel: ``KernelPreference``.
        qparams: how each group's scale is chosen: "minmax" (default, ``amax / 7``) or "hqq"
            (HQQ's solver fits the scale, ``lowbit.primitives.hqq``; no calibration data). Any
            other value: ValueError.
    """

    group_size: int = 32
    kernel: KernelPreference = KernelPreference.AUTO
    qparams: str = "minmax"

    def __post_init__(self):
        _check_common(self)
        check_qparams_field(self)

    @property
    def scale_rule(self) -> str:
        """How ``Int4Tensor.from_float`` chooses the scales: ``qparams`` ("minmax" or "hqq")."""
        return self.qparams

    def weight_spec(self) -> QuantSpec:
        """Symmetric int4 in [-8, 7] (``amax / 7``) per group."""
        return _symmetric_int4(self.group_size)

    def act_spec(self) -> QuantSpec:
        """Int8 per token, asymmetric, chosen at run time."""
        return QuantSpec("int8", PerToken(), symmetric=False)

    def for_weight(self, shape):  # noqa: D102  (QuantConfig.for_weight: a smaller group where this one can't split)
        return _fit_group(self, shape)


@dataclass(frozen=True, repr=False)
class Float8DynamicActivationInt4WeightConfig(QuantConfig):
    """Float8 (e4m3fn) per-token activations, int4 weights with the fp8-then-int4 scale rule
    (``lowbit.primitives.rules.float8_then_int4``: float8 rows first, then max-abs int4 groups).

    Args:
        group_size: 128 (default), or 32, 64, 256.
        kernel: ``KernelPreference``.
    """

    group_size: int = 128
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check_common(self)

    scale_rule = "float8_then_int4"

    def weight_spec(self) -> QuantSpec:
        """The int4 step of the fp8-then-int4 rule: symmetric int4 in [-8, 7], max-abs groups."""
        return int4_maxabs_spec(self.group_size)

    def act_spec(self) -> QuantSpec:
        """Float8 e4m3fn per token, chosen at run time."""
        return QuantSpec("float8_e4m3fn", PerToken())

    def for_weight(self, shape):  # noqa: D102  (QuantConfig.for_weight: a smaller group where this one can't split)
        return _fit_group(self, shape)


def _fit_group(config, shape):
    """The largest allowed group (``GROUP_SIZES``) up to ``config.group_size`` that divides in_features."""
    return fit_group(config, shape, "group_size", config.group_size, GROUP_SIZES, lambda g: replace(config, group_size=g))


def _quantize(module: nn.Module, config: QuantConfig, fqn: str) -> None:
    w = float_weight(module, fqn)
    try:
        q = Int4Tensor.from_float(
            w, config.weight_spec(), scale_rule=config.scale_rule, act_spec=config.act_spec(), kernel=config.kernel
        )
    except ValueError as e:
        raise ValueError(f"module {fqn or '<root>'!r} weight {tuple(w.shape)}: {e}") from None
    swap_weight(module, q, config)


for _cls in (Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig, Float8DynamicActivationInt4WeightConfig):
    register_handler(_cls)(_quantize)
