"""The JSON values of lowbit checkpoint metadata: dtypes, specs, granularities and configs, each
read back through an allow-list (class names, field names and field types, dtype names).

Encoding (format version 2):

* a torch dtype is ``{"__dtype__": "float32"}``, a quantized dtype ``{"__qdtype__": "int4"}``;
* a tuple is ``{"__tuple__": [...]}``;
* a spec, granularity or config is ``{"__class__": "QuantSpec", <field>: <value>, ...}`` with the
  dataclass's fields, except the run-time ones (``RUNTIME_CONFIG_FIELDS``: how to run, not what
  the numbers are), which are never written; a loaded config gets their defaults;
* None, bools, ints, floats and strings are themselves. Nothing else is allowed (no lists, no
  untagged objects, no enums).

Decoding checks, before any constructor runs: the class is allow-listed, every field is one the
class has (run-time fields are refused), every required field is present, every value has the
type the field is annotated with; then the constructor's own checks run. Any failure is one
:class:`CheckpointError` naming where in which file.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union

import torch

from lowbit.configs.base import QuantConfig, config_classes
from lowbit.dtypes import QDTYPES, QDType
from lowbit.granularity import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken
from lowbit.spec import QuantSpec

__all__ = [
    "CheckpointError",
    "RUNTIME_CONFIG_FIELDS",
    "TORCH_DTYPES",
    "GRANULARITIES",
    "encode_value",
    "decode_value",
    "encode_config",
    "decode_config",
    "value_classes",
]


class CheckpointError(ValueError):
    """A lowbit checkpoint this lowbit cannot read: the message names the file, the entry and what is allowed."""


# config fields that say how to run, not what the stored numbers are: never written to a file
RUNTIME_CONFIG_FIELDS = frozenset({"kernel"})
# every torch dtype a checkpoint's metadata may name (logical dtypes, scale and zero-point dtypes)
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2)
}
GRANULARITIES = (PerTensor, PerAxis, PerRow, PerToken, PerGroup, PerBlock)
_MAX_DEPTH = 8  # QATConfig(base_config=...) nests a config in a config; nothing nests deeper than a few levels


def value_classes() -> dict[str, type]:
    """The classes a checkpoint's JSON may name: ``QuantSpec``, the granularities, the registered configs."""
    return {c.__name__: c for c in (QuantSpec, *GRANULARITIES, *config_classes())}


def _saved_fields(cls: type) -> tuple[str, ...]:
    names = tuple(f.name for f in dataclasses.fields(cls))
    if issubclass(cls, QuantConfig):
        names = tuple(n for n in names if n not in RUNTIME_CONFIG_FIELDS)
    return names


# --- encoding -----------------------------------------------------------------------------------------


def encode_value(v) -> Any:
    """``v`` (a dtype, spec, granularity, config, tuple or plain value) as checkpoint JSON.

    Raises:
        TypeError: a value the format has no encoding for.
    """
    if isinstance(v, QDType):
        return {"__qdtype__": v.name}
    if isinstance(v, torch.dtype):
        name = str(v).removeprefix("torch.")
        if name not in TORCH_DTYPES:
            raise TypeError(f"cannot store dtype {v} in lowbit checkpoint metadata; allowed: {sorted(TORCH_DTYPES)}")
        return {"__dtype__": name}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        if type(v).__name__ not in value_classes():
            raise TypeError(f"cannot store {type(v).__name__} in lowbit checkpoint metadata; allowed classes: "
                            f"{sorted(value_classes())}")
        return {"__class__": type(v).__name__, **{n: encode_value(getattr(v, n)) for n in _saved_fields(type(v))}}
    if isinstance(v, tuple):
        return {"__tuple__": [encode_value(x) for x in v]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} {v!r} in lowbit checkpoint metadata")


def encode_config(config: QuantConfig) -> dict:
    """A config as the JSON the checkpoint metadata stores, without its run-time fields (``decode_config`` reverses it)."""
    return encode_value(config)


# --- decoding -----------------------------------------------------------------------------------------


