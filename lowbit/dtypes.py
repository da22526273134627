"""The table of quantized dtypes: bits, range and storage dtype. The only place bounds live."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QDType", "QDTYPES", "get_qdtype"]


@dataclass(frozen=True)
class QDType:
    """A quantized number format.

    Attributes:
        name: canonical name, e.g. ``"int8"``, ``"uint4"``, ``"float8_e4m3fn"``.
        bits: bits per value.
        qmin: smallest representable value (for float8, ``-finfo.max``).
        qmax: largest representable value (for float8, ``finfo.max``).
        storage: torch dtype holding one unpacked value (int8 for signed integers, uint8 for
            unsigned, the float8 dtype itself for float8).
        is_float: True for the float8 formats.
    """

    name: str
    bits: int
    qmin: float
    qmax: float
    storage: torch.dtype
    is_float: bool = False

    @property
    def is_signed(self) -> bool:
        return self.qmin < 0

    def __repr__(self) -> str:
        return f"QDType({self.name})"


def _build_table() -> dict[str, QDType]:
    table: dict[str, QDType] = {}
    for bits in range(1, 9):
        table[f"int{bits}"] = QDType(f"int{bits}", bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8)
        table[f"uint{bits}"] = QDType(f"uint{bits}", bits, 0, 2**bits - 1, torch.uint8)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        name = str(fp8).removeprefix("torch.")
        fmax = float(torch.finfo(fp8).max)
        table[name] = QDType(name, 8, -fmax, fmax, fp8, is_float=True)
    return table


QDTYPES: dict[str, QDType] = _build_table()

# torch dtypes that name a quantized format unambiguously.
_FROM_TORCH = {
    torch.int8: QDTYPES["int8"],
    torch.uint8: QDTYPES["uint8"],
    torch.float8_e4m3fn: QDTYPES["float8_e4m3fn"],
    torch.float8_e5m2: QDTYPES["float8_e5m2"],
}


def get_qdtype(dtype: QDType | str | torch.dtype) -> QDType:
    """Look up a quantized dtype by name, torch dtype, or pass a ``QDType`` through.

    Args:
        dtype: ``"int4"``, ``"uint8"``, ``"float8_e4m3fn"``, ``torch.int8``, ... or a ``QDType``.

    Returns:
        The table entry.

    Raises:
        ValueError: the name or torch dtype is not a quantized format of the table.

    Example:
        >>> get_qdtype("int4").qmin, get_qdtype(torch.int8).qmax
        (-8, 127)
    """
    if isinstance(dtype, QDType):
        return dtype
    if isinstance(dtype, torch.dtype):
        if dtype in _FROM_TORCH:
            return _FROM_TORCH[dtype]
        raise ValueError(
            f"dtype={dtype} is not a quantized dtype; allowed torch dtypes: "
            f"{sorted(str(d) for d in _FROM_TORCH)} or a name from {sorted(QDTYPES)}"
        )
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in QDTYPES:
        return QDTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is not a quantized dtype; allowed: {sorted(QDTYPES)}")
