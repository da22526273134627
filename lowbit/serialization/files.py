"""lowbit's safetensors files: writing (``save``, the parts and header a shard writer uses) and
reading (``read_headers``, ``read_state``, ``load``) with every check before any tensor is built."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.configs.base import QuantConfig, swap_weight
from lowbit.serialization.codec import CheckpointError, decode_config, encode_config
from lowbit.serialization.migrate import migrate_v1
from lowbit.serialization.schema import Entry, build_tensor, check_entry, check_schemas, check_values, encode_entry
from lowbit.tensors.base import QuantizedTensor

__all__ = [
    "FORMAT_VERSION",
    "save",
    "load",
    "flatten_tensor",
    "file_header",
    "read_header",
    "read_headers",
    "read_state",
    "apply_state",
    "check_format_version",
    "tensor_identity",
]

FORMAT_VERSION = 2
_HEADER_KEYS = ("format_version", "entries", "modules")
# safetensors' dtype codes lowbit files may hold (a plain tensor of another dtype still loads; a part may not)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# --- writing ---------------------------------------------------------------------------------------------


def flatten_tensor(key: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The plain tensors that store state entry ``key`` and, for a quantized tensor, its metadata entry.

    A quantized tensor ``w`` becomes ``{"w:qdata": ..., "w:scale": ...}`` plus an entry naming its
    class, shape, dtype and stored attributes (see ``lowbit.serialization.schema``); a plain tensor
    is stored under its own key (entry None). A quantized tensor is checked against the schema the
    loader applies, so nothing is written that would not load.

    Raises:
        ValueError: a quantized tensor the loader would refuse (the message says why).
    """
    if not isinstance(t, QuantizedTensor):
        return {key: t.detach().contiguous().cpu()}, None
    check_schemas()
    entry = encode_entry(t)
    plain = {f"{key}:{n}": getattr(t, n).detach().contiguous().cpu() for n in entry["tensors"]}
    stored = {k: (v.dtype, tuple(v.shape)) for k, v in plain.items()}
    try:
        checked = check_entry(key, json.loads(json.dumps(entry)), stored, "lowbit.save")
        check_values(checked, {n: plain[f"{key}:{n}"] for n in entry["tensors"]}, "lowbit.save")
    except CheckpointError as e:
        raise ValueError(f"cannot save {key!r}, the loader would refuse it: {e}") from None
    return plain, entry


def file_header(entries: dict[str, dict], modules: dict[str, dict]) -> dict[str, str]:
    """The safetensors metadata of a lowbit file: format version, tensor entries, module configs (strict JSON)."""
    header = {"format_version": FORMAT_VERSION, "entries": entries, "modules": modules}
    return {"lowbit": json.dumps(header, allow_nan=False)}


def tensor_identity(t: torch.Tensor) -> tuple | None:
    """What makes two state entries one stored tensor (tied weights): the same storage, offset, shape,
    strides and dtype; for a quantized tensor, the same class, attributes and inner tensors. None for
    an empty or storage-less (meta) tensor, which is never aliased."""

    def one(x: torch.Tensor):
        ptr = x.untyped_storage().data_ptr()
        return (x.device, ptr, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype) if ptr and x.numel() else None

    if isinstance(t, QuantizedTensor):
        names, ctx = t.__tensor_flatten__()
        inner = [one(getattr(t, n)) for n in names]
        return None if None in inner else (type(t).__name__, tuple(t.shape), repr(ctx), *inner)
    return one(t)


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state (quantized or not) to a safetensors file with lowbit metadata (format 2).

    A tensor shared by several state keys (tied weights, float or quantized) is stored once; the
    other keys point at it. Run-time choices (the kernel preference) are not written.

    Args:
        model: the model (after ``quantize_``).
        path: the file to write.

    Raises:
        ValueError: a quantized tensor the loader would refuse.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = tensor_identity(t)
        if ident is not None and ident in seen:  # tied weights (float or quantized): store once, alias the rest
            entries[key] = {"alias": seen[ident]}
            continue
        if ident is not None:
            seen[ident] = key
        plain, entry = flatten_tensor(key, t)
        tensors.update(plain)
        if entry is not None:
            entries[key] = entry
    modules = {fqn: encode_config(m.lowbit_config) for fqn, m in model.named_modules() if hasattr(m, "lowbit_config")}
    save_file(tensors, str(path), metadata=file_header(entries, modules))