def _short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def decode_value(v, where: str, *, _depth: int = 0):
    """The Python value of checkpoint JSON ``v``; ``where`` (file and entry) starts every error message.

    Raises:
        CheckpointError: an unknown tag, class, field, dtype name, a value of the wrong type, or a
            constructor refusing the values.
    """
    if _depth > _MAX_DEPTH:
        raise CheckpointError(f"{where}: metadata nested deeper than {_MAX_DEPTH} levels")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {type(v).__name__} {_short(v)} is not a lowbit metadata value; allowed: "
                              "null, bool, number, string, or an object tagged __dtype__/__qdtype__/__tuple__/__class__")
    tags = [k for k in ("__dtype__", "__qdtype__", "__tuple__", "__class__") if k in v]
    if len(tags) != 1:
        raise CheckpointError(f"{where}: object {_short(v)} needs exactly one tag of __dtype__, __qdtype__, __tuple__, "
                              "__class__")
    tag = tags[0]
    if tag != "__class__" and len(v) != 1:
        raise CheckpointError(f"{where}: {tag} object has extra keys {sorted(k for k in v if k != tag)}")
    x = v[tag]
    if tag == "__dtype__":
        if not isinstance(x, str) or x not in TORCH_DTYPES:
            raise CheckpointError(f"{where}: dtype {_short(x)} is not allowed; allowed: {sorted(TORCH_DTYPES)}")
        return TORCH_DTYPES[x]
    if tag == "__qdtype__":
        if not isinstance(x, str) or x not in QDTYPES:
            raise CheckpointError(f"{where}: quantized dtype {_short(x)} is unknown; allowed: {sorted(QDTYPES)}")
        return QDTYPES[x]
    if tag == "__tuple__":
        if not isinstance(x, list):
            raise CheckpointError(f"{where}: __tuple__ needs a list, got {type(x).__name__}")
        return tuple(decode_value(e, where, _depth=_depth + 1) for e in x)
    return _decode_object(v, where, _depth)


def _decode_object(v: dict, where: str, depth: int):
    name = v["__class__"]
    classes = value_classes()
    if not isinstance(name, str) or name not in classes:
        raise CheckpointError(f"{where}: class {_short(name)} is unknown to this lowbit; allowed: {sorted(classes)}")
    cls = classes[name]
    hints = _hints(cls)
    allowed = _saved_fields(cls)
    given = [k for k in v if k != "__class__"]
    unknown = [k for k in given if k not in allowed]
    if unknown:
        extra = " (run-time choices are not part of a checkpoint)" if set(unknown) & RUNTIME_CONFIG_FIELDS else ""
        raise CheckpointError(f"{where}: {name} has no stored field(s) {sorted(unknown)}{extra}; fields: {list(allowed)}")
    required = [f.name for f in dataclasses.fields(cls) if f.name in allowed and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in v]
    if missing:
        raise CheckpointError(f"{where}: {name} lacks required field(s) {missing}")
    fields = {}
    for k in given:
        value = decode_value(v[k], f"{where}: {name}.{k}", _depth=depth + 1)
        if not _matches(value, hints[k]):
            raise CheckpointError(f"{where}: {name}.{k}={_short(value)} has the wrong type; allowed: "
                                  f"{_hint_name(hints[k])}")
        fields[k] = value
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {name} refuses the stored values: {e}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value, hint) -> bool:
    """Whether ``value`` has the type the dataclass annotation ``hint`` names (``float`` takes ints; bools are not ints)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(x, args[0]) for x in value)
        return len(args) == len(value) and all(_matches(x, a) for x, a in zip(value, args))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    raise TypeError(f"lowbit.serialization cannot check annotation {hint!r}; teach _matches about it")


def _hint_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_hint_name(h) for h in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def decode_config(value, where: str = "checkpoint") -> QuantConfig:
    """The config a checkpoint's module JSON describes (run-time fields get their defaults).

    Args:
        value: the JSON (from ``encode_config``).
        where: the file and module, for error messages.

    Raises:
        CheckpointError: not a registered config, or any problem :func:`decode_value` reports.
    """
    config = decode_value(value, where)
    if not isinstance(config, QuantConfig):
        raise CheckpointError(f"{where}: a module config must be one of {sorted(c.__name__ for c in config_classes())}, "
                              f"got {_short(config)}")
    return config
