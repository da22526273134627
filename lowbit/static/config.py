"""Recipes for static quantization: what ``lowbit.static.prepare`` observes and ``convert`` makes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.configs import Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig, QuantConfig
from lowbit.configs.float8 import float8_act_spec
from lowbit.configs.int8 import int8_static_act_spec
from lowbit.granularity import Granularity, PerRow, PerTensor
from lowbit.kernels.preference import KernelPreference

__all__ = ["StaticQuantConfig", "SmoothQuantConfig"]

_DTYPES = {
    "int8": "int8", torch.int8: "int8",
    "float8_e4m3fn": "float8_e4m3fn", torch.float8_e4m3fn: "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2", torch.float8_e5m2: "float8_e5m2",
}
_OBSERVERS = ("minmax", "moving_average", "percentile")
_MISSING = ("dynamic", "float", "error")


@dataclass(frozen=True, repr=False)
class StaticQuantConfig:
    """Static activation quantization, calibrated: ``prepare`` puts an observer on each linear's
    input, ``convert`` turns each into ``Int8StaticActivationInt8WeightConfig`` (``dtype="int8"``)
    or ``Float8StaticActivationFloat8WeightConfig`` (float8) with the observed per-tensor scale.

    Args:
        dtype: ``"int8"`` (default), ``"float8_e4m3fn"`` or ``"float8_e5m2"`` (or the torch dtypes).
        act_symmetric: int8 only: symmetric activations (no zero point) or asymmetric.
        granularity: weight granularity, ``PerRow()`` (default) or ``PerTensor()``.
        observer: ``"minmax"`` (default), ``"moving_average"`` or ``"percentile"``.
        averaging_constant: for ``"moving_average"``.
        percentile: for ``"percentile"`` (clips the top ``100 - percentile`` percent).
        softmax: also quantize every ``nn.Softmax`` module's output on its fixed grid.
        missing: what ``convert`` does with a linear no calibration batch reached (it always warns
            and names it): ``"dynamic"`` (default: the dynamic-activation config of the same
            dtype), ``"float"`` (leave it unquantized) or ``"error"``.
        kernel: ``KernelPreference`` of the converted weights.
    """

    dtype: str | torch.dtype = "int8"
    act_symmetric: bool = True
    granularity: Granularity = field(default_factory=PerRow)
    observer: str = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    softmax: bool = True
    missing: str = "dynamic"
    kernel: KernelPreference = KernelPreference.AUTO

    def __post_init__(self):
        name = type(self).__name__
        dt = _DTYPES.get(self.dtype) if isinstance(self.dtype, (str, torch.dtype)) else None
        if dt is None:
            raise ValueError(f"{name}(dtype={self.dtype!r}); allowed: 'int8', 'float8_e4m3fn', 'float8_e5m2'")
        object.__setattr__(self, "dtype", dt)
        if not isinstance(self.act_symmetric, bool):
            raise ValueError(f"{name}(act_symmetric={self.act_symmetric!r}) must be a bool")
        if dt != "int8" and not self.act_symmetric:
            raise ValueError(f"{name}(act_symmetric=False) needs dtype='int8': float8 scaling is symmetric")
        if not isinstance(self.granularity, (PerRow, PerTensor)):
            raise ValueError(f"{name}(granularity={self.granularity!r}); allowed: PerRow(), PerTensor()")
        if self.observer not in _OBSERVERS:
            raise ValueError(f"{name}(observer={self.observer!r}); allowed: {list(_OBSERVERS)}")
        if self.missing not in _MISSING:
            raise ValueError(f"{name}(missing={self.missing!r}); allowed: {list(_MISSING)}")
        if not isinstance(self.softmax, bool):
            raise ValueError(f"{name}(softmax={self.softmax!r}) must be a bool")
        object.__setattr__(self, "kernel", KernelPreference(self.kernel))

    __repr__ = QuantConfig.__repr__  # only the fields that differ from their defaults

    @property
    def is_float8(self) -> bool:
        return self.dtype != "int8"

    def act_spec(self):
        """The static activation spec calibration observes with: the one the converted config
        (``Int8StaticActivationInt8WeightConfig`` / ``Float8StaticActivationFloat8WeightConfig``) states."""
        if self.is_float8:
            return float8_act_spec(getattr(torch, self.dtype), PerTensor())
        return int8_static_act_spec(self.act_symmetric)

    def observer_kwargs(self) -> dict:
        """Keyword arguments for ``lowbit.observers.make_observer``."""
        if self.observer == "moving_average":
            return {"averaging_constant": self.averaging_constant}
        if self.observer == "percentile":
            return {"percentile": self.percentile}
        return {}


_SMOOTH_BASES = (StaticQuantConfig, Int8DynamicActivationInt8WeightConfig, Float8DynamicActivationFloat8WeightConfig)


@dataclass(frozen=True, repr=False)
class SmoothQuantConfig:
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then quantize.

    Calibration records each linear's per-input-channel activation range; ``convert`` computes
    ``s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)`` and stores the weight ``W * s`` with the
    base config. The input must then be divided by ``s``: where the model's structure is known
    (``lowbit.static.fold.FOLD_TABLE``: Llama/Mistral/Qwen2 decoder layers, glassllm), ``1 / s``
    is folded into the preceding RMSNorm's weight (q/k/v, gate/up: one ``s`` per norm, from the
    union of their ranges) or into the rows of the producing linear (``o_proj`` into ``v_proj``,
    ``s`` tied across the query heads of a key/value head; ``down_proj`` into ``up_proj``);
    elsewhere it stays a per-channel pre-scale on the quantized weight, multiplied into the input
    in float32 before it is quantized. A static base gets its per-tensor activation range from
    the smoothed per-channel ranges, exactly.

    Args:
        base_config: ``StaticQuantConfig(...)`` (int8 or float8), ``Int8DynamicActivationInt8WeightConfig``
            or ``Float8DynamicActivationFloat8WeightConfig``.
        alpha: migration strength in ``[0, 1]`` (0: no smoothing of activations, 1: all onto weights).
        fold: fold ``1 / s`` where the structure allows (default); False keeps it as a pre-scale
            on every linear, with the same ``s`` (the output then equals the folded model's up to
            float32 rounding: a check of the folding, or for code that must not touch the norms).
    """

    base_config: StaticQuantConfig | QuantConfig = field(default_factory=StaticQuantConfig)
    alpha: float = 0.5
    fold: bool = True

    def __post_init__(self):
        if not isinstance(self.base_config, _SMOOTH_BASES):
            allowed = ", ".join(c.__name__ for c in _SMOOTH_BASES)
            raise ValueError(f"SmoothQuantConfig(base_config={self.base_config!r}); allowed: {allowed}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"SmoothQuantConfig(alpha={a!r}) must be a float in [0, 1]")
        object.__setattr__(self, "alpha", float(a))
        if not isinstance(self.fold, bool):
            raise ValueError(f"SmoothQuantConfig(fold={self.fold!r}) must be a bool")

    __repr__ = QuantConfig.__repr__
