"""Fake quantizers: the QAT mirror of each PTQ config, registered per config class.

A mirror says how a prepared module computes its forward so that it equals, bit for bit, the
converted module run with the reference kernels:

* ``weight(w)``: the fake-quantized weight, equal to the converted tensor's ``dequantize()``
  (same ``QuantSpec`` or scale rule, same primitives), in ``w.dtype``;
* ``activation(x)``: the fake-quantized activation the converted kernel's reference uses, or
  None (weight-only);
* ``float32_linear``: the reference computes the linear in float32 and casts once (the int8 x
  int8 configs), instead of in the activation dtype.

Gradients: straight-through for every rounding (the primitives' ``round_ste`` and float8
round-trip), zero where an affine value was clipped to ``[qmin, qmax]`` (``fake_quantize_affine``).
Scales are recomputed from the current (detached) weight every step, by the config's own rule
(``qparams="hqq"``: HQQ's solver, every step). For the fp8-then-int4 rule
the clipped-gradient mask is not applied: with max-abs scales only the positive group maximum
(8 -> 7) clips, and its gradient passes straight through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from lowbit.kernels.int4 import fake_quantize_activation
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, fake_quantize_affine
from lowbit.primitives.float8 import choose_qparams_float8, fake_quantize_float8
from lowbit.primitives.hqq import weight_qparams
from lowbit.primitives.rules import float8_then_int4, float8_then_int4_scale
from lowbit.spec import QuantSpec

__all__ = ["FakeQuant", "register_fake_quant", "fake_quant_for", "qat_configs"]


@dataclass(frozen=True)
class FakeQuant:
    """How a prepared module computes (see the module docstring)."""

    weight: Callable[[torch.Tensor], torch.Tensor]
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    float32_linear: bool = False


_MIRRORS: dict[type, Callable[[QuantConfig], FakeQuant]] = {}


def register_fake_quant(config_cls: type):
    """Register ``fn(config) -> FakeQuant`` as the QAT mirror of ``config_cls``."""

    def decorator(fn):
        _MIRRORS[config_cls] = fn
        return fn

    return decorator


def qat_configs() -> list[str]:
    """Names of the PTQ configs that have a QAT mirror."""
    return sorted(c.__name__ for c in _MIRRORS)


def fake_quant_for(config: QuantConfig) -> FakeQuant:
    """The mirror of ``config``.

    Raises:
        TypeError: ``config`` has no QAT mirror (the message names it and lists those that do).
    """
    fn = _MIRRORS.get(type(config))
    if fn is None:
        raise TypeError(f"{type(config).__name__} has no QAT mirror; QATConfig supports: {qat_configs()}")
    return fn(config)


# --- building blocks (each takes the specs the config states: its weight_spec() / act_spec()) --------


def _affine_weight(spec: QuantSpec, rule: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Integer weight with qparams chosen by ``rule`` (the config's ``scale_rule``: "minmax" or "hqq")."""

    def fq(w):
        s, zp = weight_qparams(w.detach(), spec, rule)
        return fake_quantize_affine(w, spec, s, zp)

    return fq


def _float8_weight(spec: QuantSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    def fq(w):
        return fake_quantize_float8(w, spec, choose_qparams_float8(w.detach(), spec))

    return fq


def _float32_weight(inner):
    """``inner`` applied to the float32 weight: the int8 x int8 reference dequantizes to float32."""
    return lambda w: inner(w.float())


def _fp8_int4_weight(spec: QuantSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    group_size = spec.granularity.group_size

    def fq(w):
        with torch.no_grad():
            q, group_scale, row_scale = float8_then_int4(w.detach(), group_size)
            # what Int4Tensor stores and dequantizes
            scale = float8_then_int4_scale(group_scale, row_scale)
            value = dequantize_affine(q, scale, None, spec, w.dtype)
        return w + (value - w).detach()  # straight through

    return fq


def _int8_dynamic_activation(spec: QuantSpec):
    def fq(x):
        s, zp = choose_qparams_affine(x.detach(), spec, check_finite=False)
        return fake_quantize_affine(x.float(), spec, s, zp)  # the reference's float32 activation

    return fq


def _int8_static_activation(spec: QuantSpec, act_scale: float, act_zero_point: int | None):
    """The static int8 activation: the config's fixed scale (and zero point), as float32 (1, 1)."""

    def fq(x):
        one = (1,) * x.dim()  # per tensor, at x's rank
        s = torch.full(one, act_scale, dtype=torch.float32, device=x.device)
        zp = None if act_zero_point is None else torch.full(one, act_zero_point, dtype=torch.int32, device=x.device)
        return fake_quantize_affine(x.float(), spec, s, zp)

    return fq


def _float8_static_activation(spec: QuantSpec, act_scale: float):
    return lambda x: fake_quantize_float8(x, spec, torch.full((1,) * x.dim(), act_scale, dtype=torch.float32, device=x.device))


def _activation(spec: QuantSpec):
    return lambda x: fake_quantize_activation(x, spec)


# --- mirrors -------------------------------------------------------------------------------------


@register_fake_quant(Int8WeightOnlyConfig)
def _(c):
    return FakeQuant(_affine_weight(c.weight_spec(), c.scale_rule))


@register_fake_quant(Int8DynamicActivationInt8WeightConfig)
def _(c):
    weight = _float32_weight(_affine_weight(c.weight_spec(), c.scale_rule))
    return FakeQuant(weight, _int8_dynamic_activation(c.act_spec()), float32_linear=True)


@register_fake_quant(Int8StaticActivationInt8WeightConfig)
def _(c):
    weight = _float32_weight(_affine_weight(c.weight_spec(), c.scale_rule))
    return FakeQuant(weight, _int8_static_activation(c.act_spec(), c.act_scale, c.act_zero_point), float32_linear=True)


@register_fake_quant(Int4WeightOnlyConfig)
def _(c):
    return FakeQuant(_affine_weight(c.weight_spec(), c.scale_rule))


@register_fake_quant(Int8DynamicActivationInt4WeightConfig)
def _(c):
    return FakeQuant(_affine_weight(c.weight_spec(), c.scale_rule), _activation(c.act_spec()))


@register_fake_quant(Float8WeightOnlyConfig)
def _(c):
    return FakeQuant(_float8_weight(c.weight_spec()))


@register_fake_quant(Float8DynamicActivationFloat8WeightConfig)
def _(c):
    return FakeQuant(_float8_weight(c.weight_spec()), _activation(c.act_spec()))


@register_fake_quant(Float8StaticActivationFloat8WeightConfig)
def _(c):
    return FakeQuant(_float8_weight(c.weight_spec()), _float8_static_activation(c.act_spec(), c.act_scale))


@register_fake_quant(Float8DynamicActivationInt4WeightConfig)
def _(c):
    return FakeQuant(_fp8_int4_weight(c.weight_spec()), _activation(c.act_spec()))
