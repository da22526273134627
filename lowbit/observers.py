"""Observers: modules that watch tensors pass by and turn their ranges into static qparams.

An observer is an ``nn.Module`` whose ``forward(x)`` returns ``x`` unchanged and records a
per-block range in float32 buffers; ``calculate_qparams()`` hands that range to the same
primitives dynamic quantization uses (``choose_qparams_affine_from_min_max`` for integer
formats, ``choose_qparams_float8_from_amax`` for float8). So an observer that saw exactly one
tensor gives exactly the scale (and zero point) ``choose_qparams_affine`` computes for it.

Blocks come from ``spec.granularity`` (``lowbit.granularity``) on a 2-D view of the input: a
tensor of rank > 2 is seen as ``(-1, shape[-1])`` (leading dims are tokens). Useful choices:
``PerTensor()`` (one static activation scale), ``PerAxis(1)`` (one range per input channel, as
SmoothQuant needs), ``PerRow()`` for weights. The range's shape must be the same for every
batch (a per-token range of a changing token count raises).

Three ways to combine batches:

* ``MinMaxObserver``: running minimum and maximum over every batch;
* ``MovingAverageMinMaxObserver``: exponential moving average of each batch's min and max
  (the first batch initialises it), which forgets rare early outliers;
* ``PercentileObserver``: per batch, the ``percentile``-th and ``(100 - percentile)``-th
  percentiles of each block instead of max and min, averaged over batches weighted by their
  element counts; clips outliers (PerTensor and PerAxis on the 2-D view only).

Every observer also keeps, outside its state dict, the sum of ``|x|`` and the element count over
all batches (``mean_abs``): ``lowbit.static.convert`` compares that typical magnitude with the
chosen scale to name the linears whose static int8 inputs would mostly round to 0.

Edge cases (documented, never NaN): an observer that saw only zeros gives the smallest scale
(``spec.eps``) and zero point 0 (``qmin`` for an asymmetric int range, where 0 maps to ``qmin``);
a batch with NaN or inf raises ``ValueError`` naming the observer (``name``); asking for qparams
before any batch raises ``RuntimeError``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.granularity import PerAxis, PerTensor
from lowbit.primitives.affine import _min_max, choose_qparams_affine_from_min_max
from lowbit.primitives.float8 import choose_qparams_float8_from_amax
from lowbit.spec import QuantSpec

__all__ = ["ObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "make_observer"]


class ObserverBase(nn.Module):
    """Records a per-block float32 range of the tensors it sees (see the module docstring).

    Args:
        spec: the ``QuantSpec`` the qparams are for (its granularity sets the blocks).
        name: a label for error messages (``prepare`` sets the layer's name).

    Buffers:
        min_val, max_val: float32 range per block (empty until the first batch).
        num_batches: int64 count of batches seen.
        abs_sum, abs_count: float64 sum of ``|x|`` and int64 element count over every batch (not
            saved in the state dict: an observer loaded from one has ``mean_abs`` None).
    """

    def __init__(self, spec: QuantSpec, *, name: str = ""):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a lowbit QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.name = name
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("abs_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("abs_count", torch.zeros((), dtype=torch.int64), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for n in ("min_val", "max_val"):  # the range's shape is only known once data was seen
            if prefix + n in state_dict:
                setattr(self, n, torch.empty_like(state_dict[prefix + n], device=getattr(self, n).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype.name}, {self.spec.granularity!r}, batches={int(self.num_batches)}"

    @property
    def has_data(self) -> bool:
        """Whether at least one batch has been observed."""
        return int(self.num_batches) > 0

    @property
    def mean_abs(self) -> float | None:
        """Mean ``|x|`` over every element observed, or None before any batch (or after a state-dict load)."""
        n = int(self.abs_count)
        return float(self.abs_sum) / n if n else None

    def _label(self) -> str:
        return f"observer {self.name!r}" if self.name else type(self).__name__

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self._label()} observes floating tensors, got {got}")
        if x.dim() == 0 or x.numel() == 0:
            raise ValueError(f"{self._label()} got an empty or 0-d tensor of shape {tuple(x.shape)}")
        x = x.detach()
        return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mn, mx = _min_max(x, self.spec.block_size(x.shape))
        return mn, mx

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor, count: int) -> None:
        self.min_val = torch.minimum(self.min_val, mn)
        self.max_val = torch.maximum(self.max_val, mx)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``'s range and return ``x`` unchanged."""
        v = self._view(x)
        mn, mx = self._batch_range(v)
        if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(mx).all())):
            raise ValueError(f"{self._label()}: a calibration batch contains NaN or inf; clean the data first")
        if not self.has_data:
            self.min_val, self.max_val = mn, mx
        else:
            if mn.shape != self.min_val.shape:
                raise ValueError(
                    f"{self._label()}: range shape {tuple(mn.shape)} differs from the earlier batches' "
                    f"{tuple(self.min_val.shape)}; granularity {self.spec.granularity!r} must give one shape per batch"
                )
            self._combine(mn, mx, v.numel())
        self.abs_sum += v.abs().sum(dtype=torch.float64)
        self.abs_count += v.numel()
        self.num_batches += 1
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` from the recorded range, by the primitives.

        Returns:
            Integer spec: ``choose_qparams_affine_from_min_max(min_val, max_val, spec)``.
            Float8 spec: ``(choose_qparams_float8_from_amax(max(-min_val, max_val), spec), None)``.

        Raises:
            RuntimeError: no batch has been observed.
        """
        if not self.has_data:
            raise RuntimeError(f"{self._label()} has seen no data: run calibration batches before asking for qparams")
        if self.spec.dtype.is_float:
            amax = torch.maximum(-self.min_val, self.max_val).clamp(min=0)
            return choose_qparams_float8_from_amax(amax, self.spec), None
        return choose_qparams_affine_from_min_max(self.min_val, self.max_val, self.spec)


class MinMaxObserver(ObserverBase):
    """Running minimum and maximum over every batch."""


class MovingAverageMinMaxObserver(ObserverBase):
    """Exponential moving average of each batch's min and max: ``r += c * (batch - r)``.

    Args:
        spec, name: as ``ObserverBase``.
        averaging_constant: ``c`` in ``(0, 1]`` (1 keeps only the last batch).
    """

    def __init__(self, spec: QuantSpec, *, averaging_constant: float = 0.01, name: str = ""):
        super().__init__(spec, name=name)
        c = averaging_constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(f"averaging_constant={c!r} must be a float in (0, 1]")
        self.averaging_constant = float(c)

    def _combine(self, mn, mx, count):
        c = self.averaging_constant
        self.min_val = self.min_val + c * (mn - self.min_val)
        self.max_val = self.max_val + c * (mx - self.max_val)


class PercentileObserver(ObserverBase):
    """Per batch, the ``percentile``-th / ``(100 - percentile)``-th percentile of each block as
    its max / min, averaged over batches weighted by element count (outliers are clipped).

    Args:
        spec, name: as ``ObserverBase``; granularity ``PerTensor()`` or ``PerAxis`` on the 2-D view.
        percentile: in ``(50, 100]``; 100 gives the plain per-batch min and max.
    """

    def __init__(self, spec: QuantSpec, *, percentile: float = 99.99, name: str = ""):
        super().__init__(spec, name=name)
        p = percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100:
            raise ValueError(f"percentile={p!r} must be a float in (50, 100]")
        if not isinstance(spec.granularity, (PerTensor, PerAxis)):
            raise ValueError(
                f"PercentileObserver granularity={spec.granularity!r}; allowed: PerTensor(), PerAxis(0 or 1)"
            )
        self.percentile = float(p)
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64))

    def _batch_range(self, x):
        g = self.spec.granularity
        if isinstance(g, PerTensor):
            v, keep = x.reshape(-1, 1), None  # (n, 1): reduce dim 0
        else:
            keep = g.axis % 2
            v = x if keep == 1 else x.t()  # reduce dim 0, keep one column per index of `keep`
        n = v.shape[0]
        hi_k = max(1, min(n, math.ceil(self.percentile / 100 * n)))
        lo_k = max(1, n + 1 - hi_k)
        vf = v.float()
        mx = torch.kthvalue(vf, hi_k, dim=0).values
        mn = torch.kthvalue(vf, lo_k, dim=0).values
        shape = (1, 1) if keep is None else ((1, -1) if keep == 1 else (-1, 1))
        return mn.reshape(shape), mx.reshape(shape)

    def _combine(self, mn, mx, count):
        w = count / (float(self._count) + count)
        self.min_val = self.min_val + w * (mn - self.min_val)
        self.max_val = self.max_val + w * (mx - self.max_val)

    @torch.no_grad()
    def forward(self, x):
        out = super().forward(x)
        self._count += self._view(x).numel()
        return out


_OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver, "percentile": PercentileObserver}


def make_observer(kind: str, spec: QuantSpec, *, name: str = "", **kwargs) -> ObserverBase:
    """An observer by name: ``"minmax"``, ``"moving_average"`` (``averaging_constant=``) or
    ``"percentile"`` (``percentile=``).

    Raises:
        ValueError: an unknown ``kind``.
    """
    cls = _OBSERVERS.get(kind)
    if cls is None:
        raise ValueError(f"observer={kind!r}; allowed: {sorted(_OBSERVERS)}")
    return cls(spec, name=name, **kwargs)
