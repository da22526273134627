"""Saving and loading quantized models.

Two routes:

* ``torch.save(model.state_dict(), path)`` then ``torch.load(path, weights_only=True)``: every
  lowbit tensor class, spec, granularity, enum and config is registered as a safe global when
  ``lowbit`` is imported, so the safe unpickler accepts them. Load into a model built on the
  ``meta`` device with ``model.load_state_dict(sd, assign=True)``.
* ``save(model, path)`` / ``load(model, path)``: a safetensors file of plain tensors (a quantized
  tensor ``w`` is stored as ``w:qdata``, ``w:scale``, ...) with JSON metadata holding the format
  version, each quantized tensor's class, shape, dtype and attributes, and each module's config.
  No pickle is involved. ``load`` works on a float model or one built on ``meta``.

Format versions: 1 (this one). A file with a newer version raises; old versions stay loadable
(``tests/data`` keeps a checkpoint of every version).
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.dtypes import QDType, get_qdtype
from lowbit.granularity import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken
from lowbit.configs.base import config_classes, swap_weight
from lowbit.kernels.preference import KernelPreference
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = [
    "save",
    "load",
    "FORMAT_VERSION",
    "register_safe_globals",
    "flatten_tensor",
    "file_header",
    "read_header",
    "read_state",
    "apply_state",
    "check_format_version",
    "encode_config",
    "decode_config",
]

FORMAT_VERSION = 1
_TENSOR_CLASSES: dict[str, type[QuantizedTensor]] = {c.__name__: c for c in (Int8Tensor, Int4Tensor, Float8Tensor)}
_GRANULARITIES = [PerTensor, PerAxis, PerRow, PerToken, PerGroup, PerBlock]
_ENUMS = {KernelPreference.__name__: KernelPreference}


def _dataclasses() -> dict[str, type]:
    return {c.__name__: c for c in [QuantSpec, *_GRANULARITIES, *config_classes()]}


def register_safe_globals() -> None:
    """Allow lowbit's classes in ``torch.load(..., weights_only=True)``."""
    torch.serialization.add_safe_globals(
        [*_TENSOR_CLASSES.values(), QuantSpec, QDType, *_GRANULARITIES, *_ENUMS.values(), *config_classes()]
    )


# --- JSON encoding of specs, configs and attributes --------------------------------------------


def _encode(v):
    if isinstance(v, QDType):
        return {"__qdtype__": v.name}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if isinstance(v, Enum):
        return {"__enum__": type(v).__name__, "value": v.value}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"__class__": type(v).__name__, **{f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} {v!r} in lowbit checkpoint metadata")


def _decode(v, classes):
    if isinstance(v, list):
        return [_decode(x, classes) for x in v]
    if not isinstance(v, dict):
        return v
    if "__qdtype__" in v:
        return get_qdtype(v["__qdtype__"])
    if "__dtype__" in v:
        return getattr(torch, v["__dtype__"])
    if "__enum__" in v:
        return _ENUMS[v["__enum__"]](v["value"])
    if "__tuple__" in v:
        return tuple(_decode(x, classes) for x in v["__tuple__"])
    if "__class__" in v:
        name = v["__class__"]
        if name not in classes:
            raise ValueError(f"checkpoint names class {name!r}, unknown to this lowbit; known: {sorted(classes)}")
        fields = {k: _decode(x, classes) for k, x in v.items() if k != "__class__"}
        return classes[name](**fields)
    return {k: _decode(x, classes) for k, x in v.items()}


# --- safetensors ------------------------------------------------------------------------------


