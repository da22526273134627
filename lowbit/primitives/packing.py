"""Int4 nibble packing: two 4-bit values per byte along the last dim.

Layout: byte ``j`` of a row holds element ``2j`` in its low nibble and ``2j + 1`` in its high
nibble. Signed values are stored as 4-bit two's complement. The packed tensor is uint8.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 (``[-8, 7]``, int8 storage) or uint4 (``[0, 15]``, uint8) values.

    Args:
        values: int8 or uint8 tensor of rank >= 1 with an even last dim.

    Returns:
        uint8 tensor with the last dim halved.

    Raises:
        TypeError: a dtype other than int8/uint8. ValueError: an odd last dim or a value out of range.
    """
    if values.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"values must be int8 (int4) or uint8 (uint4), got {values.dtype}")
    if values.dim() == 0 or values.shape[-1] % 2:
        raise ValueError(f"values must have an even last dim to pack two per byte, got shape {tuple(values.shape)}")
    lo, hi = (-8, 7) if values.dtype == torch.int8 else (0, 15)
    if values.numel() and not torch.compiler.is_compiling():
        vmin, vmax = int(values.min()), int(values.max())
        if vmin < lo or vmax > hi:
            raise ValueError(f"values span [{vmin}, {vmax}], outside the 4-bit range [{lo}, {hi}] of {values.dtype}")
    v = values.to(torch.int16) & 0xF
    return (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 in ``[-8, 7]`` if ``signed`` else uint8 in ``[0, 15]``.

    Raises:
        TypeError: ``packed`` is not uint8.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have rank >= 1, got a 0-d tensor")
    lo = packed & 0xF
    hi = packed >> 4
    out = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return (out.to(torch.int8) << 4) >> 4
    return out
