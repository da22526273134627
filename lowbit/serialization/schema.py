"""The schema of each quantized tensor class in a checkpoint (format version 2): what it stores and
how the stored parts relate, checked before any tensor is built.

A quantized tensor ``w`` is stored as parts ``w:qdata``, ``w:scale``, ... (plain tensors) and an
entry in the file's JSON metadata::

    {"class": "Int4Tensor", "shape": [N, K], "dtype": {"__dtype__": "bfloat16"},
     "attributes": {"spec": <QuantSpec>, "act_spec": <QuantSpec or null>},
     "tensors": ["qdata", "scale", "zero_point"]}

The names in a file (class, attribute and part names) are this schema's, a contract of the format
version: the field lists are read from the classes (``tensor_data_names``,
``optional_tensor_data_names``, ``tensor_attribute_names`` less ``runtime_attribute_names``), and
:func:`check_schemas` (run by the tests and by every ``save``) fails when a class and its schema
disagree, so renaming a field breaks a test, not the files. Per class the schema states:

* the logical shape's rank and dtype (``LOGICAL_DTYPES``);
* which weight specs are allowed (dtype, granularity, group sizes) and which activation specs;
* every part's dtype and exact shape, derived from the logical shape and the spec (``scale`` has
  ``shape[i] // block[i]``; int4 ``qdata`` is ``(*shape[:-1], shape[-1] // 2)`` bytes), and which
  parts the specs require, allow or forbid;
* the values of the small parts (scales positive and finite, zero points in the dtype's range)
  and, for float8 ``qdata``, no NaN/inf encodings.

Shapes are compared with the sizes safetensors verified against the file before any data is read,
so a declared shape can never make the loader allocate more than the file holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import torch

from lowbit.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.serialization.codec import CheckpointError, decode_value, encode_value
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = [
    "LOGICAL_DTYPES",
    "INT4_GROUP_SIZES",
    "TENSOR_CLASSES",
    "Entry",
    "PartRule",
    "check_entry",
    "check_values",
    "build_tensor",
    "encode_entry",
    "saved_attribute_names",
    "check_schemas",
]

LOGICAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUP_SIZES = (32, 64, 128, 256)
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_RANK = 8
MAX_DIM = 2**40  # no real weight has a dimension this long; keeps shape arithmetic far from overflow
_ENTRY_KEYS = ("class", "shape", "dtype", "attributes", "tensors")
# the value a run-time attribute gets on load (it is never stored)
_RUNTIME_DEFAULTS: dict[str, Any] = {"kernel": KernelPreference.AUTO}


class _Bad(Exception):
    """What is wrong with one entry (``check_entry`` adds the file and key)."""


@dataclasses.dataclass(frozen=True)
class PartRule:
    """One stored part: allowed dtypes, exact shape, and a check of its values (None: any values)."""

    dtypes: tuple[torch.dtype, ...]
    shape: tuple[int, ...]
    values: Callable[[torch.Tensor], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class Entry:
    """A checked entry: everything needed to build the tensor once its parts are read."""

    key: str
    cls: type[QuantizedTensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    attributes: dict[str, Any]
    parts: dict[str, PartRule]


# --- value checks ----------------------------------------------------------------------------------


def _first_bad(t: torch.Tensor, bad: torch.Tensor) -> str | None:
    if not bool(bad.any()):
        return None
    i = int(bad.reshape(-1).nonzero()[0, 0])
    n = int(bad.sum())
    return f"holds {t.reshape(-1)[i].item()!r} at flat index {i} ({n} bad value(s))"


def _positive_finite(t: torch.Tensor) -> str | None:
    what = _first_bad(t, ~(torch.isfinite(t) & (t > 0)))
    return None if what is None else f"{what}; allowed: finite values > 0"


def _finite(t: torch.Tensor) -> str | None:
    what = _first_bad(t, ~torch.isfinite(t))
    return None if what is None else f"{what}; allowed: finite values"


def _in_range(lo: int, hi: int) -> Callable[[torch.Tensor], str | None]:
    def check(t: torch.Tensor) -> str | None:
        what = _first_bad(t, (t < lo) | (t > hi))
        return None if what is None else f"{what}; allowed: integers in [{lo}, {hi}]"

    return check


def _float8_finite(t: torch.Tensor) -> str | None:
    bits = t.view(torch.uint8)
    # e4m3fn has no inf and NaN is S.1111.111; e5m2 is IEEE-like: exponent 11111 is inf or NaN
    mask = 0x7F if t.dtype == torch.float8_e4m3fn else 0x7C
    what = _first_bad(bits, (bits & mask) == mask)
    return None if what is None else f"{what} (the bits of a NaN/inf); allowed: finite float8 values"


# --- spec rules -------------------------------------------------------------------------------------


def _check_spec_basics(spec: QuantSpec, name: str) -> None:
    if not math.isfinite(spec.eps):
        raise _Bad(f"{name}.eps={spec.eps!r}; allowed: a finite float > 0")
    if spec.scale_dtype != torch.float32:
        raise _Bad(f"{name}.scale_dtype={spec.scale_dtype}; lowbit tensors store float32 scales")


def _scale_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    try:
        block = spec.block_size(shape)
    except ValueError as e:
        raise _Bad(f"spec granularity {spec.granularity!r} does not fit shape {list(shape)}: {e}") from None
    return tuple(s // b for s, b in zip(shape, block))


def _act_pre_scale(shape: tuple[int, ...]) -> PartRule:
    return PartRule((torch.float32,), (1,) * (len(shape) - 1) + (shape[-1],), _positive_finite)


_ONE = (1,)


def _int8_layout(shape, spec: QuantSpec, act: QuantSpec | None) -> tuple[dict, dict]:
    if spec.dtype.name != "int8" or not isinstance(spec.granularity, (PerRow, PerTensor, PerGroup)):
        raise _Bad(f"spec={spec!r}; allowed: int8 with PerRow(), PerTensor() or PerGroup(g), g dividing {shape[-1]}")
    required = {
        "qdata": PartRule((torch.int8,), shape),
        "scale": PartRule((torch.float32,), _scale_shape(shape, spec), _positive_finite),
    }
    optional = {"act_pre_scale": _act_pre_scale(shape)}
    if spec.has_zero_point:
        if spec.zero_point_dtype != torch.int32:
            raise _Bad(f"spec.zero_point_dtype={spec.zero_point_dtype}; allowed: torch.int32")
        required["zero_point"] = PartRule((torch.int32,), required["scale"].shape, _in_range(spec.qmin, spec.qmax))
    if act is None:
        return required, optional
    _check_spec_basics(act, "act_spec")
    if act.dtype.name != "int8" or not isinstance(act.granularity, (PerToken, PerTensor)):
        raise _Bad(f"act_spec={act!r}; allowed: None, int8 PerToken() (dynamic) or int8 PerTensor() (static)")
    if spec.has_zero_point:
        raise _Bad("a weight with a zero point cannot have int8 activations (act_spec); allowed: a symmetric spec")
    if isinstance(act.granularity, PerTensor):
        required["act_scale"] = PartRule((torch.float32,), _ONE, _positive_finite)
        if act.has_zero_point:
            required["act_zero_point"] = PartRule((torch.int32,), _ONE, _in_range(act.qmin, act.qmax))
    return required, optional


def _int4_layout(shape, spec: QuantSpec, act: QuantSpec | None) -> tuple[dict, dict]:
    g = spec.granularity
    if not isinstance(g, PerGroup) or g.group_size not in INT4_GROUP_SIZES:
        raise _Bad(f"spec.granularity={g!r}; allowed: PerGroup(g) with g in {INT4_GROUP_SIZES}")
    if shape[-1] % 2 or shape[-1] % g.group_size:
        raise _Bad(f"shape {list(shape)}: the last dim must be even and divisible by the group size {g.group_size}")
    if (spec.dtype.name, spec.symmetric) not in (("int4", True), ("uint4", False)):
        raise _Bad(f"spec dtype {spec.dtype.name} with symmetric={spec.symmetric}; allowed: int4 symmetric or "
                   "uint4 asymmetric")
    if spec.quant_min is not None or spec.quant_max is not None:
        raise _Bad("spec.quant_min/quant_max must be null: int4 stores the full 4-bit range")
    scale_shape = (*shape[:-1], shape[-1] // g.group_size)
    required = {
        "qdata": PartRule((torch.uint8,), (*shape[:-1], shape[-1] // 2)),
        "scale": PartRule((torch.float32,), scale_shape, _positive_finite),
    }
    if spec.has_zero_point:
        domains = {("int", torch.int8): _in_range(spec.qmin, spec.qmax), ("float", torch.float32): _finite}
        check = domains.get((spec.zero_point_domain, spec.zero_point_dtype))
        if check is None:
            raise _Bad(f"spec zero point {spec.zero_point_domain!r} domain in {spec.zero_point_dtype}; allowed: "
                       "'int' in torch.int8, 'float' in torch.float32")
        required["zero_point"] = PartRule((spec.zero_point_dtype,), scale_shape, check)
    if act is not None:
        _check_spec_basics(act, "act_spec")
        if act.dtype.name not in ("int8", "float8_e4m3fn", "float8_e5m2") or not isinstance(act.granularity, PerToken):
            raise _Bad(f"act_spec={act!r}; allowed: None or PerToken() int8 / float8_e4m3fn / float8_e5m2")
    return required, {}


def _float8_layout(shape, spec: QuantSpec, act: QuantSpec | None) -> tuple[dict, dict]:
    if len(shape) != 2:
        raise _Bad(f"shape {list(shape)}; Float8Tensor stores 2-D weights")
    if not spec.dtype.is_float or not isinstance(spec.granularity, (PerRow, PerTensor)):
        raise _Bad(f"spec={spec!r}; allowed: float8_e4m3fn or float8_e5m2 with PerRow() or PerTensor()")
    per_row = isinstance(spec.granularity, PerRow)
    required = {
        "qdata": PartRule((spec.dtype.storage,), shape, _float8_finite),
        "scale": PartRule((torch.float32,), (shape[0], 1) if per_row else (1, 1), _positive_finite),
    }
    optional = {"act_pre_scale": _act_pre_scale(shape)}
    if act is None:
        return required, optional
    _check_spec_basics(act, "act_spec")
    if not act.dtype.is_float or not isinstance(act.granularity, (PerToken, PerTensor)):
        raise _Bad(f"act_spec={act!r}; allowed: None, float8 PerToken() (per-row weight) or PerTensor()")
    act_scale = PartRule((torch.float32,), _ONE, _positive_finite)
    if isinstance(act.granularity, PerToken):
        if not per_row:
            raise _Bad("a PerToken() act_spec needs a PerRow() weight spec")
    elif per_row:
        required["act_scale"] = act_scale  # a per-row weight with per-tensor activations: static only
    else:
        optional["act_scale"] = act_scale  # per-tensor weight: dynamic (no scale) or static
    return required, optional


@dataclasses.dataclass(frozen=True)
class _Schema:
    cls: type[QuantizedTensor]
    ranks: tuple[int, int]  # smallest and largest rank allowed
    tensors: tuple[str, ...]  # every part name the layout may use
    attributes: tuple[str, ...]  # every stored attribute (each a QuantSpec; "spec" is required)
    layout: Callable[[tuple, QuantSpec, QuantSpec | None], tuple[dict, dict]]


_SCHEMAS = {
    s.cls.__name__: s
    for s in (
        _Schema(Int8Tensor, (1, MAX_RANK), ("qdata", "scale", "zero_point", "act_scale", "act_zero_point", "act_pre_scale"),
                ("spec", "act_spec"), _int8_layout),
        _Schema(Int4Tensor, (1, MAX_RANK), ("qdata", "scale", "zero_point"), ("spec", "act_spec"), _int4_layout),
        _Schema(Float8Tensor, (2, 2), ("qdata", "scale", "act_scale", "act_pre_scale"), ("spec", "act_spec"),
                _float8_layout),
    )
}
TENSOR_CLASSES: dict[str, type[QuantizedTensor]] = {name: s.cls for name, s in _SCHEMAS.items()}


def saved_attribute_names(cls: type[QuantizedTensor]) -> tuple[str, ...]:
    """The attributes of ``cls`` a checkpoint stores: ``tensor_attribute_names`` less the run-time ones."""
    runtime = getattr(cls, "runtime_attribute_names", ())
    return tuple(n for n in cls.tensor_attribute_names if n not in runtime)


def check_schemas() -> None:
    """Raise RuntimeError unless every tensor class and its schema name the same fields.

    A field added to (or renamed in) a class without its schema would be written under a name the
    loader refuses, or silently not written: this makes that a failure at ``save`` and in the tests.
    """
    for name, s in _SCHEMAS.items():
        cls = s.cls
        parts = set(cls.tensor_data_names + cls.optional_tensor_data_names)
        problems = []
        if parts != set(s.tensors):
            problems.append(f"tensor fields {sorted(parts)} vs schema {sorted(s.tensors)}")
        if set(saved_attribute_names(cls)) != set(s.attributes):
            problems.append(f"stored attributes {sorted(saved_attribute_names(cls))} vs schema {sorted(s.attributes)}")
        missing = [n for n in getattr(cls, "runtime_attribute_names", ()) if n not in _RUNTIME_DEFAULTS]
        if missing:
            problems.append(f"run-time attributes {missing} have no load default")
        if problems:
            raise RuntimeError(f"lowbit.serialization's schema of {name} is out of date: {'; '.join(problems)}")


# --- entries ---------------------------------------------------------------------------------------


def _int_list(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise _Bad(f"{what} {v!r:.80} must be a list of ints")
    return tuple(v)


def check_entry(key: str, entry, stored: Mapping[str, tuple[torch.dtype | None, tuple[int, ...]]], where) -> Entry:
    """Check one quantized-tensor entry of a (format 2) file against its class's schema and the parts
    the file stores; no tensor data is read.

    Args:
        key: the state key (``model.layers.0.mlp.up_proj.weight``).
        entry: the entry's JSON.
        stored: the file's tensors, ``{name: (torch dtype or None when unknown, shape)}``, as its
            safetensors header declares them (verified against the file size by safetensors).
        where: the file, for error messages.

    Raises:
        CheckpointError: naming the file, the key and what is allowed.
    """
    try:
        return _check_entry(key, entry, stored, where)
    except _Bad as e:
        raise CheckpointError(f"{where}: tensor {key!r}: {e}") from None


def _check_entry(key, entry, stored, where) -> Entry:
    if not isinstance(entry, dict) or set(entry) != set(_ENTRY_KEYS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise _Bad(f"entry has keys {got}; a quantized tensor's entry has exactly {list(_ENTRY_KEYS)}")
    name = entry["class"]
    schema = _SCHEMAS.get(name) if isinstance(name, str) else None
    if schema is None:
        raise _Bad(f"class {name!r:.80} is unknown to this lowbit; allowed: {sorted(_SCHEMAS)}")
    shape = _int_list(entry["shape"], "shape")
    lo, hi = schema.ranks
    if not lo <= len(shape) <= hi or any(not 1 <= d <= MAX_DIM for d in shape):
        raise _Bad(f"shape {list(shape)}: {name} needs rank {lo}..{hi} and dims in [1, 2**40]")
    dtype = decode_value(entry["dtype"], f"{where}: tensor {key!r} dtype")
    if dtype not in LOGICAL_DTYPES:
        raise _Bad(f"dtype {dtype!r}; allowed: {[str(d) for d in LOGICAL_DTYPES]}")
    attrs_json = entry["attributes"]
    names = saved_attribute_names(schema.cls)
    if not isinstance(attrs_json, dict) or set(attrs_json) != set(names):
        got = sorted(attrs_json) if isinstance(attrs_json, dict) else type(attrs_json).__name__
        raise _Bad(f"attributes {got}; {name} stores exactly {list(names)}")
    attrs = {n: decode_value(attrs_json[n], f"{where}: tensor {key!r} attribute {n!r}") for n in names}
    for n, v in attrs.items():
        if not (isinstance(v, QuantSpec) or (v is None and n != "spec")):
            raise _Bad(f"attribute {n!r} is {v!r:.80}; allowed: a QuantSpec{'' if n == 'spec' else ' or null'}")
    _check_spec_basics(attrs["spec"], "spec")
    required, optional = schema.layout(shape, attrs["spec"], attrs.get("act_spec"))
    parts = entry["tensors"]
    if not isinstance(parts, list) or any(not isinstance(p, str) for p in parts) or len(set(parts)) != len(parts):
        raise _Bad(f"tensors {parts!r:.80} must be a list of distinct part names")
    missing = [p for p in required if p not in parts]
    extra = [p for p in parts if p not in required and p not in optional]
    if missing or extra:
        raise _Bad(f"stores parts {parts}; with these specs it needs {list(required)}"
                   + (f" and may have {list(optional)}" if optional else "")
                   + (f" (missing {missing})" if missing else "") + (f" (not allowed: {extra})" if extra else ""))
    rules = {p: required.get(p) or optional[p] for p in parts}
    for p, rule in rules.items():
        if f"{key}:{p}" not in stored:
            raise _Bad(f"part {key}:{p} is listed but the file holds no such tensor (a truncated or edited file)")
        st_dtype, st_shape = stored[f"{key}:{p}"]
        if st_dtype not in rule.dtypes:
            raise _Bad(f"part {p!r} is stored as {st_dtype or 'an unknown dtype'}; allowed: {[str(d) for d in rule.dtypes]}")
        if tuple(st_shape) != rule.shape:
            raise _Bad(f"part {p!r} has shape {list(st_shape)}; the logical shape {list(shape)} and the specs "
                       f"need {list(rule.shape)}")
    return Entry(key, schema.cls, shape, dtype, attrs, rules)


def check_values(entry: Entry, parts: Mapping[str, torch.Tensor], where) -> None:
    """Check the values of ``entry``'s parts (scales, zero points, float8 codes) once they are read.

    Raises:
        CheckpointError: naming the file, the key, the part, the bad value and what is allowed.
    """
    for p, rule in entry.parts.items():
        if rule.values is not None:
            what = rule.values(parts[p])
            if what is not None:
                raise CheckpointError(f"{where}: tensor {entry.key!r}: part {p!r} {what}")


def build_tensor(entry: Entry, parts: Mapping[str, torch.Tensor]) -> QuantizedTensor:
    """The tensor of a checked entry; run-time attributes (the kernel preference) get their defaults."""
    runtime = {n: _RUNTIME_DEFAULTS[n] for n in getattr(entry.cls, "runtime_attribute_names", ())}
    return entry.cls(shape=entry.shape, dtype=entry.dtype, **parts, **entry.attributes, **runtime)


def encode_entry(t: QuantizedTensor) -> dict:
    """The metadata entry of a quantized tensor (its stored attributes, never the run-time ones)."""
    names, _ = t.__tensor_flatten__()
    return {
        "class": type(t).__name__,
        "shape": list(t.shape),
        "dtype": encode_value(t.dtype),
        "attributes": {n: encode_value(getattr(t, n)) for n in saved_attribute_names(type(t))},
        "tensors": list(names),
    }
