"""QuantSpec: the one description of how to quantize a tensor (PTQ tensors, observers, QAT)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lowbit.dtypes import QDType, get_qdtype
from lowbit.granularity import Granularity, PerTensor, block_size

__all__ = ["QuantSpec", "INT_EPS", "FLOAT8_EPS", "spec_key", "spec_from_key"]

# Smallest scale a spec allows unless told otherwise; explicit so nothing depends on the
# input dtype. Integer formats: float32 machine epsilon. Float8: 1e-12 (scale = amax / fmax).
INT_EPS: float = float(torch.finfo(torch.float32).eps)
FLOAT8_EPS: float = 1e-12

_SCALE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _scale_steps(qmin: int, qmax: int, symmetric: bool, signed: bool) -> int:
    """The divisor of an integer spec's scale (``lowbit.primitives.affine``): the number of steps
    the range (asymmetric) or ``amax`` (symmetric; unsigned around the midpoint) maps onto."""
    if not symmetric:
        return qmax - qmin
    if signed:
        return min(qmax, -qmin)
    mid = (qmin + qmax + 1) // 2
    return min(qmax - mid, mid - qmin)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Args:
        dtype: the quantized format: a name (``"int8"``, ``"uint4"``, ``"float8_e4m3fn"``), a
            torch dtype (``torch.int8``) or a ``QDType``; stored as the ``QDType``.
        granularity: which elements share a scale (``lowbit.granularity``).
        symmetric: True: ``scale = amax / qmax`` over a signed range with no zero point (for an
            unsigned dtype, the zero point is the fixed midpoint). False: the range is
            ``[min(x, 0), max(x, 0)]`` with an integer zero point, so 0 is exactly representable.
        eps: smallest allowed scale. ``None`` picks ``INT_EPS`` for integer formats and
            ``FLOAT8_EPS`` for float8; after construction it is always a float.
        scale_dtype: dtype scales are stored in; float32 by default (see ARCHITECTURE.md).
        zero_point_domain: ``"int"`` (integer zero point, ``x = (q - zp) * s``) or ``"float"``
            (unrounded float zero point in the same formula, as HQQ optimizes it). Asymmetric only.
        zero_point_dtype: storage of the zero point; ``None`` picks int32 for the int domain and
            float32 for the float domain.
        quant_min, quant_max: a narrower integer range than the dtype's (e.g. -127..127).

    Raises:
        ValueError: an asymmetric float8 spec, a non-positive eps, qmin > qmax, a range outside
            the dtype, an unknown zero-point domain or scale dtype.

    Example:
        >>> QuantSpec("int8", PerToken()).qmax
        127
    """

    dtype: QDType | str | torch.dtype
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    eps: float | None = None
    scale_dtype: torch.dtype = torch.float32
    zero_point_domain: Literal["int", "float"] = "int"
    zero_point_dtype: torch.dtype | None = None
    quant_min: int | None = None
    quant_max: int | None = None

    def __post_init__(self):
        qd = get_qdtype(self.dtype)
        object.__setattr__(self, "dtype", qd)
        if not isinstance(self.granularity, Granularity):
            raise TypeError(f"granularity={self.granularity!r} is not a lowbit Granularity")
        if qd.is_float:
            if not self.symmetric:
                raise ValueError(f"symmetric=False is not allowed for {qd.name}: float8 scaling is symmetric")
            if self.quant_min is not None or self.quant_max is not None:
                raise ValueError(f"quant_min/quant_max are not allowed for {qd.name}")
        eps = self.eps
        if eps is None:
            eps = FLOAT8_EPS if qd.is_float else INT_EPS
        if not isinstance(eps, (int, float)) or not eps > 0 or eps != eps:
            raise ValueError(f"eps={self.eps!r} must be a positive finite float")
        object.__setattr__(self, "eps", float(eps))
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype} is not allowed; allowed: {list(_SCALE_DTYPES)}")
        if self.zero_point_domain not in ("int", "float"):
            raise ValueError(f"zero_point_domain={self.zero_point_domain!r}; allowed: 'int', 'float'")
        if self.zero_point_domain == "float" and self.symmetric:
            raise ValueError("zero_point_domain='float' needs symmetric=False")
        if self.zero_point_dtype is None and not qd.is_float:
            zdt = torch.float32 if self.zero_point_domain == "float" else torch.int32
            object.__setattr__(self, "zero_point_dtype", zdt)
        lo = qd.qmin if self.quant_min is None else self.quant_min
        hi = qd.qmax if self.quant_max is None else self.quant_max
        if lo > hi:
            raise ValueError(f"quant_min={lo} > quant_max={hi}: the range is empty")
        if lo < qd.qmin or hi > qd.qmax:
            raise ValueError(f"quant range [{lo}, {hi}] is outside {qd.name}'s [{qd.qmin}, {qd.qmax}]")
        if not qd.is_float and _scale_steps(lo, hi, self.symmetric, qd.is_signed) < 1:
            need = "a step on each side of zero (or of the unsigned midpoint)" if self.symmetric else "two values"
            raise ValueError(
                f"quant range [{lo}, {hi}] of {qd.name} (symmetric={self.symmetric}) has no room for {need}: "
                "the scale would be infinite; widen quant_min/quant_max" + (" or use symmetric=False" if self.symmetric else "")
            )

    @property
    def qmin(self):
        """The smallest quantized value (``quant_min`` if given, else the dtype's)."""
        return self.dtype.qmin if self.quant_min is None else self.quant_min

    @property
    def qmax(self):
        """The largest quantized value (``quant_max`` if given, else the dtype's)."""
        return self.dtype.qmax if self.quant_max is None else self.quant_max

    @property
    def has_zero_point(self) -> bool:
        """Whether quantize/dequantize carry a zero point tensor."""
        return not self.dtype.is_float and (not self.symmetric or not self.dtype.is_signed)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_key"}  # the cached spec_key stays behind

    def block_size(self, shape) -> tuple[int, ...]:
        """``lowbit.granularity.block_size(self.granularity, shape)``."""
        return block_size(self.granularity, shape)


# --- specs through custom ops --------------------------------------------------------------------
# A torch.library custom op takes tensors, numbers and strings only. A quantized tensor hands its
# spec to an op as ``spec_key(spec)`` (a string, a constant in a compiled graph) and the op gets the
# very same object back with ``spec_from_key``: the kernels read the spec the tensor stores instead
# of guessing it from dtypes and shapes.
_BY_KEY: dict[str, QuantSpec] = {}


def spec_key(spec: QuantSpec) -> str:
    """A string naming ``spec`` (its repr), registered so that ``spec_from_key`` returns ``spec``."""
    key = getattr(spec, "_key", None)  # cached on the (frozen) spec: no repr on a hot path
    if key is None or key not in _BY_KEY:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        key = repr(spec)
        _BY_KEY.setdefault(key, spec)
        object.__setattr__(spec, "_key", key)  # not a field: equality, hash and repr ignore it
    return key


def spec_from_key(key: str) -> QuantSpec:
    """The ``QuantSpec`` registered under ``key`` by ``spec_key``.

    Raises:
        ValueError: no spec was registered under ``key`` in this process.
    """
    try:
        return _BY_KEY[key]
    except KeyError:
        raise ValueError(f"spec key {key!r} names no QuantSpec registered in this process (use spec_key(spec))") from None
