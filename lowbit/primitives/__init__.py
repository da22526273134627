"""Numerics primitives: the only place quantization math lives (see ARCHITECTURE.md)."""

from lowbit.primitives.affine import (
    choose_qparams_affine,
    choose_qparams_affine_from_min_max,
    dequantize_affine,
    fake_quantize_affine,
    quantize_affine,
    round_ste,
)
from lowbit.primitives.float8 import (
    choose_qparams_float8,
    choose_qparams_float8_from_amax,
    dequantize_float8,
    fake_quantize_float8,
    quantize_float8,
)
from lowbit.primitives.packing import pack_int4, unpack_int4

__all__ = [
    "choose_qparams_affine",
    "choose_qparams_affine_from_min_max",
    "quantize_affine",
    "dequantize_affine",
    "fake_quantize_affine",
    "round_ste",
    "choose_qparams_float8",
    "choose_qparams_float8_from_amax",
    "quantize_float8",
    "dequantize_float8",
    "fake_quantize_float8",
    "pack_int4",
    "unpack_int4",
]
