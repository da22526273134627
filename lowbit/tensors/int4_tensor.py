"""Int4Tensor: 4-bit weights packed two per byte, a float32 scale per group along the last dim.

Fields:
    qdata: uint8 ``(*shape[:-1], shape[-1] // 2)``, packed by ``pack_int4`` (byte j holds element
        2j in its low nibble): the one canonical layout, the only one saved. Kernel-specific
        layouts are made from it on first use by ``lowbit.kernels.int4`` and never saved.
    scale: float32 ``(*shape[:-1], shape[-1] // group_size)``.
    spec: the weight ``QuantSpec`` (int4 symmetric, or uint4 with an int8 or float32 zero point;
        ``PerGroup(group_size)``), from the config's ``weight_spec()``: ``dequantize()`` and the
        kernels' reference read it.
    zero_point: int8 like ``scale`` with values in [0, 15] (asymmetric uint4 values), float32
        like ``scale`` (asymmetric with an unrounded zero point, ``zero_point_domain="float"``,
        as tinygemm and HQQ store it), or None (symmetric int4 values in [-8, 7], stored as
        4-bit two's complement).
    act_spec: ``QuantSpec`` of the activations (int8 per token for 8da4w, float8 per token for
        fp8 x int4) or None for weight-only.
    kernel: ``KernelPreference`` for the matmul ops (how to run; not saved).

The weight stands for ``(q - zero_point) * scale`` (float32 math, one cast to ``dtype``).
"""

from __future__ import annotations

import torch

from lowbit.granularity import PerGroup, PerToken
from lowbit.kernels.decode import make_int4_plan
from lowbit.kernels.int4 import dequantize_int4, int4_linear
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.affine import quantize_affine
from lowbit.primitives.hqq import weight_qparams
from lowbit.primitives.packing import pack_int4
from lowbit.primitives.rules import float8_then_int4, float8_then_int4_scale, int4_maxabs_group_scale, int4_maxabs_spec
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.layout_ops import register_layout_ops, register_linear_ops

__all__ = ["Int4Tensor", "INT4_SCALE_RULES"]

GROUP_SIZES = (32, 64, 128, 256)
# How the int4 scales are chosen: "minmax" (the spec's rule: asymmetric min/max, or symmetric
# amax / 7), "hqq" (HQQ's solver under the spec, ``lowbit.primitives.hqq``), "maxabs" (amax / 8,
# full [-8, 7] range), "float8_then_int4" (float8 rows first, then max-abs groups of the float8
# values; the stored scale is group_scale * row_scale). The two max-abs rules quantize with their
# spec (``lowbit.primitives.rules.int4_maxabs_spec``).
INT4_SCALE_RULES = ("minmax", "hqq", "maxabs", "float8_then_int4")


