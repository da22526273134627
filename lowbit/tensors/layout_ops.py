"""Slicing, indexing and view ops shared by the blocked quantized tensors.

A blocked tensor has a logical shape, a ``qdata`` tensor holding one value per element (or, for
packed formats, ``pack`` values per storage element along the last dim) and qparam tensors
(``scale``, ``zero_point``, ...) of the same rank whose dims are either 1 (one block spans the
dim) or ``shape[d] // block[d]``. These ops move qdata and every qparam together:

* ``slice``/``narrow`` on any dim (step 1): qparams are sliced with it; a slice that cuts through a
  block raises; on a packed last dim the bounds must be multiples of ``pack``;
* ``select`` (not on a packed last dim), ``index_select``/``index`` on dim 0, ``embedding``
  (dequantizes the gathered rows; a tensor that quantizes activations too: the rows of the weight it
  stands for, since a lookup has no activation);
* ``view``/``reshape`` of the leading dims (the last dim and its blocks stay), or of any shape
  when every qparam has one element.

``register_linear_ops(cls, run)`` registers ``F.linear``/``aten.linear`` (and, for unpacked
formats, ``t``/``mm``/``addmm`` of the transposed weight) around ``run(x_2d, weight, bias)``,
with the argument checks every tensor shares.

``register_layout_ops(cls)`` registers them on a ``QuantizedTensor`` subclass that declares
``qparam_names`` (its blocked qparam fields) and ``pack`` (values per qdata element along the
last dim).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.tensors.base import QuantizedTensor

__all__ = ["register_layout_ops", "register_linear_ops"]

aten = torch.ops.aten


def _qparams(self) -> list[str]:
    return [n for n in self.qparam_names if getattr(self, n) is not None]


def _storage_len(self, dim: int, start: int, length: int) -> tuple[int, int]:
    """Start and length in qdata for a logical range on ``dim`` (packed last dim: divided by ``pack``)."""
    if dim != self.dim() - 1 or self.pack == 1:
        return start, length
    if start % self.pack or length % self.pack:
        raise ValueError(
            f"{type(self).__name__}: range [{start}:{start + length}] on the last dim splits a byte of "
            f"{self.pack} packed values; use multiples of {self.pack}"
        )
    return start // self.pack, length // self.pack


def slice_dim(self, dim: int, start: int, end: int):
    """Rows/columns ``[start:end]`` on ``dim`` with every qparam sliced along."""
    name = type(self).__name__
    dim = dim % self.dim()
    size = self.shape[dim]
    start, end = max(0, min(start, size)), max(0, min(end, size))
    if end <= start:
        raise ValueError(f"empty slice [{start}:{end}] on dim {dim} of {name} {tuple(self.shape)}")
    s0, n0 = _storage_len(self, dim, start, end - start)
    new = {"qdata": self.qdata.narrow(dim, s0, n0)}
    for n in _qparams(self):
        t = getattr(self, n)
        if t.shape[dim] != 1:  # blocks span less than the dim: slice the qparam with it
            b = size // t.shape[dim]
            if start % b or end % b:
                raise ValueError(
                    f"slice [{start}:{end}] on dim {dim} of {name} cuts through a quantization block of "
                    f"{b} ({n}); slice at multiples of {b}"
                )
            t = t.narrow(dim, start // b, (end - start) // b)
        new[n] = t
    shape = list(self.shape)
    shape[dim] = end - start
    return self._replace(shape=shape, **new)


def index_rows(self, index: torch.Tensor):
    """Rows ``index`` (1-D) of dim 0, qparams gathered along."""
    name = type(self).__name__
    if index.dim() != 1:
        raise NotImplementedError(f"{name} indexing takes a 1-D index on dim 0, got shape {tuple(index.shape)}")
    new = {"qdata": self.qdata.index_select(0, index)}
    for n in _qparams(self):
        t = getattr(self, n)
        if t.shape[0] == self.shape[0]:
            t = t.index_select(0, index)
        elif t.shape[0] != 1:
            raise ValueError(f"indexing rows of a {name} whose {n} blocks span {self.shape[0] // t.shape[0]} rows")
        new[n] = t
    return self._replace(shape=(index.numel(), *self.shape[1:]), **new)


def view(self, shape):
    """A view with new leading dims (or any shape when every qparam has one element)."""
    name = type(self).__name__
    shape = list(shape)
    if -1 in shape:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = self.numel() // max(known, 1)
    shape = torch.Size(shape)
    if shape.numel() != self.numel():
        raise ValueError(f"cannot view {name} of shape {tuple(self.shape)} as {tuple(shape)}")
    if shape == self.shape:
        return self._apply_to_tensors(lambda t: t)
    names = _qparams(self)
    if len(shape) == 0 or shape[-1] % self.pack:
        raise ValueError(f"cannot view {name} as {tuple(shape)}: the last dim must be a multiple of {self.pack}")
    qshape = (*shape[:-1], shape[-1] // self.pack)
    if all(getattr(self, n).numel() == 1 for n in names):  # one scale: any shape works
        new = {n: getattr(self, n).reshape((1,) * len(shape)) for n in names}
        return self._replace(shape=shape, qdata=self.qdata.reshape(qshape), **new)
    lead = self.dim() - 1
    lead_full = all(
        all(getattr(self, n).shape[d] == 1 for d in range(lead))
        or all(getattr(self, n).shape[d] == self.shape[d] for d in range(lead))
        for n in names
    )
    if lead_full and shape[-1] == self.shape[-1]:  # fold/unfold leading dims
        new = {}
        for n in names:
            t = getattr(self, n)
            ones = all(t.shape[d] == 1 for d in range(lead))
            new[n] = t.reshape(*([1] * (len(shape) - 1) if ones else shape[:-1]), t.shape[-1])
        return self._replace(shape=shape, qdata=self.qdata.reshape(qshape), **new)
    raise ValueError(
        f"cannot view {name} of shape {tuple(self.shape)} as {tuple(shape)}: only leading dims may "
        "change while the last dim and its blocks stay"
    )


def register_layout_ops(cls: type[QuantizedTensor]) -> None:
    """Register slice/select/index/embedding/view on ``cls`` (see the module docstring)."""
    name = cls.__name__

    @cls.implements(aten.slice.Tensor)
    def _(func, types, args, kwargs):
        self, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0))
        start = args[2] if len(args) > 2 else kwargs.get("start")
        end = args[3] if len(args) > 3 else kwargs.get("end")
        step = args[4] if len(args) > 4 else kwargs.get("step", 1)
        if step != 1:
            raise NotImplementedError(f"{name} slice with step={step}: only step 1 keeps the block layout")
        size = self.shape[dim]
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        return slice_dim(self, dim, start, end)

    @cls.implements(aten.select.int)
    def _(func, types, args, kwargs):
        self, dim, index = args
        dim = dim % self.dim()
        if self.dim() < 2:
            raise ValueError(f"select on a 1-D {name} would give a 0-d tensor; dequantize() first")
        if dim == self.dim() - 1 and self.pack != 1:
            raise NotImplementedError(f"{name} select on the packed last dim; dequantize() first")
        index = index + self.shape[dim] if index < 0 else index
        sliced = slice_dim(self, dim, index, index + 1)
        shape = [s for i, s in enumerate(sliced.shape) if i != dim]
        return sliced._apply_to_tensors(lambda t: t.squeeze(dim) if t.dim() == self.dim() else t, shape=shape)

    @cls.implements(aten.index_select.default)
    def _(func, types, args, kwargs):
        self, dim, index = args
        if dim % self.dim() != 0:
            raise NotImplementedError(f"{name} index_select on dim {dim}: only dim 0 is supported")
        return index_rows(self, index)

    @cls.implements(aten.index.Tensor)
    def _(func, types, args, kwargs):
        self, indices = args
        if len(indices) != 1 or indices[0] is None:
            raise NotImplementedError(f"{name} indexing supports one index tensor on dim 0 (w[idx])")
        index = indices[0]
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        rows = index_rows(self, index.reshape(-1))
        return rows if index.dim() == 1 else view(rows, (*index.shape, *self.shape[1:]))

    @cls.implements(aten.embedding.default)
    def _(func, types, args, kwargs):
        # a lookup has no activation to quantize: a tensor with an act_spec (a tied head's W8A8 weight, say)
        # gives the rows of the weight it stands for, act_pre_scale included, as dequantize() does
        weight, indices = args[0], args[1]
        rows = index_rows(weight, indices.reshape(-1))
        return rows.dequantize().reshape(*indices.shape, weight.shape[-1])

    @cls.implements([aten.view.default, aten.reshape.default, aten._unsafe_view.default])
    def _(func, types, args, kwargs):
        return view(args[0], args[1])


def register_linear_ops(cls: type[QuantizedTensor], run: Callable) -> None:
    """Register ``F.linear`` and friends on ``cls``; ``run(x, weight, bias)`` gets a 2-D ``x``."""
    name = cls.__name__

    def linear(input, weight, bias):
        if isinstance(input, QuantizedTensor) or not isinstance(weight, cls):
            raise NotImplementedError(
                f"linear with input {type(input).__name__} and weight {type(weight).__name__}: "
                f"lowbit runs float input x {name} weight only"
            )
        # the weight's own metadata (dim, shape, dtype) without a __torch_function__ round trip each
        # (~2.5 us apiece at decode, where a small layer's kernel takes ~10 us)
        # (only the checks: the kernels below run with torch functions enabled, as before)
        with torch._C.DisableTorchFunctionSubclass():
            w_dim, w_shape, w_dtype = weight.dim(), tuple(weight.shape), weight.dtype
        if w_dim != 2:
            raise ValueError(f"linear needs a 2-D weight, got shape {w_shape}")
        n, k = w_shape
        if input.dim() == 0 or input.shape[-1] != k:
            raise ValueError(f"input shape {tuple(input.shape)} does not end in in_features={k}")
        if input.dtype != w_dtype:
            raise TypeError(f"input dtype {input.dtype} != weight dtype {w_dtype}; cast one (model.to(dtype))")
        if bias is not None and bias.dtype != input.dtype:  # F.linear refuses it too; the kernels would promote
            raise TypeError(f"bias dtype {bias.dtype} != input dtype {input.dtype}; cast one (model.to(dtype))")
        if input.dim() == 2:  # already (M, K): no reshapes to and from it
            return run(input, weight, bias)
        out = run(input.reshape(-1, k), weight, bias)
        return out.reshape(*input.shape[:-1], n)

    @cls.implements_torch_function(F.linear)
    def _(func, types, args, kwargs):
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return linear(args[0], args[1], bias)

    @cls.implements(aten.linear.default)
    def _(func, types, args, kwargs):
        return linear(args[0], args[1], args[2] if len(args) > 2 else None)

    @cls.implements(aten.t.default)
    def _(func, types, args, kwargs):
        self = args[0]
        if self.pack != 1:
            raise NotImplementedError(
                f"{name}.t(): the values are packed along in_features, a transposed view would unpack "
                "them; call F.linear(x, weight) (or weight.dequantize().t())"
            )
        if self.dim() != 2:
            raise ValueError(f"t() needs a 2-D {name}, got shape {tuple(self.shape)}")
        return self._apply_to_tensors(lambda t: t.t() if t.dim() == 2 else t, shape=self.shape[::-1])

    @cls.implements(aten.mm.default)
    def _(func, types, args, kwargs):
        return linear(args[0], args[1].t(), None)  # x @ W.T where args[1] is W.T

    @cls.implements(aten.addmm.default)
    def _(func, types, args, kwargs):
        bias, x, wt = args[0], args[1], args[2]
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            raise NotImplementedError(f"{name} addmm supports beta=1, alpha=1 only")
        return linear(x, wt.t(), bias)
