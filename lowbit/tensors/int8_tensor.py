"""Int8Tensor: int8 values with a float32 scale per block, for weights (and their activations).

Fields:
    qdata: ``shape`` int8.
    scale: float32 of the same rank, ``shape[i] // block_size[i]``.
    zero_point: int32 like ``scale``, or None (symmetric).
    act_scale, act_zero_point: static activation qparams (one element each) or None.
    act_spec: ``QuantSpec`` of the activations (int8, ``PerToken`` dynamic or ``PerTensor``
        static), or None for weight-only; when set, ``F.linear`` quantizes its input on the fly.
    kernel: ``KernelPreference`` for the matmul ops.

The logical ``dtype`` is the dtype ``dequantize()`` returns and the activations must have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.granularity import PerTensor, PerToken
from lowbit.kernels.int8 import int8_activation_linear, int8_weight_only_linear, weight_spec
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.affine import _block_from_scale, choose_qparams_affine, dequantize_affine, quantize_affine
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor

__all__ = ["Int8Tensor"]

aten = torch.ops.aten


class Int8Tensor(QuantizedTensor):
    """Int8 quantized tensor (see the module docstring for the fields)."""

    tensor_data_names = ("qdata", "scale")
    optional_tensor_data_names = ("zero_point", "act_scale", "act_zero_point")
    tensor_attribute_names = ("act_spec", "kernel")

    @classmethod
    def from_float(
        cls,
        input: torch.Tensor,
        spec: QuantSpec,
        *,
        act_spec: QuantSpec | None = None,
        act_scale: torch.Tensor | None = None,
        act_zero_point: torch.Tensor | None = None,
        kernel: KernelPreference = KernelPreference.AUTO,
    ) -> "Int8Tensor":
        """Quantize ``input`` with ``spec`` (int8); scales chosen by the primitives.

        Args:
            input: floating tensor, rank >= 1.
            spec: the weight ``QuantSpec``; its dtype must be int8.
            act_spec: activation spec for W8A8 (int8 with ``PerToken()`` for dynamic, or
                ``PerTensor()`` together with ``act_scale`` for static), or None.
            act_scale, act_zero_point: static activation qparams (one element each).
            kernel: ``KernelPreference`` for the matmul.

        Raises:
            ValueError: a non-int8 spec, an activation spec the kernels don't run, a weight zero
                point combined with activation quantization.
        """
        if spec.dtype.name != "int8":
            raise ValueError(f"Int8Tensor needs an int8 spec, got spec.dtype={spec.dtype.name}")
        _check_act(act_spec, act_scale, act_zero_point, spec)
        scale, zero_point = choose_qparams_affine(input, spec)
        qdata = quantize_affine(input, scale, zero_point, spec)
        return cls(
            qdata=qdata,
            scale=scale.float(),
            zero_point=zero_point,
            act_scale=None if act_scale is None else act_scale.detach().float().reshape(1).to(input.device),
            act_zero_point=None if act_zero_point is None else act_zero_point.detach().int().reshape(1).to(input.device),
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
        spec = weight_spec(self.zero_point is not None)
        return dequantize_affine(self.qdata, self.scale, self.zero_point, spec, output_dtype or self.dtype)


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


# --- matmul -------------------------------------------------------------------------------------


def _linear(input: torch.Tensor, weight: Int8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(input, QuantizedTensor) or not isinstance(weight, Int8Tensor):
        raise NotImplementedError(
            f"linear with input {type(input).__name__} and weight {type(weight).__name__}: "
            "lowbit runs float input x Int8Tensor weight only"
        )
    if weight.dim() != 2:
        raise ValueError(f"linear needs a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if input.dim() == 0 or input.shape[-1] != k:
        raise ValueError(f"input shape {tuple(input.shape)} does not end in in_features={k}")
    if input.dtype != weight.dtype:
        raise TypeError(f"input dtype {input.dtype} != weight dtype {weight.dtype}; cast one (model.to(dtype))")
    x = input.reshape(-1, k)
    kernel = weight.kernel.value
    if weight.act_spec is None:
        out = int8_weight_only_linear(x, weight.qdata, weight.scale, weight.zero_point, bias, kernel)
    else:
        out = int8_activation_linear(
            x, weight.qdata, weight.scale, bias, weight.act_scale, weight.act_zero_point,
            weight.act_spec.symmetric, kernel,
        )
    return out.reshape(*input.shape[:-1], n)


@Int8Tensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    input, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return _linear(input, weight, bias)


@Int8Tensor.implements(aten.linear.default)
def _(func, types, args, kwargs):
    return _linear(args[0], args[1], args[2] if len(args) > 2 else None)


@Int8Tensor.implements([aten.t.default])
def _(func, types, args, kwargs):
    self = args[0]
    if self.dim() != 2:
        raise ValueError(f"t() needs a 2-D Int8Tensor, got shape {tuple(self.shape)}")
    return self._apply_to_tensors(lambda t: t.t() if t.dim() == 2 else t, shape=self.shape[::-1])


@Int8Tensor.implements(aten.mm.default)
def _(func, types, args, kwargs):
    return _linear(args[0], args[1].t(), None)  # x @ W.T where args[1] is W.T


@Int8Tensor.implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, x, wt = args[0], args[1], args[2]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise NotImplementedError("Int8Tensor addmm supports beta=1, alpha=1 only")
    return _linear(x, wt.t(), bias)


# --- slicing and indexing -----------------------------------------------------------------------


def _qparam_names(self):
    return [n for n in ("scale", "zero_point") if getattr(self, n) is not None]


def _slice(self: Int8Tensor, dim: int, start: int, end: int) -> Int8Tensor:
    dim = dim % self.dim()
    size = self.shape[dim]
    start, end = max(0, min(start, size)), max(0, min(end, size))
    if start < 0 or end <= start:
        raise ValueError(f"empty slice [{start}:{end}] on dim {dim} of Int8Tensor {tuple(self.shape)}")
    b = self.block_size[dim]
    new = {"qdata": self.qdata.narrow(dim, start, end - start)}
    for n in _qparam_names(self):
        t = getattr(self, n)
        if t.shape[dim] != 1:  # the block spans less than the dim: slice the scale with it
            if start % b or end % b:
                raise ValueError(
                    f"slice [{start}:{end}] on dim {dim} cuts through a quantization block of {b}; "
                    f"slice at multiples of {b}"
                )
            t = t.narrow(dim, start // b, (end - start) // b)
        new[n] = t
    shape = list(self.shape)
    shape[dim] = end - start
    return self._replace(shape=shape, **new)


@Int8Tensor.implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    self, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0))
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    if step != 1:
        raise NotImplementedError(f"Int8Tensor slice with step={step}: only step 1 keeps the block layout")
    size = self.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    return _slice(self, dim, start, end)


@Int8Tensor.implements(aten.select.int)
def _(func, types, args, kwargs):
    self, dim, index = args
    dim = dim % self.dim()
    if self.dim() < 2:
        raise ValueError("select on a 1-D Int8Tensor would give a 0-d tensor; dequantize() first")
    index = index + self.shape[dim] if index < 0 else index
    sliced = _slice(self, dim, index, index + 1)
    shape = [s for i, s in enumerate(sliced.shape) if i != dim]
    return sliced._apply_to_tensors(lambda t: t.squeeze(dim) if t.dim() == self.dim() else t, shape=shape)


def _index_rows(self: Int8Tensor, index: torch.Tensor) -> Int8Tensor:
    if index.dim() != 1:
        raise NotImplementedError(f"Int8Tensor indexing takes a 1-D index on dim 0, got shape {tuple(index.shape)}")
    new = {"qdata": self.qdata.index_select(0, index)}
    for n in _qparam_names(self):
        t = getattr(self, n)
        if t.shape[0] == self.shape[0]:
            t = t.index_select(0, index)
        elif t.shape[0] != 1:
            raise ValueError(f"indexing rows of an Int8Tensor whose blocks span {self.block_size[0]} rows")
        new[n] = t
    return self._replace(shape=(index.numel(), *self.shape[1:]), **new)


@Int8Tensor.implements(aten.index_select.default)
def _(func, types, args, kwargs):
    self, dim, index = args
    if dim % self.dim() != 0:
        raise NotImplementedError(f"Int8Tensor index_select on dim {dim}: only dim 0 is supported")
    return _index_rows(self, index)


@Int8Tensor.implements(aten.index.Tensor)
def _(func, types, args, kwargs):
    self, indices = args
    if len(indices) != 1 or indices[0] is None:
        raise NotImplementedError("Int8Tensor indexing supports one index tensor on dim 0 (w[idx])")
    index = indices[0]
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(1)
    rows = _index_rows(self, index.reshape(-1))
    return rows if index.dim() == 1 else _view(rows, (*index.shape, *self.shape[1:]))


@Int8Tensor.implements(aten.embedding.default)
def _(func, types, args, kwargs):
    weight, indices = args[0], args[1]
    if weight.act_spec is not None:
        raise NotImplementedError("embedding on an Int8Tensor with activation quantization; use weight-only")
    rows = _index_rows(weight, indices.reshape(-1))
    return rows.dequantize().reshape(*indices.shape, weight.shape[-1])


# --- view / reshape -------------------------------------------------------------------------------


def _view(self: Int8Tensor, shape) -> Int8Tensor:
    shape = list(shape)
    if -1 in shape:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = self.numel() // max(known, 1)
    shape = torch.Size(shape)
    if shape.numel() != self.numel():
        raise ValueError(f"cannot view Int8Tensor of shape {tuple(self.shape)} as {tuple(shape)}")
    if shape == self.shape:
        return self._apply_to_tensors(lambda t: t)
    names = _qparam_names(self)
    if all(getattr(self, n).numel() == 1 for n in names):  # one scale: any shape works
        new = {n: getattr(self, n).reshape((1,) * len(shape)) for n in names}
        return self._replace(shape=shape, qdata=self.qdata.reshape(shape), **new)
    lead_full = all(b == 1 for b in self.block_size[:-1])
    if lead_full and len(shape) >= 1 and shape[-1] == self.shape[-1]:  # fold/unfold leading dims
        g = self.scale.shape[-1]
        new = {n: getattr(self, n).reshape(*shape[:-1], g) for n in names}
        return self._replace(shape=shape, qdata=self.qdata.reshape(shape), **new)
    raise ValueError(
        f"cannot view Int8Tensor of shape {tuple(self.shape)} with block_size {self.block_size} as "
        f"{tuple(shape)}: only leading dims may change while the last dim and its blocks stay"
    )


@Int8Tensor.implements([aten.view.default, aten.reshape.default, aten._unsafe_view.default])
def _(func, types, args, kwargs):
    return _view(args[0], args[1])
