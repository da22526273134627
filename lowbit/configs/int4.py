"""Int4 configs: weight-only, int8 dynamic activations x int4 weights (8da4w), and float8
dynamic activations x int4 weights (fp8-then-int4 weight rule)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.configs.base import QuantConfig, check_kernel_field, float_weight, register_handler, swap_weight
from lowbit.granularity import PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.spec import QuantSpec
from lowbit.tensors.int4_tensor import GROUP_SIZES, Int4Tensor

__all__ = ["Int4WeightOnlyConfig", "Int8DynamicActivationInt4WeightConfig", "Float8DynamicActivationInt4WeightConfig"]


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
    """

    group_size: int = 128
    symmetric: bool = False
    zero_point_domain: str = "int"
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"Int4WeightOnlyConfig(symmetric={self.symmetric!r}) must be a bool")
        if self.zero_point_domain not in ("int", "float"):
            raise ValueError(f"Int4WeightOnlyConfig(zero_point_domain={self.zero_point_domain!r}); allowed: 'int', 'float'")
        if self.zero_point_domain == "float" and self.symmetric:
            raise ValueError("Int4WeightOnlyConfig(zero_point_domain='float') needs symmetric=False")


@dataclass(frozen=True, repr=False)
class Int8DynamicActivationInt4WeightConfig(QuantConfig):
    """"8da4w": int8 per-token asymmetric activations (at run time), int4 symmetric per-group weights.

    Args:
        group_size: 32 (default), 64, 128 or 256.
        kernel: ``KernelPreference``.
    """

    group_size: int = 32
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        _check_common(self)


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


def _quantize(module: nn.Module, fqn: str, config: QuantConfig, **kwargs) -> None:
    w = float_weight(module, fqn)
    try:
        q = Int4Tensor.from_float(w, config.group_size, kernel=config.kernel, **kwargs)
    except ValueError as e:
        raise ValueError(f"module {fqn or '<root>'!r} weight {tuple(w.shape)}: {e}") from None
    swap_weight(module, q, config)


@register_handler(Int4WeightOnlyConfig)
def _(module: nn.Module, config: Int4WeightOnlyConfig, fqn: str) -> None:
    _quantize(module, fqn, config, symmetric=config.symmetric, zero_point_domain=config.zero_point_domain)


@register_handler(Int8DynamicActivationInt4WeightConfig)
def _(module: nn.Module, config: Int8DynamicActivationInt4WeightConfig, fqn: str) -> None:
    act = QuantSpec("int8", PerToken(), symmetric=False)
    _quantize(module, fqn, config, symmetric=True, act_spec=act)


@register_handler(Float8DynamicActivationInt4WeightConfig)
def _(module: nn.Module, config: Float8DynamicActivationInt4WeightConfig, fqn: str) -> None:
    act = QuantSpec("float8_e4m3fn", PerToken())
    _quantize(module, fqn, config, symmetric=True, scale_rule="float8_then_int4", act_spec=act)
