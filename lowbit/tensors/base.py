"""QuantizedTensor: the small base every quantized tensor subclass stands on.

A subclass declares its fields by name and gets the rest:

* ``tensor_data_names`` (required inner tensors), ``optional_tensor_data_names`` (inner tensors
  that may be None) and ``tensor_attribute_names`` (hashable metadata) drive the constructor,
  ``__tensor_flatten__``/``__tensor_unflatten__`` (so torch.compile traces through it),
  ``__repr__`` and ``_replace``; ``runtime_attribute_names`` (a subset of the attributes, e.g. the
  ``KernelPreference``) say how to run, not what the tensor is: not saved, not part of the layout;
* a ``QuantSpec`` attribute (``spec``: how the stored values were made) is registered with
  ``lowbit.spec.spec_key`` on construction, so kernels get it as a string through custom ops;
* ops are registered per class with ``@Cls.implements(aten_op_or_list)`` (``__torch_dispatch__``)
  or ``@Cls.implements_torch_function(F.linear)`` (``__torch_function__``), looked up along the MRO;
* the base registers detach, clone, alias, contiguous, ``_to_copy`` (device moves; a float dtype
  changes only the dequantized dtype) and ``copy_`` between tensors of the same layout;
* any other op raises ``NotImplementedError`` naming the class and the op: there is no silent
  dequantize fallback;
* handlers are found along the MRO once per (class, op) and remembered, and a subclass's linear
  may keep a decode plan from the kernels (``_linear_plan``): the per-weight checks of its small-M
  route, made once (decode calls a small layer's kernel for ~10 us; the checks cost as much).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from lowbit.spec import QuantSpec, spec_key

__all__ = ["QuantizedTensor", "register_state_upgrader"]

aten = torch.ops.aten


@functools.cache
def _code_version() -> str:
    """Hash of the code a compiled graph of a lowbit tensor runs (primitives, kernels, tensors),
    so torch.compile's caches never serve a graph traced by another version of it."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=8)
    for sub in ("primitives", "kernels", "tensors"):
        for f in sorted((root / sub).rglob("*")):
            if f.suffix in (".py", ".cpp"):
                h.update(f.read_bytes())
    return h.hexdigest()


# (class, table name, func) -> the handler found along the class's MRO (None: none registered), so a
# call costs one dict lookup instead of an MRO walk; emptied whenever a handler is registered
_RESOLVED: dict[tuple, Callable | None] = {}

# where a tensor keeps its decode plan (``_linear_plan``) in its ``__dict__``; never saved or copied
_PLAN = "_lowbit_linear_plan"
_NO_PLAN_YET = object()

# fn(tensor, state) -> state, applied in order when torch.load restores a pickled quantized tensor: a
# higher layer that knows older lowbit versions (serialization) registers one that fills in new fields
_STATE_UPGRADERS: list[Callable[["QuantizedTensor", Any], Any]] = []


def register_state_upgrader(fn: Callable[["QuantizedTensor", Any], Any]) -> Callable:
    """Register ``fn(tensor, state) -> state`` to rewrite the pickled state (``__dict__``) of a quantized
    tensor before ``torch.load`` sets it (``lowbit.serialization`` migrates older lowbit versions)."""
    if fn not in _STATE_UPGRADERS:
        _STATE_UPGRADERS.append(fn)
    return fn