def flatten_tensor(key: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The plain tensors that store state entry ``key`` and, for a quantized tensor, its metadata entry.

    A quantized tensor ``w`` becomes ``{"w:qdata": ..., "w:scale": ...}`` plus an entry naming its
    class, shape, dtype and attributes; a plain tensor is stored under its own key (entry None).
    """
    if isinstance(t, QuantizedTensor):
        names, (attrs, dtype) = t.__tensor_flatten__()
        entry = {
            "class": type(t).__name__,
            "shape": list(t.shape),
            "dtype": _encode(dtype),
            "attributes": {n: _encode(a) for n, a in zip(t.tensor_attribute_names, attrs)},
            "tensors": names,
        }
        return {f"{key}:{n}": getattr(t, n).detach().contiguous().cpu() for n in names}, entry
    return {key: t.detach().contiguous().cpu()}, None


def encode_config(config) -> dict:
    """A config as the JSON the checkpoint metadata stores (``decode_config`` reverses it)."""
    return _encode(config)


def decode_config(value: dict):
    """The config (or spec, granularity) a checkpoint's JSON describes.

    Raises:
        ValueError: it names a class this lowbit does not know.
    """
    return _decode(value, _dataclasses())


def file_header(entries: dict[str, dict], modules: dict[str, dict]) -> dict[str, str]:
    """The safetensors metadata of a lowbit file: format version, tensor entries, module configs."""
    return {"lowbit": json.dumps({"format_version": FORMAT_VERSION, "entries": entries, "modules": modules})}


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state (quantized or not) to a safetensors file with lowbit metadata.

    Args:
        model: the model (after ``quantize_``).
        path: the file to write.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, QuantizedTensor):
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if t.numel() and ident in seen:  # tied weights: store once, point the alias at it
                entries[key] = {"alias": seen[ident]}
                continue
            seen[ident] = key
        plain, entry = flatten_tensor(key, t)
        tensors.update(plain)
        if entry is not None:
            entries[key] = entry
    modules = {fqn: _encode(m.lowbit_config) for fqn, m in model.named_modules() if hasattr(m, "lowbit_config")}
    save_file(tensors, str(path), metadata=file_header(entries, modules))


def read_header(path: str | Path) -> dict:
    """The lowbit metadata of a file written by ``save`` (or a shard of ``save_pretrained``), checked.

    Raises:
        ValueError: no lowbit metadata, or a format version newer than this lowbit reads.
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if "lowbit" not in meta:
        raise ValueError(f"{path} has no lowbit metadata: it was not written by lowbit")
    header = json.loads(meta["lowbit"])
    check_format_version(header.get("format_version"), path)
    return header


def check_format_version(version, path) -> None:
    """Raise ValueError unless ``version`` is a format version this lowbit reads."""
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{path} has lowbit format_version={version!r}; this lowbit ({_lowbit_version()}) reads versions "
            f"1..{FORMAT_VERSION}: upgrade lowbit"
        )


def _lowbit_version() -> str:
    from lowbit.version import __version__

    return __version__


def read_state(paths: list[str | Path], *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """``(state_dict, module_configs)`` rebuilt from one lowbit file or the shards of one checkpoint.

    Each file is opened, read and closed in turn (a mapped file is not kept open), aliases may point
    into another shard.

    Raises:
        ValueError: a file without lowbit metadata, a newer format version, an unknown class, or a
            tensor the metadata names but no file holds.
    """
    raw: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    modules: dict[str, dict] = {}
    for path in paths:
        header = read_header(path)
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():
                raw[k] = f.get_tensor(k)
        entries.update(header["entries"])
        modules.update(header["modules"])
    classes = _dataclasses()
    where = paths[0] if len(paths) == 1 else Path(paths[0]).parent
    state: dict[str, torch.Tensor] = {k: v for k, v in raw.items() if ":" not in k}
    for key, entry in entries.items():
        if "alias" in entry:
            continue
        cls = _TENSOR_CLASSES.get(entry["class"])
        if cls is None:
            raise ValueError(f"{where}: tensor {key!r} has class {entry['class']!r}, unknown to this lowbit")
        missing = [n for n in entry["tensors"] if f"{key}:{n}" not in raw]
        if missing:
            raise ValueError(f"{where}: tensor {key!r} lacks its parts {missing}: a shard is missing or truncated")
        inner = {n: raw.pop(f"{key}:{n}") for n in entry["tensors"]}
        attrs = {n: _decode(a, classes) for n, a in entry["attributes"].items()}
        state[key] = cls(shape=entry["shape"], dtype=_decode(entry["dtype"], classes), **inner, **attrs)
    for key, entry in entries.items():
        if "alias" in entry:
            if entry["alias"] not in state:
                raise ValueError(f"{where}: {key!r} is an alias of {entry['alias']!r}, which no file holds")
            state[key] = state[entry["alias"]]
    configs = {fqn: _decode(c, classes) for fqn, c in modules.items()}
    return state, configs


def apply_state(model: nn.Module, state: dict, configs: dict, *, strict: bool = True) -> nn.Module:
    """Assign ``state`` (from ``read_state``) to ``model`` and give each quantized module its config."""
    model.load_state_dict(state, strict=strict, assign=True)
    for fqn, config in configs.items():
        module = model.get_submodule(fqn)
        swap_weight(module, state[f"{fqn}.weight" if fqn else "weight"], config)
    return model


def load(model: nn.Module, path: str | Path, *, device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Load a file written by ``save`` into ``model`` (float, quantized or on ``meta``), in place.

    Quantized weights replace the model's parameters (``load_state_dict(assign=True)``) and each
    module gets back its config (shown by ``print(model)``).

    Raises:
        ValueError: not a lowbit file, a newer format version, or an unknown class.
    """
    state, configs = read_state([path], device=device)
    return apply_state(model, state, configs, strict=strict)


register_safe_globals()
