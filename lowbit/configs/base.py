"""The config registry: each config class registers the handler that applies it to a module."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.hqq import QPARAMS_RULES
from lowbit.tensors.base import QuantizedTensor

__all__ = [
    "QuantConfig",
    "register_handler",
    "get_handler",
    "registered_configs",
    "config_classes",
    "swap_weight",
    "mark_quantized",
    "float_weight",
    "fit_group",
    "check_kernel_field",
    "check_qparams_field",
]

_HANDLERS: dict[type, Callable[[nn.Module, "QuantConfig", str], None]] = {}


@dataclass(frozen=True, repr=False)
class QuantConfig:
    """Base of every config: a frozen dataclass validated in ``__post_init__``.

    Subclasses are declared ``@dataclass(frozen=True, repr=False)`` so they share this repr,
    which shows only the fields that differ from their defaults: ``Int4WeightOnlyConfig(group_size=32)``.

    A config is the one statement of its scheme's numerics: ``weight_spec()`` and ``act_spec()``
    say how weights and activations are quantized. The handler, the tensor it makes (which stores
    the specs and dequantizes itself with them), the QAT mirror and the kernels' reference all read
    these; nothing else writes a scheme's spec.
    """

    def weight_spec(self):
        """The ``QuantSpec`` of the weight (subclasses that quantize weights define it)."""
        raise NotImplementedError(f"{type(self).__name__} states no weight spec")

    def act_spec(self):
        """The ``QuantSpec`` of the activations, or None when they stay float (weight-only)."""
        return None

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if default is dataclasses.MISSING or value != default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def for_weight(self, shape: tuple[int, ...]) -> "QuantConfig":
        """The config a weight of ``shape`` gets: ``self``, or the nearest variant of it that fits.

        ``quantize_`` asks this of every selected module before it changes anything. The default
        fits every shape; a config with a group along in_features answers with the largest
        allowed group, no larger than its own, that divides ``shape[-1]`` (see :func:`fit_group`).

        Args:
            shape: the float weight's shape, ``(out_features, in_features)`` for a linear.

        Returns:
            ``self`` or a copy with another group size.

        Raises:
            ValueError: no variant of this config fits ``shape`` (the message says why).
        """
        return self


def check_act_scale_field(config: "QuantConfig") -> None:
    """Normalize ``config.act_scale`` (a number or a one-element tensor) to a positive finite float.

    Raises:
        ValueError: several elements, or not a positive finite number (bools included).
    """
    name, a = type(config).__name__, config.act_scale
    if isinstance(a, torch.Tensor):
        if a.numel() != 1:
            raise ValueError(f"{name}(act_scale=...) must be one number, got shape {tuple(a.shape)}")
        a = float(a)
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        raise ValueError(f"{name}(act_scale={a!r}) must be a positive finite float")
    object.__setattr__(config, "act_scale", float(a))


def check_kernel_field(config: "QuantConfig") -> None:
    """Raise ValueError unless ``config.kernel`` is a ``KernelPreference``."""
    if not isinstance(config.kernel, KernelPreference):
        raise ValueError(f"{type(config).__name__}(kernel={config.kernel!r}); allowed: {[k for k in KernelPreference]}")


def check_qparams_field(config: "QuantConfig") -> None:
    """Raise ValueError unless ``config.qparams`` is one of ``QPARAMS_RULES`` ("minmax", "hqq")."""
    if not isinstance(config.qparams, str) or config.qparams not in QPARAMS_RULES:
        allowed = ", ".join(repr(r) for r in QPARAMS_RULES)
        raise ValueError(f"{type(config).__name__}(qparams={config.qparams!r}); allowed: {allowed}")


def register_handler(config_cls: type):
    """Register ``fn(module, config, fqn)`` as the way ``config_cls`` quantizes a module in place."""

    def decorator(fn):
        _HANDLERS[config_cls] = fn
        return fn

    return decorator


def registered_configs() -> list[str]:
    """Names of the config classes that have a handler."""
    return sorted(c.__name__ for c in _HANDLERS)


def config_classes() -> list[type]:
    """The config classes that have a handler (serialization looks them up by name)."""
    return list(_HANDLERS)


def get_handler(config: QuantConfig):
    """The handler registered for ``type(config)``.

    Raises:
        TypeError: no handler is registered for it.
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"config={config!r} has no registered handler; known configs: {registered_configs()}")
    return handler


def float_weight(module: nn.Module, fqn: str, rank: int = 2) -> torch.Tensor:
    """The module's float weight, checked: present, floating, not yet quantized, of ``rank`` dims.

    Raises:
        ValueError: no weight, an already quantized weight, or the wrong rank.
        TypeError: a non-floating weight.
    """
    w = getattr(module, "weight", None)
    name = fqn or "<root>"
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor to quantize")
    if isinstance(w, QuantizedTensor):
        raise ValueError(f"module {name!r} is already quantized ({type(w).__name__}); quantize_ a float model")
    if not w.is_floating_point():
        raise TypeError(f"module {name!r} weight has dtype {w.dtype}; only floating weights can be quantized")
    if w.dim() != rank:
        raise ValueError(f"module {name!r} weight has shape {tuple(w.shape)}; this config needs a {rank}-D weight")
    return w.detach()


def fit_group(config: QuantConfig, shape: Sequence[int], field: str, group: int, allowed: Sequence[int],
              replace: Callable[[int], QuantConfig]) -> QuantConfig:
    """``for_weight`` for a config with a group along the last dim: ``config`` when ``group`` divides
    ``shape[-1]``, else ``replace(g)`` for the largest ``g`` of ``allowed`` below ``group`` that does.

    Raises:
        ValueError: no allowed group up to ``group`` divides ``shape[-1]``.
    """
    k = int(shape[-1])
    if k % group == 0:
        return config
    smaller = sorted((g for g in allowed if g < group), reverse=True)
    for g in smaller:
        if k % g == 0:
            return replace(g)
    tried = f"nor by a smaller allowed {field} {smaller}" if smaller else "(no smaller one is allowed)"
    raise ValueError(f"in_features {k} is not divisible by {field}={group} {tried}")


def _extra_repr_with_config(module: nn.Module) -> str:
    base = type(module).extra_repr(module)
    return f"{base}, quant={module.lowbit_config!r}" if base else f"quant={module.lowbit_config!r}"


def mark_quantized(module: nn.Module, config: QuantConfig) -> None:
    """Record ``config`` on ``module`` (``module.lowbit_config``, saved with it) and show it in
    ``print(model)`` as ``quant=<config>``.

    The repr rule is a ``functools.partial`` of a module-level function, not a bound method, so
    ``torch.save(model)`` pickles it and ``torch.load`` restores it.
    """
    module.lowbit_config = config
    module.extra_repr = functools.partial(_extra_repr_with_config, module)


def swap_weight(module: nn.Module, weight: QuantizedTensor, config: QuantConfig) -> None:
    """Replace ``module.weight`` with a frozen parameter holding ``weight``; record the config."""
    module.weight = nn.Parameter(weight, requires_grad=False)
    mark_quantized(module, config)