class QuantizedTensor(torch.Tensor):
    """Base of lowbit's quantized tensors (a wrapper subclass; see the module docstring).

    Constructed with keyword arguments only: every declared field, plus ``shape`` (the logical
    shape; defaults to the first data tensor's shape) and ``dtype`` (the dequantized dtype).
    """

    tensor_data_names: ClassVar[tuple[str, ...]] = ()
    optional_tensor_data_names: ClassVar[tuple[str, ...]] = ()
    tensor_attribute_names: ClassVar[tuple[str, ...]] = ()
    runtime_attribute_names: ClassVar[tuple[str, ...]] = ()
    _dispatch_table: ClassVar[dict] = {}
    _function_table: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._dispatch_table = {}
        cls._function_table = {}

    @staticmethod
    def __new__(cls, *, shape=None, dtype, **fields):
        first = fields[cls.tensor_data_names[0]]
        shape = first.shape if shape is None else torch.Size(shape)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=first.device, requires_grad=False)

    def __init__(self, *, shape=None, dtype, **fields):
        expected = set(self._all_names())
        unknown = set(fields) - expected
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected fields {sorted(unknown)}; fields: {sorted(expected)}")
        for name in self.tensor_data_names:
            if not isinstance(fields.get(name), torch.Tensor):
                raise TypeError(f"{type(self).__name__} field {name!r} must be a tensor")
        for name in self._all_names():
            setattr(self, name, fields.get(name))
        for name in self.tensor_attribute_names:
            value = fields.get(name)
            if isinstance(value, QuantSpec):
                spec_key(value)

    def __setattr__(self, name, value):
        # any field (re)assigned: the cached decode plan was made from the old fields
        self.__dict__.pop(_PLAN, None)
        super().__setattr__(name, value)

    def _clear_non_serializable_cached_data(self):
        # called by torch before pickling and deep-copying a tensor's __dict__: the plan is not state
        self.__dict__.pop(_PLAN, None)
        super()._clear_non_serializable_cached_data()

    def _linear_plan(self, make: Callable[["QuantizedTensor"], Callable | None]) -> Callable | None:
        """``make(self)``, made on the first eager call and kept on the tensor (None under torch.compile).

        ``make`` returns the kernels' decode plan for this tensor's fields (``lowbit.kernels.decode``)
        or None. Assigning any attribute drops the kept plan; in-place edits of the field tensors need
        nothing (the plan holds the tensors or views of them). Pickling and deep copies leave it out.
        """
        if torch.compiler.is_compiling():
            return None
        plan = self.__dict__.get(_PLAN, _NO_PLAN_YET)
        if plan is _NO_PLAN_YET:
            plan = self.__dict__[_PLAN] = make(self)
        return plan

    def __setstate__(self, state):
        for fn in _STATE_UPGRADERS:
            state = fn(self, state)
        torch._utils._set_obj_state(self, state)

    # --- fields ------------------------------------------------------------------------------

    @classmethod
    def _all_names(cls) -> tuple[str, ...]:
        return cls.tensor_data_names + cls.optional_tensor_data_names + cls.tensor_attribute_names

    def _fields(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self._all_names()}

    def _replace(self, *, shape=None, dtype=None, **changes) -> "QuantizedTensor":
        """A new tensor of the same class with some fields changed."""
        fields = self._fields()
        fields.update(changes)
        return type(self)(shape=self.shape if shape is None else shape, dtype=dtype or self.dtype, **fields)

    def _apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor], **changes) -> "QuantizedTensor":
        """Apply ``fn`` to every inner tensor (None stays None)."""
        names = self.tensor_data_names + self.optional_tensor_data_names
        new = {n: (None if getattr(self, n) is None else fn(getattr(self, n))) for n in names}
        return self._replace(**new, **changes)

    def __tensor_flatten__(self):
        names = [n for n in self.tensor_data_names + self.optional_tensor_data_names if getattr(self, n) is not None]
        attrs = tuple(getattr(self, n) for n in self.tensor_attribute_names)
        return names, (attrs, self.dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, meta, outer_size, outer_stride):
        attrs, dtype = meta
        fields = dict(zip(cls.tensor_attribute_names, attrs))
        fields.update(inner_tensors)
        return cls(shape=outer_size, dtype=dtype, **fields)

    def _stable_hash_for_caching(self) -> str:
        """Key for torch.compile's AOT cache: class, shape, dtype, inner tensor layouts, attributes."""
        parts = [_code_version(), type(self).__qualname__, str(tuple(self.shape)), str(self.dtype)]
        for n in self.tensor_data_names + self.optional_tensor_data_names:
            t = getattr(self, n)
            parts.append("-" if t is None else f"{n}:{tuple(t.shape)}:{t.stride()}:{t.dtype}:{t.device.type}")
        parts += [repr(getattr(self, n)) for n in self.tensor_attribute_names]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        parts = [f"shape={tuple(self.shape)}", f"dtype={self.dtype}"]
        for n in self.tensor_data_names + self.optional_tensor_data_names:
            t = getattr(self, n)
            if t is not None:
                parts.append(f"{n}={tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        parts += [f"{n}={getattr(self, n)!r}" for n in self.tensor_attribute_names]
        return f"{type(self).__name__}({', '.join(parts)})"

    # --- op registration -------------------------------------------------------------------------

    @classmethod
    def implements(cls, ops):
        """Register a ``__torch_dispatch__`` handler ``fn(func, types, args, kwargs)`` for aten ops."""
        ops = ops if isinstance(ops, (list, tuple)) else [ops]

        def decorator(fn):
            for op in ops:
                cls._dispatch_table[op] = fn
            _RESOLVED.clear()
            return fn

        return decorator

    @classmethod
    def implements_torch_function(cls, funcs):
        """Register a ``__torch_function__`` handler ``fn(func, types, args, kwargs)``."""
        funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]

        def decorator(fn):
            for f in funcs:
                cls._function_table[f] = fn
            _RESOLVED.clear()
            return fn

        return decorator

    @classmethod
    def _lookup(cls, table_name: str, func):
        """The handler for ``func`` in ``table_name`` of the nearest class along the MRO, or None."""
        key = (cls, table_name, func)
        try:
            return _RESOLVED[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable func: walk the MRO without caching
            key = None
        handler = None
        for klass in cls.__mro__:
            table = klass.__dict__.get(table_name)
            if table is not None and func in table:
                handler = table[func]
                break
        if key is not None:
            _RESOLVED[key] = handler
        return handler

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = cls._lookup("_function_table", func)
        if handler is not None:
            return handler(func, types, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = cls._lookup("_dispatch_table", func)
        if handler is None:
            raise NotImplementedError(
                f"{cls.__name__} does not support {func}: lowbit has no rule for this op on a quantized "
                f"tensor (no silent dequantize). Dequantize explicitly with .dequantize() if you mean it."
            )
        return handler(func, types, args, kwargs)


# --- ops every quantized tensor supports ------------------------------------------------------


@QuantizedTensor.implements([aten.detach.default, aten.alias.default])
def _(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._apply_to_tensors(func))


@QuantizedTensor.implements(aten.clone.default)
def _(func, types, args, kwargs):
    return args[0]._apply_to_tensors(lambda t: t.clone())


@QuantizedTensor.implements(aten.contiguous.default)
def _(func, types, args, kwargs):
    return args[0]._apply_to_tensors(lambda t: t.contiguous())


@QuantizedTensor.implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"{type(self).__name__}.to(dtype={dtype}): only a floating dtype is allowed (it sets the "
            "dequantized dtype); use .dequantize() to get a plain tensor"
        )
    moved = self._apply_to_tensors(lambda t: t.to(device=device) if device is not None else t.clone())
    return moved._replace(dtype=dtype) if dtype is not None else moved


def _same_layout(a: "QuantizedTensor", b: "QuantizedTensor") -> bool:
    if type(a) is not type(b) or a.shape != b.shape:
        return False
    for n in a.tensor_data_names + a.optional_tensor_data_names:
        x, y = getattr(a, n), getattr(b, n)
        if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or x.dtype != y.dtype)):
            return False
    return all(getattr(a, n) == getattr(b, n) for n in a.tensor_attribute_names if n not in a.runtime_attribute_names)


@QuantizedTensor.implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, QuantizedTensor) or not _same_layout(dst, src):
        raise ValueError(
            f"copy_ into {type(dst).__name__} needs a source of the same class and layout "
            f"(shapes, dtypes and spec); got {src!r}. Quantize the model the same way before loading."
        )
    for n in dst.tensor_data_names + dst.optional_tensor_data_names:
        t = getattr(dst, n)
        if t is not None:
            t.copy_(getattr(src, n))
            # below the wrapper's dispatch the inner copy_ does not bump t's version counter; caches keyed on
            # it (kernels._fp8_cpu.weight_finite) must see the new values
            if not t.is_inference():
                torch.autograd.graph.increment_version(t)
    return dst
