"""Int8Tensor: int8 values with a float32 scale per block, for weights (and their activations).

Fields:
    qdata: ``shape`` int8.
    spec: the weight ``QuantSpec`` the values were made with (int8; from the config's
        ``weight_spec()``); ``dequantize()`` and the kernels' reference read it.
    scale: float32 of the same rank, ``shape[i] // block_size[i]``.
    zero_point: int32 like ``scale``, or None (symmetric).
    act_scale, act_zero_point: static activation qparams (one element each) or None.
    act_pre_scale: float32 (1, K) per-input-channel factor the activation is multiplied by before
        it is quantized (SmoothQuant's ``1 / s``), or None. The stored values are then those of
        ``W * s``; ``dequantize()`` returns the weight the linear effectively applies, ``W``.
    act_spec: ``QuantSpec`` of the activations (int8, ``PerToken`` dynamic or ``PerTensor``
        static), or None for weight-only; when set, ``F.linear`` quantizes its input on the fly.
    kernel: ``KernelPreference`` for the matmul ops (how to run; not saved).

The logical ``dtype`` is the dtype ``dequantize()`` returns and the activations must have.
"""

from __future__ import annotations

import torch

from lowbit.granularity import PerTensor, PerToken
from lowbit.kernels.decode import make_int8_plan
from lowbit.kernels.int8 import int8_weight_only_linear_any
from lowbit.kernels.w8a8 import int8_activation_linear
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.affine import _block_from_scale, dequantize_affine, quantize_affine
from lowbit.primitives.hqq import QPARAMS_RULES, weight_qparams
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.layout_ops import register_layout_ops, register_linear_ops

__all__ = ["Int8Tensor"]

aten = torch.ops.aten