class Int4Tensor(QuantizedTensor):
    """Packed int4 quantized tensor (see the module docstring for the fields)."""

    tensor_data_names = ("qdata", "scale")
    optional_tensor_data_names = ("zero_point",)
    tensor_attribute_names = ("spec", "act_spec", "kernel")
    runtime_attribute_names = ("kernel",)
    qparam_names = ("scale", "zero_point")
    pack = 2  # two 4-bit values per qdata byte along the last dim

    @classmethod
    def from_float(
        cls,
        input: torch.Tensor,
        spec: QuantSpec,
        *,
        scale_rule: str = "minmax",
        act_spec: QuantSpec | None = None,
        kernel: KernelPreference = KernelPreference.AUTO,
    ) -> "Int4Tensor":
        """Quantize ``input`` (rank >= 1, the last dim split into groups) to packed int4.

        Args:
            input: floating tensor whose last dim is divisible by the group size (and even).
            spec: the weight ``QuantSpec`` (a config's ``weight_spec()``): ``"int4"`` symmetric
                (values in [-8, 7], no zero point) or ``"uint4"`` asymmetric with an int8 zero point
                (``zero_point_domain="int"``) or a float32 one (``"float"``), ``PerGroup(g)`` with g
                one of 32, 64, 128, 256.
            scale_rule: one of ``INT4_SCALE_RULES``; "maxabs" and "float8_then_int4" need
                ``spec == int4_maxabs_spec(g)`` and a 2-D input; "hqq" a 2-D input.
            act_spec: activation spec (int8 ``PerToken`` asymmetric, float8 ``PerToken``) or None.
            kernel: ``KernelPreference``.

        Raises:
            ValueError: a spec int4 does not store, a group size not allowed or not dividing the
                last dim, an odd last dim, an unknown scale rule or one whose spec differs.
        """
        _check_spec(spec)
        group_size = spec.granularity.group_size
        if input.dim() == 0 or input.shape[-1] % 2:
            raise ValueError(f"Int4Tensor packs two values per byte: the last dim must be even, got shape "
                             f"{tuple(input.shape)}")
        if input.shape[-1] % group_size:
            raise ValueError(f"the last dim {input.shape[-1]} (in_features) is not divisible by group_size={group_size}")
        if scale_rule not in INT4_SCALE_RULES:
            raise ValueError(f"scale_rule={scale_rule!r}; allowed: {INT4_SCALE_RULES}")
        maxabs = scale_rule in ("maxabs", "float8_then_int4")
        if maxabs and (spec != int4_maxabs_spec(group_size) or input.dim() != 2):
            raise ValueError(f"scale_rule={scale_rule!r} needs spec=int4_maxabs_spec({group_size}) and a 2-D weight, "
                             f"got spec={spec!r}, shape {tuple(input.shape)}")
        _check_act(act_spec)
        if scale_rule == "float8_then_int4":
            q, group_scale, row_scale = float8_then_int4(input, group_size)
            scale, zero_point = float8_then_int4_scale(group_scale, row_scale), None
        elif scale_rule == "maxabs":
            scale, zero_point = int4_maxabs_group_scale(input, group_size), None
            q = quantize_affine(input, scale, None, spec)
        else:  # "minmax", "hqq"
            scale, zero_point = weight_qparams(input, spec, scale_rule)
            q = quantize_affine(input, scale, zero_point, spec)
        return cls(
            qdata=pack_int4(q),
            scale=scale.float(),
            zero_point=zero_point,
            spec=spec,
            act_spec=act_spec,
            kernel=KernelPreference(kernel),
            shape=input.shape,
            dtype=input.dtype,
        )

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scale.shape[-1]

    @property
    def block_size(self) -> tuple[int, ...]:
        """Elements per scale along each dim."""
        return tuple(s // t for s, t in zip(self.shape, self.scale.shape))

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor these int4 values stand for, in ``output_dtype`` (default: ``self.dtype``)."""
        return dequantize_int4(self.qdata, self.scale, self.zero_point, self.spec, output_dtype or self.dtype)


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec (a config's weight_spec()), got {type(spec).__name__}")
    if spec.dtype.name not in ("int4", "uint4") or spec.dtype.name == "uint4" and spec.symmetric:
        raise ValueError(f"Int4Tensor stores symmetric int4 or asymmetric uint4, got spec.dtype={spec.dtype.name}, "
                         f"symmetric={spec.symmetric}")
    if spec.dtype.name == "int4" and not spec.symmetric:
        raise ValueError("Int4Tensor stores asymmetric weights as uint4 (values [0, 15] and a zero point), got int4")
    if not isinstance(spec.granularity, PerGroup) or spec.granularity.group_size not in GROUP_SIZES:
        raise ValueError(f"Int4Tensor spec.granularity={spec.granularity!r}; allowed: PerGroup(g) with g in {GROUP_SIZES}")
    if spec.has_zero_point and spec.zero_point_dtype not in (torch.int8, torch.float32):
        raise ValueError(f"Int4Tensor stores an int8 (int domain) or float32 (float domain) zero point, got "
                         f"spec.zero_point_dtype={spec.zero_point_dtype}")
    if spec.has_zero_point and (spec.zero_point_dtype == torch.float32) != (spec.zero_point_domain == "float"):
        raise ValueError(f"zero_point_dtype={spec.zero_point_dtype} does not match zero_point_domain="
                         f"{spec.zero_point_domain!r}: int8 goes with 'int', float32 with 'float'")
    if spec.quant_min is not None or spec.quant_max is not None:
        raise ValueError("Int4Tensor stores the full 4-bit range: quant_min/quant_max must be None")


def _check_act(act_spec):
    if act_spec is None:
        return
    if not isinstance(act_spec.granularity, PerToken):
        raise ValueError(f"int4 weights take per-token activations only, got act_spec.granularity={act_spec.granularity!r}")
    if act_spec.dtype.name not in ("int8", "float8_e4m3fn", "float8_e5m2"):
        raise ValueError(f"act_spec.dtype={act_spec.dtype.name}; allowed: int8, float8_e4m3fn, float8_e5m2")


def _decode_plan(w: Int4Tensor):
    return make_int4_plan(w.qdata, w.scale, w.zero_point, w.spec, w.act_spec, w.kernel.value, w.dtype)


def _run_linear(x: torch.Tensor, weight: Int4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    plan = weight._linear_plan(_decode_plan)  # small-M eager CPU calls: int4_linear's route, checked once
    if plan is not None and (out := plan(x, bias)) is not None:
        return out
    return int4_linear(x, weight.qdata, weight.scale, weight.zero_point, bias, weight.spec, weight.act_spec,
                       weight.kernel.value)


register_linear_ops(Int4Tensor, _run_linear)
register_layout_ops(Int4Tensor)
