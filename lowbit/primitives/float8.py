"""Float8 scaling: scale from amax, saturating quantize, dequantize, fake quantize.

``scale = clamp(amax / finfo(dtype).max, min=spec.eps)`` per block, in float32;
quantize: ``clamp(x / scale, -fmax, fmax).to(float8)`` (the cast rounds to nearest even; the
clamp makes it saturate instead of producing NaN); dequantize: ``q.float() * scale`` cast once.
"""

from __future__ import annotations

import torch

from lowbit.primitives.affine import _abs_max, _block_from_scale, _blocked_shape, _check_finite, _check_float, _div, _expand
from lowbit.spec import QuantSpec

__all__ = [
    "choose_qparams_float8",
    "choose_qparams_float8_from_amax",
    "quantize_float8",
    "dequantize_float8",
    "fake_quantize_float8",
]


def _check_spec(spec: QuantSpec) -> torch.dtype:
    if not spec.dtype.is_float:
        raise ValueError(f"spec.dtype={spec.dtype.name} is an integer format: use lowbit.primitives.affine")
    return spec.dtype.storage


def choose_qparams_float8_from_amax(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-block scale ``clamp(amax / fmax, eps)`` in ``spec.scale_dtype`` (observers use this)."""
    _check_spec(spec)
    return torch.clamp(_div(amax.float(), spec.dtype.qmax), min=spec.eps).to(spec.scale_dtype)


def choose_qparams_float8(input: torch.Tensor, spec: QuantSpec, *, check_finite: bool = True) -> torch.Tensor:
    """Per-block float8 scale for ``input`` (blocks from ``spec.granularity``).

    Args:
        input: floating-point tensor of rank >= 1.
        spec: a float8 ``QuantSpec``.
        check_finite: raise on NaN/inf (eager only); hot paths pass False and get a NaN/inf scale.

    Returns:
        scale shaped ``input.shape[i] // block_size[i]``.

    Raises:
        TypeError: non-floating input. ValueError: empty input, NaN/inf, integer spec.
    """
    _check_float(input)
    _check_spec(spec)
    if input.numel() == 0:
        raise ValueError(f"input is empty (shape {tuple(input.shape)}): no scale can be chosen from no values")
    amax = _abs_max(input.detach(), spec.block_size(input.shape))
    if check_finite:
        _check_finite(amax)
    return choose_qparams_float8_from_amax(amax, spec)


def _scaled(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, inplace: bool = False) -> torch.Tensor:
    """``clamp(x / scale, -fmax, fmax)`` in float32; ``inplace``: on one private copy (no autograd)."""
    block = _block_from_scale(x.shape, scale)
    shape = _blocked_shape(x.shape, block)
    fmax = spec.dtype.qmax
    if inplace:
        return x.to(torch.float32, copy=True).reshape(shape).div_(_expand(scale.float())).clamp_(-fmax, fmax)
    return torch.clamp(x.float().reshape(shape) / _expand(scale.float()), -fmax, fmax)


def quantize_float8(input: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Saturating cast of ``input / scale`` to the spec's float8 dtype, shape of ``input``."""
    _check_float(input)
    dt = _check_spec(spec)
    return _scaled(input, scale, spec, inplace=True).to(dt).reshape(input.shape)


def dequantize_float8(
    qdata: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, output_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``qdata.float() * scale`` in float32, one cast to ``output_dtype``.

    Raises:
        TypeError: ``qdata`` not in the spec's float8 dtype, non-floating ``output_dtype``.
    """
    dt = _check_spec(spec)
    if qdata.dtype != dt:
        raise TypeError(f"qdata has dtype {qdata.dtype} but spec dtype is {dt}")
    if not output_dtype.is_floating_point:
        raise TypeError(f"output_dtype={output_dtype} must be a floating dtype")
    if qdata.dim() == 0:
        raise ValueError("qdata must have rank >= 1, got a 0-d tensor")
    block = _block_from_scale(qdata.shape, scale)
    qb = qdata.to(torch.float32).reshape(_blocked_shape(qdata.shape, block))  # a new buffer
    return qb.mul_(_expand(scale.float())).reshape(qdata.shape).to(output_dtype)


class _Float8RoundSTE(torch.autograd.Function):
    """Round-trip through a float8 dtype with an identity gradient."""

    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).float()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_float8(input: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_float8(quantize_float8(x))`` in ``input.dtype`` with a straight-through gradient.

    Bit-for-bit equal to the two-step path. The gradient is the identity inside ``[-fmax, fmax]``
    (after scaling) and zero where the value saturated.
    """
    _check_float(input)
    dt = _check_spec(spec)
    if scale is None:
        scale = choose_qparams_float8(input.detach(), spec)
    q = _Float8RoundSTE.apply(_scaled(input, scale, spec), dt)
    return (q * _expand(scale.float())).reshape(input.shape).to(input.dtype)
