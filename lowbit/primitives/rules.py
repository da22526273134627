"""Named scale rules beyond plain min/max, shared by PTQ tensors and QAT.

Each rule only chooses scales; the quantized values are still made by ``quantize_affine`` /
``quantize_float8`` with those scales, so every path that uses a rule quantizes identically.

``float8_row_scale``: per-row float8 scale ``max(amax_row, eps) / fmax`` (eps ``FLOAT8_ROW_EPS``).

``int4_maxabs_group_scale``: per-group int4 scale ``max(amax_group, eps) / 8`` (eps
``INT4_MAXABS_EPS``): the full-range symmetric rule of the fast fp8 x int4 GPU kernels. The
largest magnitude maps to 8, so a positive maximum clamps to 7 and a negative one lands on -8.

``float8_then_int4``: the weight rule of ``Float8DynamicActivationInt4WeightConfig``: the weight
is first rounded to float8 (e4m3fn) per row, and the int4 step then quantizes those float8
values (in the unscaled float8 domain) per group with the max-abs rule. The weight stands for
``(q * group_scale) * row_scale``.
"""

from __future__ import annotations

import torch

from lowbit.granularity import PerGroup
from lowbit.primitives.affine import _abs_max, _check_finite, _check_float, _div, quantize_affine
from lowbit.primitives.float8 import quantize_float8
from lowbit.spec import QuantSpec

__all__ = [
    "FLOAT8_ROW_EPS",
    "INT4_MAXABS_EPS",
    "float8_row_scale",
    "int4_maxabs_group_scale",
    "float8_then_int4",
    "float8_then_int4_scale",
    "int4_maxabs_spec",
]

FLOAT8_ROW_EPS = 1e-12  # smallest row amax of the float8 step
INT4_MAXABS_EPS = 1e-6  # smallest group amax of the int4 step
_INT4_MAXABS_DIVISOR = 8.0  # 2 ** (bits - 1): amax maps to 8, clamped to [-8, 7]


def _check_weight(w: torch.Tensor, name: str = "weight") -> None:
    _check_float(w, name)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (out, in) tensor, got shape {tuple(w.shape)}")


def float8_row_scale(
    w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, eps: float = FLOAT8_ROW_EPS, *, check_finite: bool = True
) -> torch.Tensor:
    """Per-row float8 scale ``max(amax_row, eps) / finfo(dtype).max``, float32 (out, 1)."""
    _check_weight(w)
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"dtype={dtype}; allowed: torch.float8_e4m3fn, torch.float8_e5m2")
    amax = _abs_max(w.detach(), (1, w.shape[1]))
    if check_finite:
        _check_finite(amax)
    return _div(amax.clamp(min=eps), torch.finfo(dtype).max)


def int4_maxabs_spec(group_size: int) -> QuantSpec:
    """The int4 spec the max-abs rule's scales are used with (symmetric, [-8, 7], per group)."""
    return QuantSpec("int4", PerGroup(group_size), symmetric=True, eps=INT4_MAXABS_EPS / _INT4_MAXABS_DIVISOR)


def int4_maxabs_group_scale(
    w: torch.Tensor, group_size: int, eps: float = INT4_MAXABS_EPS, *, check_finite: bool = True
) -> torch.Tensor:
    """Per-group int4 scale ``max(amax_group, eps) / 8``, float32 (out, in // group_size).

    Raises:
        ValueError: ``in`` not divisible by ``group_size``.
    """
    _check_weight(w)
    if not isinstance(group_size, int) or group_size <= 0 or w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing in_features={w.shape[1]}")
    amax = _abs_max(w.detach(), (1, group_size))
    if check_finite:
        _check_finite(amax)
    return amax.float().clamp(min=eps) / _INT4_MAXABS_DIVISOR


def float8_then_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight with the fp8-then-int4 rule.

    Args:
        w: float (out, in) weight.
        group_size: int4 group size along ``in``.

    Returns:
        ``(q, group_scale, row_scale)``: int4 values in [-8, 7] (int8 storage, out x in), float32
        group scales (out, in // group_size) in the float8 domain, float32 row scales (out, 1).
        ``w ~= (q * group_scale) * row_scale``.
    """
    row_scale = float8_row_scale(w)
    w8 = quantize_float8(w, row_scale, QuantSpec("float8_e4m3fn", eps=FLOAT8_ROW_EPS)).float()
    group_scale = int4_maxabs_group_scale(w8, group_size)
    q = quantize_affine(w8, group_scale, None, int4_maxabs_spec(group_size))
    return q, group_scale, row_scale


def float8_then_int4_scale(group_scale: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """The one per-group scale an int4 tensor stores for the fp8-then-int4 rule:
    ``group_scale * row_scale`` in float32, so the weight dequantizes as ``q * scale``."""
    return group_scale.float() * row_scale.float()