class Int8Tensor(QuantizedTensor):
    """Int8 quantized tensor (see the module docstring for the fields)."""

    tensor_data_names = ("qdata", "scale")
    optional_tensor_data_names = ("zero_point", "act_scale", "act_zero_point", "act_pre_scale")
    tensor_attribute_names = ("spec", "act_spec", "kernel")
    runtime_attribute_names = ("kernel",)
    qparam_names = ("scale", "zero_point", "act_pre_scale")  # blocked qparams, sliced with qdata
    pack = 1  # one int8 value per qdata element

    @classmethod
    def from_float(
        cls,
        input: torch.Tensor,
        spec: QuantSpec,
        *,
        scale_rule: str = "minmax",
        act_spec: QuantSpec | None = None,
        act_scale: torch.Tensor | None = None,
        act_zero_point: torch.Tensor | None = None,
        kernel: KernelPreference = KernelPreference.AUTO,
    ) -> "Int8Tensor":
        """Quantize ``input`` with ``spec`` (int8); scales chosen by the primitives.

        Args:
            input: floating tensor, rank >= 1 (2-D for "hqq").
            spec: the weight ``QuantSpec``; its dtype must be int8.
            scale_rule: how the scales are chosen, one of ``QPARAMS_RULES``: "minmax" (the
                spec's own rule) or "hqq" (``lowbit.primitives.hqq.hqq_qparams``).
            act_spec: activation spec for W8A8 (int8 with ``PerToken()`` for dynamic, or
                ``PerTensor()`` together with ``act_scale`` for static), or None.
            act_scale, act_zero_point: static activation qparams (one element each).
            kernel: ``KernelPreference`` for the matmul.

        Raises:
            ValueError: a non-int8 spec, an unknown scale rule, an activation spec the kernels
                don't run, a weight zero point combined with activation quantization.
        """
        if spec.dtype.name != "int8":
            raise ValueError(f"Int8Tensor needs an int8 spec, got spec.dtype={spec.dtype.name}")
        if scale_rule not in QPARAMS_RULES:
            raise ValueError(f"scale_rule={scale_rule!r}; allowed: {QPARAMS_RULES}")
        _check_act(act_spec, act_scale, act_zero_point, spec)
        scale, zero_point = weight_qparams(input, spec, scale_rule)
        qdata = quantize_affine(input, scale, zero_point, spec)
        return cls(
            qdata=qdata,
            scale=scale.float(),
            zero_point=zero_point,
            act_scale=None if act_scale is None else act_scale.detach().float().reshape(1).to(input.device),
            act_zero_point=None if act_zero_point is None else act_zero_point.detach().int().reshape(1).to(input.device),
            spec=spec,
            act_spec=act_spec,
            kernel=KernelPreference(kernel),
            dtype=input.dtype,
        )

    @property
    def block_size(self) -> tuple[int, ...]:
        """Elements per scale along each dim."""
        return _block_from_scale(self.qdata.shape, self.scale)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor these int8 values stand for, in ``output_dtype`` (default: ``self.dtype``)."""
        if self.act_pre_scale is None:
            return dequantize_affine(self.qdata, self.scale, self.zero_point, self.spec, output_dtype or self.dtype)
        w = dequantize_affine(self.qdata, self.scale, self.zero_point, self.spec, torch.float32) * self.act_pre_scale
        return w.to(output_dtype or self.dtype)


def _check_act(act_spec, act_scale, act_zero_point, spec):
    if act_spec is None:
        if act_scale is not None or act_zero_point is not None:
            raise ValueError("act_scale/act_zero_point given without act_spec")
        return
    if act_spec.dtype.name != "int8":
        raise ValueError(f"act_spec.dtype={act_spec.dtype.name}; int8 activations need int8")
    if not spec.symmetric:
        raise ValueError("int8 activations need a symmetric weight (spec.symmetric=True)")
    if isinstance(act_spec.granularity, PerToken):
        if act_scale is not None:
            raise ValueError("act_scale is given but act_spec is PerToken (dynamic); use PerTensor() for static")
    elif isinstance(act_spec.granularity, PerTensor):
        if act_scale is None or act_scale.numel() != 1:
            raise ValueError("a PerTensor (static) act_spec needs act_scale with exactly one element")
        if not act_spec.symmetric and (act_zero_point is None or act_zero_point.numel() != 1):
            raise ValueError("an asymmetric static act_spec needs act_zero_point with exactly one element")
        if act_spec.symmetric and act_zero_point is not None:
            raise ValueError("act_zero_point is given but act_spec is symmetric")
    else:
        raise ValueError(f"act_spec.granularity={act_spec.granularity!r}; allowed: PerToken(), PerTensor()")


# --- ops -----------------------------------------------------------------------------------------


def _decode_plan(w: Int8Tensor):
    return make_int8_plan(w.qdata, w.scale, w.zero_point, w.act_scale, w.act_zero_point, w.act_pre_scale, w.act_spec,
                          w.kernel.value, w.dtype)


def _run_linear(x: torch.Tensor, weight: Int8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    plan = weight._linear_plan(_decode_plan)  # small-M eager CPU calls: the route below, checked once
    if plan is not None and (out := plan(x, bias)) is not None:
        return out
    if weight.act_pre_scale is not None:
        # SmoothQuant's 1 / s where nothing absorbed it (lowbit.static.fold): multiplied in float32,
        # never rounded to x.dtype, so it cancels the float32 s in the stored W * s as a folded norm
        # would; the activation is quantized from float32 (as every path does) and the result cast once
        b = None if bias is None else bias.float()
        return _run_unscaled(x.float() * weight.act_pre_scale, weight, b).to(x.dtype)
    return _run_unscaled(x, weight, bias)


def _run_unscaled(x: torch.Tensor, weight: Int8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kernel = weight.kernel.value
    if weight.act_spec is None:
        return int8_weight_only_linear_any(x, weight.qdata, weight.scale, weight.zero_point, bias, weight.spec, kernel)
    return int8_activation_linear(
        x, weight.qdata, weight.scale, bias, weight.act_scale, weight.act_zero_point, weight.act_spec, weight.spec, kernel
    )


register_linear_ops(Int8Tensor, _run_linear)
register_layout_ops(Int8Tensor)