# --- reading: headers --------------------------------------------------------------------------------------


def check_format_version(version, path) -> None:
    """Raise ValueError unless ``version`` is a format version this lowbit reads."""
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has lowbit format_version={version!r:.40}; this lowbit ({_lowbit_version()}) reads versions "
            f"1..{FORMAT_VERSION}" + (": upgrade lowbit" if isinstance(version, int) and version > FORMAT_VERSION else "")
        )


def _lowbit_version() -> str:
    from lowbit.version import __version__

    return __version__


def _strict_constant(name: str):
    raise ValueError(f"{name} is not JSON (lowbit writes strict JSON)")


@dataclasses.dataclass
class _File:
    path: Path
    version: int  # as stored
    entries: dict
    modules: dict
    stored: dict[str, tuple[torch.dtype | None, tuple[int, ...]]]


def _open(path: Path, device: str = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): truncated or not a checkpoint") from None


def _scan(path: Path) -> _File:
    """Open ``path``, read its lowbit header and its tensors' declared dtypes and shapes (no data)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    with _open(path) as f:
        meta = f.metadata() or {}
        stored = {}
        for k in f.keys():
            sl = f.get_slice(k)
            stored[k] = (_ST_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape()))
    if "lowbit" not in meta:
        raise CheckpointError(f"{path} has no lowbit metadata: it was not written by lowbit")
    try:
        header = json.loads(meta["lowbit"], parse_constant=_strict_constant)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: its lowbit metadata is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict) or set(header) != set(_HEADER_KEYS):
        got = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(f"{path}: lowbit metadata has keys {got}; allowed: exactly {list(_HEADER_KEYS)}")
    check_format_version(header["format_version"], path)
    for part in ("entries", "modules"):
        if not isinstance(header[part], dict):
            raise CheckpointError(f"{path}: lowbit metadata {part!r} must be an object, got {type(header[part]).__name__}")
    return _File(path, header["format_version"], header["entries"], header["modules"], stored)


@dataclasses.dataclass
class _Checked:
    """Everything about a checkpoint's files that can be checked without reading tensor data."""

    files: list[_File]
    entries: dict[str, tuple[int, Entry]]  # quantized key -> (file index, checked entry)
    plain: dict[str, int]  # plain tensor key -> file index
    aliases: dict[str, str]  # key -> the key it shares
    configs: dict[str, QuantConfig]  # module name -> config


def _check_files(paths: list[Path]) -> _Checked:
    files = [_scan(p) for p in paths]
    all_modules = {fqn: c for f in files for fqn, c in f.modules.items()}
    old = [f for f in files if f.version == 1]
    if old:
        headers = [(str(f.path), {"entries": f.entries, "modules": f.modules}) for f in old]
        migrate_v1(headers, all_modules, {str(f.path): f.stored for f in old})
    entries: dict[str, tuple[int, Entry]] = {}
    plain: dict[str, int] = {}
    aliases: dict[str, str] = {}
    configs: dict[str, QuantConfig] = {}
    owner: dict[str, Path] = {}  # every key -> the file that defines it, to refuse duplicates
    config_file: dict[str, Path] = {}  # module name -> the file holding its config

    def claim(key: str, f: _File) -> None:
        if key in owner:
            raise CheckpointError(f"{f.path}: {key!r} is also defined by {owner[key]}: one key, one definition")
        owner[key] = f.path

    for i, f in enumerate(files):
        for key, entry in f.entries.items():
            claim(key, f)
            if isinstance(entry, dict) and "alias" in entry:
                if set(entry) != {"alias"} or not isinstance(entry["alias"], str):
                    raise CheckpointError(f"{f.path}: tensor {key!r}: an alias entry is exactly {{\"alias\": <key>}}, "
                                          f"got {entry!r:.80}")
                if key in f.stored:
                    raise CheckpointError(f"{f.path}: {key!r} is both stored and an alias of {entry['alias']!r}")
                aliases[key] = entry["alias"]
                continue
            entries[key] = (i, check_entry(key, entry, f.stored, f.path))
        for k in f.stored:
            base, sep, part = k.rpartition(":")
            if not sep:
                if k in f.entries:
                    raise CheckpointError(f"{f.path}: {k!r} is stored as a plain tensor and also has an entry")
                claim(k, f)
                plain[k] = i
            elif base not in entries or entries[base][0] != i or part not in entries[base][1].parts:
                raise CheckpointError(f"{f.path}: stored tensor {k!r} belongs to no entry of this file (a quantized "
                                      f"tensor's parts and its entry are written together): an edited file")
        for fqn, c in f.modules.items():
            if fqn in configs:
                raise CheckpointError(f"{f.path}: module {fqn!r} has a config in two files")
            configs[fqn] = decode_config(c, f"{f.path}: module {fqn!r}")
            config_file[fqn] = f.path
    for key, target in aliases.items():
        if target not in entries and target not in plain:
            what = "another alias" if target in aliases else "no tensor any file holds"
            raise CheckpointError(f"{owner[key]}: {key!r} is an alias of {target!r}, which is {what}")
    for fqn, config in configs.items():
        _check_module(fqn, config, entries, aliases, config_file[fqn])
    return _Checked(files, entries, plain, aliases, configs)


