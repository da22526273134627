"""Float8Tensor: float8 (e4m3fn or e5m2) values with a float32 scale per row or per tensor.

Fields:
    qdata: ``shape``, torch.float8_e4m3fn or torch.float8_e5m2.
    spec: the weight's float8 ``QuantSpec`` (from the config's ``weight_spec()``); ``dequantize()``
        and the kernels' reference read it.
    scale: float32 of the same rank: ``(shape[0], 1)`` per row or ``(1, 1)`` per tensor.
    act_spec: ``QuantSpec`` of float8 activations or None for weight-only: dynamic ``PerToken``
        with a per-row weight, dynamic ``PerTensor`` with a per-tensor weight, or static
        ``PerTensor`` (with ``act_scale``) with either weight.
    act_scale: float32 (1,) static activation scale, or None (dynamic / weight-only).
    act_pre_scale: float32 (1, K) per-input-channel factor the activation is multiplied by before
        it is quantized (SmoothQuant's ``1 / s``), or None. The stored values are then those of
        ``W * s``; ``dequantize()`` returns the weight the linear effectively applies, ``W``.
    kernel: ``KernelPreference`` for the matmul ops (how to run; not saved).

The weight stands for ``qdata.float() * scale`` (one cast to ``dtype``).
"""

from __future__ import annotations

import torch

from lowbit.granularity import PerRow, PerTensor, PerToken
from lowbit.kernels.decode import make_float8_plan
from lowbit.kernels.float8 import float8_activation_linear, float8_weight_only_linear_any
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.float8 import choose_qparams_float8, dequantize_float8, quantize_float8
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.layout_ops import register_layout_ops, register_linear_ops

__all__ = ["Float8Tensor"]


class Float8Tensor(QuantizedTensor):
    """Float8 quantized tensor (see the module docstring for the fields)."""

    tensor_data_names = ("qdata", "scale")
    optional_tensor_data_names = ("act_scale", "act_pre_scale")
    tensor_attribute_names = ("spec", "act_spec", "kernel")
    runtime_attribute_names = ("kernel",)
    qparam_names = ("scale", "act_pre_scale")
    pack = 1

    @classmethod
    def from_float(
        cls,
        input: torch.Tensor,
        spec: QuantSpec,
        *,
        act_spec: QuantSpec | None = None,
        act_scale: torch.Tensor | None = None,
        kernel: KernelPreference = KernelPreference.AUTO,
    ) -> "Float8Tensor":
        """Quantize a 2-D ``input`` with a float8 ``spec`` (``PerRow()`` or ``PerTensor()``).

        Args:
            input: (N, K) float weight.
            spec: float8 weight spec.
            act_spec: float8 activation spec or None (see the module docstring).
            act_scale: static activation scale (one element; needs a ``PerTensor()`` act_spec).
            kernel: ``KernelPreference``.

        Raises:
            ValueError: a non-float8 spec, another granularity, a non-2-D input, or an
                activation spec that does not match (float8, ``PerToken`` for a per-row weight,
                ``PerTensor`` for a per-tensor weight, ``PerTensor`` for a static scale).
        """
        if not spec.dtype.is_float:
            raise ValueError(f"Float8Tensor needs a float8 spec, got spec.dtype={spec.dtype.name}")
        if not isinstance(spec.granularity, (PerRow, PerTensor)):
            raise ValueError(f"Float8Tensor granularity={spec.granularity!r}; allowed: PerRow(), PerTensor()")
        if input.dim() != 2:
            raise ValueError(f"Float8Tensor quantizes 2-D (out, in) weights, got shape {tuple(input.shape)}")
        if act_scale is not None:
            if act_spec is None or not act_spec.dtype.is_float or not isinstance(act_spec.granularity, PerTensor):
                raise ValueError(f"act_scale needs a float8 PerTensor() act_spec, got act_spec={act_spec!r}")
            if act_scale.numel() != 1:
                raise ValueError(f"act_scale must have one element, got shape {tuple(act_scale.shape)}")
        elif act_spec is not None:
            want = PerToken if isinstance(spec.granularity, PerRow) else PerTensor
            if not act_spec.dtype.is_float or not isinstance(act_spec.granularity, want):
                raise ValueError(
                    f"act_spec={act_spec!r}: a {type(spec.granularity).__name__}() float8 weight takes float8 "
                    f"{want.__name__}() activations"
                )
        scale = choose_qparams_float8(input, spec)
        return cls(
            qdata=quantize_float8(input, scale, spec),
            scale=scale.float(),
            act_scale=None if act_scale is None else act_scale.detach().float().reshape(1).to(input.device),
            spec=spec,
            act_spec=act_spec,
            kernel=KernelPreference(kernel),
            dtype=input.dtype,
        )

    @property
    def block_size(self) -> tuple[int, ...]:
        return tuple(s // t for s, t in zip(self.shape, self.scale.shape))

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor these float8 values stand for, in ``output_dtype`` (default: ``self.dtype``)."""
        if self.act_pre_scale is None:
            return dequantize_float8(self.qdata, self.scale, self.spec, output_dtype or self.dtype)
        w = dequantize_float8(self.qdata, self.scale, self.spec, torch.float32) * self.act_pre_scale
        return w.to(output_dtype or self.dtype)


def _decode_plan(w: Float8Tensor):
    return make_float8_plan(w.qdata, w.scale, w.act_scale, w.act_pre_scale, w.act_spec, w.kernel.value, w.dtype)


def _run_linear(x: torch.Tensor, weight: Float8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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


def _run_unscaled(x: torch.Tensor, weight: Float8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kernel = weight.kernel.value
    if weight.act_spec is None:
        return float8_weight_only_linear_any(x, weight.qdata, weight.scale, bias, weight.spec, kernel)
    return float8_activation_linear(
        x, weight.qdata, weight.scale, bias, weight.spec, weight.act_spec, kernel, weight.act_scale
    )


register_linear_ops(Float8Tensor, _run_linear)
register_layout_ops(Float8Tensor)