def _check_module(fqn: str, config: QuantConfig, entries, aliases, where: Path) -> None:
    """A module config must sit on a quantized weight whose specs are the config's."""
    key = f"{fqn}.weight" if fqn else "weight"
    target = aliases.get(key, key)
    if target not in entries:
        raise CheckpointError(f"{where}: module {fqn!r} has config {config!r} but its weight {key!r} is not a "
                              "quantized tensor of this checkpoint")
    entry = entries[target][1]
    try:
        want = (config.weight_spec(), config.act_spec())
    except (NotImplementedError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: module {fqn!r}: config {config!r} cannot describe a stored weight ({e})") from None
    got = (entry.attributes["spec"], entry.attributes.get("act_spec"))
    if want != got:
        raise CheckpointError(f"{where}: module {fqn!r}: config {config!r} quantizes with spec={want[0]!r}, "
                              f"act_spec={want[1]!r}, but its weight {key!r} holds spec={got[0]!r}, act_spec={got[1]!r}")
    for name in _STATIC_QPARAMS:
        has = getattr(config, name, None) is not None
        if has != (name in entry.parts):
            raise CheckpointError(f"{where}: module {fqn!r}: config {config!r} {'sets' if has else 'has no'} {name}, but "
                                  f"its weight {key!r} {'lacks' if has else 'stores'} part {name!r}")


# static activation qparams: a config field and a tensor part of the same name and value
_STATIC_QPARAMS = {"act_scale": torch.float32, "act_zero_point": torch.int32}


def _check_static_qparams(checked: "_Checked", parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """A static config's ``act_scale`` / ``act_zero_point`` are the values its weight stores (as the handler made them)."""
    for fqn, config in checked.configs.items():
        key = f"{fqn}.weight" if fqn else "weight"
        target = checked.aliases.get(key, key)
        for name, dtype in _STATIC_QPARAMS.items():
            value = getattr(config, name, None)
            stored = parts[target].get(name)
            if value is not None and not torch.equal(stored.cpu(), torch.tensor([value], dtype=dtype)):
                path = checked.files[checked.entries[target][0]].path
                raise CheckpointError(f"{path}: module {fqn!r}: config {config!r} has {name}={value!r} but its weight "
                                      f"{key!r} stores {stored.tolist()}")


def read_headers(paths: list[str | Path]) -> list[dict]:
    """The lowbit metadata of each file of one checkpoint, checked as ``read_state`` checks it (no data read).

    Each dict has ``format_version`` (as stored in that file) and ``entries`` / ``modules`` in the
    current format (an older file is migrated, see ``lowbit.serialization.migrate``).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: (``CheckpointError``) any problem ``read_state`` reports before reading data.
    """
    files = _check_files([Path(p) for p in paths]).files
    return [{"format_version": f.version, "entries": f.entries, "modules": f.modules} for f in files]


def read_header(path: str | Path) -> dict:
    """``read_headers([path])[0]``: the checked lowbit metadata of a file written by ``save``."""
    return read_headers([path])[0]


# --- reading: data ---------------------------------------------------------------------------------------


# safetensors hands out tensors where the file has them, 8-byte aligned; kernels load in vectors (and
# torch's _weight_int8pack_mm crashed on a weight at offset 8), so a tensor not on 64 bytes is copied
_ALIGN = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() == 0 or t.data_ptr() % _ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)


def read_state(paths: list[str | Path], *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """``(state_dict, module_configs)`` rebuilt from one lowbit file or the shards of one checkpoint.

    First every file's metadata is checked against the schema (classes, specs, dtypes, part shapes
    against the sizes the file declares, aliases, module configs against their weights' specs);
    then the data is read and the small parts' values are checked (scales, zero points); only then
    are the tensors built. Each file is opened, read and closed in turn.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: (``CheckpointError``) naming the file, the tensor or module and what is allowed.
    """
    checked = _check_files([Path(p) for p in paths])
    plain: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for i, f in enumerate(checked.files):
        with _open(f.path, str(device)) as sf:
            try:
                for k, fi in checked.plain.items():
                    if fi == i:
                        plain[k] = _aligned(sf.get_tensor(k))
                for k, (fi, entry) in checked.entries.items():
                    if fi == i:
                        parts[k] = {p: _aligned(sf.get_tensor(f"{k}:{p}")) for p in entry.parts}
            except SafetensorError as e:
                raise CheckpointError(f"{f.path}: tensor data unreadable ({e})") from None
    for k, (fi, entry) in checked.entries.items():
        check_values(entry, parts[k], checked.files[fi].path)
    _check_static_qparams(checked, parts)
    state: dict[str, torch.Tensor] = dict(plain)
    for k, (_, entry) in checked.entries.items():
        state[k] = build_tensor(entry, parts.pop(k))
    for k, target in checked.aliases.items():
        state[k] = state[target]
    return state, checked.configs


def apply_state(model: nn.Module, state: dict, configs: dict, *, strict: bool = True, where: Any = "checkpoint") -> nn.Module:
    """Assign ``state`` (from ``read_state``) to ``model`` and give each quantized module its config.

    Raises:
        ValueError: (``CheckpointError``) with ``strict``, keys the model lacks or the checkpoint lacks;
            a shape that differs from the model's; a configured module the model does not have.
    """
    own = model.state_dict()
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise CheckpointError(f"{where} does not match the model ({type(model).__name__}): "
                                  + (f"missing {_few(missing)} " if missing else "")
                                  + (f"unexpected {_few(unexpected)}" if unexpected else ""))
    wrong = [f"{k}: {list(state[k].shape)} vs the model's {list(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{where}: shapes differ from the model's: {_few(wrong)}")
    modules = dict(model.named_modules())
    absent = [fqn for fqn in configs if fqn not in modules]
    if absent:
        raise CheckpointError(f"{where}: configs for modules the model does not have: {_few(absent)}")
    tied: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is not None:
                tied.setdefault(id(p), []).append((m, name, f"{fqn}.{name}" if fqn else name))
    model.load_state_dict(state, strict=strict, assign=True)
    for fqn, config in configs.items():
        swap_weight(modules[fqn], state[f"{fqn}.weight" if fqn else "weight"], config)
    # parameters the model shares under several names stay one parameter when the state holds one
    # tensor for all of them (an alias in the file)
    for owners in tied.values():
        (m0, n0, k0), rest = owners[0], owners[1:]
        for m, name, key in rest:
            if key in state and k0 in state and state[key] is state[k0]:
                setattr(m, name, getattr(m0, n0))
    return model


def _few(items: list, n: int = 5) -> str:
    return f"{items[:n]}{f' and {len(items) - n} more' if len(items) > n else ''}"


def load(model: nn.Module, path: str | Path, *, device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Load a file written by ``save`` (format 1 or 2) into ``model`` (float, quantized or on ``meta``), in place.

    Quantized weights replace the model's parameters (``load_state_dict(assign=True)``) and each
    module gets back its config (shown by ``print(model)``); run-time choices (the kernel
    preference) get their defaults.

    Raises:
        FileNotFoundError: no such file.
        ValueError: (``CheckpointError``) not a lowbit file, a newer format version, an unknown
            class, field or dtype, shapes or values the schema refuses, or a file that does not
            match the model; the message names the file, the key and what is allowed.
    """
    state, configs = read_state([path], device=device)
    return apply_state(model, state, configs, strict=strict, where=path)
