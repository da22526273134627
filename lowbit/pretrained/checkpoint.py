"""The lowbit checkpoint directory: writing (``save_pretrained``), reading (``from_pretrained``,
``checkpoint_info``) and the transformers helpers the streaming quantizer shares. See the package
docstring for the format."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.configs.base import QuantConfig
from lowbit.kernels import hugepages
from lowbit.serialization import (
    FORMAT_VERSION,
    CheckpointError,
    apply_state,
    check_format_version,
    encode_config,
    file_header,
    flatten_tensor,
    read_state,
    tensor_identity,
)

__all__ = ["save_pretrained", "from_pretrained", "checkpoint_info", "is_lowbit_checkpoint", "summarize_configs",
           "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 512 * 2**20
_SHARD = "lowbit-{:05d}-of-{:05d}.safetensors"
_SHARD_RE = re.compile(r"lowbit-\d{5}-of-\d{5}\.safetensors")
# source files that are weights or that this module rewrites; every other file is copied
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack)|.*\.index\.json|config\.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- transformers ----------------------------------------------------------------------------------


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "lowbit's transformers checkpoints need transformers: pip install 'transformers>=4.45'"
        ) from e
    return transformers


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} has no {path.name}: not a transformers {what} directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _model_dir(path) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path to a directory, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a file; a transformers model is a directory with config.json")
    return p


def _model_class(config):
    """The transformers class named by ``config.architectures`` (a ``...ForCausalLM`` usually)."""
    tf = _transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    for auto in (tf.AutoModelForCausalLM, tf.AutoModel):
        try:
            auto._model_mapping[type(config)]  # noqa: B018  (raises KeyError when unknown)
            return auto
        except KeyError:
            continue
    raise ValueError(f"model_type {config.model_type!r} has no transformers model class in this transformers "
                     f"{tf.__version__} (architectures={getattr(config, 'architectures', None)})")


def _build(config, dtype: torch.dtype, device: str):
    """The model for ``config`` with ``dtype`` parameters on ``device`` ("meta" for a skeleton).

    On a real device parameters are allocated but never initialised or touched (transformers'
    ``no_init_weights``), so their pages stay out of memory until the checkpoint's tensors replace them;
    buffers computed in ``__init__`` (rotary frequencies) are real.
    """
    tf = _transformers()
    cls = _model_class(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            if cls in (tf.AutoModelForCausalLM, tf.AutoModel):
                model = cls.from_config(config)
            else:
                model = cls(config)
    finally:
        torch.set_default_dtype(old)
    if hasattr(model, "tie_weights"):  # no_init_weights skips it; tied tensors must be one object
        model.tie_weights()
    return model.eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_dtype(config_dict: dict) -> torch.dtype:
    name = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"config.json has dtype {name!r}; lowbit reads float32, bfloat16 and float16 checkpoints")
    return _DTYPES[name]


def _resolve_dtype(dtype, config_dict: dict) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return _config_dtype(config_dict)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: 'auto', {', '.join(map(repr, _DTYPES))}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype!r}; allowed: 'auto', torch.float32, torch.bfloat16, torch.float16")
    return dtype


# --- writing ------------------------------------------------------------------------------------------


def _release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps freed heap pages otherwise, and a
    streaming pass would look, and be, as large as everything it ever held). A no-op off glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


class _ShardWriter:
    """Collects plain tensors and metadata entries; writes a shard whenever ``max_bytes`` would be passed.

    Shards are written under temporary names and renamed to ``lowbit-i-of-N`` at ``close`` (N is known
    only then).
    """

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}
        self.modules: dict[str, dict] = {}
        self.nbytes = 0
        self.written: list[Path] = []
        self.total_bytes = 0

    def add(self, plain: dict[str, torch.Tensor], entry: tuple[str, dict] | None = None,
            module: tuple[str, QuantConfig] | None = None) -> None:
        size = sum(t.numel() * t.element_size() for t in plain.values())
        if self.tensors and self.nbytes + size > self.max_bytes:
            self.flush()
        self.tensors.update(plain)
        if entry is not None:
            self.entries[entry[0]] = entry[1]
        if module is not None:
            self.modules[module[0]] = encode_config(module[1])
        self.nbytes += size
        self.total_bytes += size

    def alias(self, key: str, target: str) -> None:
        self.entries[key] = {"alias": target}

    def flush(self) -> None:
        if not self.tensors and not self.entries and not self.modules:
            return
        path = self.out_dir / f".lowbit-part-{len(self.written):05d}.safetensors"
        save_file(self.tensors, str(path), metadata=file_header(self.entries, self.modules))
        self.written.append(path)
        self.tensors, self.entries, self.modules, self.nbytes = {}, {}, {}, 0
        _release_freed_memory()

    def close(self) -> list[str]:
        self.flush()
        names = []
        for i, path in enumerate(self.written):
            name = _SHARD.format(i + 1, len(self.written))
            path.rename(self.out_dir / name)
            names.append(name)
        return names


def _prepare_out_dir(out_dir, source: Path | None, overwrite: bool) -> Path:
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir must be a str or Path, got {type(out_dir).__name__}")
    out = Path(out_dir)
    if source is not None and out.resolve() == source.resolve():
        raise ValueError(f"out_dir {out} is the source directory; write the quantized model elsewhere")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} is a file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out_dir {out} is not empty (pass overwrite=True / --overwrite to replace it)")
        for old in out.iterdir():  # only what a checkpoint consists of: never an unrelated tree
            if old.is_file() and (_SHARD_RE.fullmatch(old.name) or old.name.startswith(".lowbit-part-")):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_config(out: Path, config_dict: dict, dtype: torch.dtype, shards: list[str], quantization: dict) -> None:
    from lowbit.version import __version__

    config_dict = dict(config_dict)
    config_dict.pop("torch_dtype", None)
    config_dict["dtype"] = _dtype_name(dtype)
    config_dict["lowbit"] = {
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "dtype": _dtype_name(dtype),
        "shards": shards,
        "quantization": quantization,
    }
    with open(out / "config.json", "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")


def _state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """``(key, tensor, alias_of)`` for the model's state; a tied tensor (float, or quantized once for
    several modules) is an alias of its first key."""
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = tensor_identity(t)
        if ident is not None and ident in seen:
            yield key, t, seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        yield key, t, None


def save_pretrained(model: nn.Module, out_dir, tokenizer=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = False) -> Path:
    """Save a (quantized) transformers model as a lowbit checkpoint directory.

    Args:
        model: a transformers ``PreTrainedModel`` (after ``quantize_``; a float model saves too).
        out_dir: the directory to write (created; must be empty unless ``overwrite``).
        tokenizer: optional; its ``save_pretrained(out_dir)`` is called.
        max_shard_bytes: start a new shard file past this many bytes.
        overwrite: replace the shards of a checkpoint already in ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        TypeError: ``model`` has no transformers ``config``.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.

    Example:
        >>> quantize_(model, Int8WeightOnlyConfig())
        >>> lowbit.save_pretrained(model, "smollm2-int8", tokenizer)
        >>> model = lowbit.from_pretrained("smollm2-int8")
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    _check_shard_bytes(max_shard_bytes)
    out = _prepare_out_dir(out_dir, None, overwrite)
    dtype = _float_dtype(model)
    writer = _ShardWriter(out, max_shard_bytes)
    for key, t, alias in _state_items(model):
        if alias is not None:
            writer.alias(key, alias)
            continue
        plain, entry = flatten_tensor(key, t)
        writer.add(plain, (key, entry) if entry is not None else None)
    # module configs go to the shard file that holds the last tensor; read_state merges all shards
    for fqn, m in model.named_modules():
        if hasattr(m, "lowbit_config"):
            writer.modules[fqn] = encode_config(m.lowbit_config)
    shards = writer.close()
    configs = {fqn: repr(m.lowbit_config) for fqn, m in model.named_modules() if hasattr(m, "lowbit_config")}
    _write_config(out, config.to_dict(), dtype, shards, {"by": "save_pretrained", "modules": summarize_configs(configs)})
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_shard_bytes(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"max_shard_bytes={n!r} must be a positive int")


def summarize_configs(configs: Mapping[str, str]) -> dict[str, int]:
    """``{config repr: number of modules}``."""
    out: dict[str, int] = {}
    for c in configs.values():
        out[c] = out.get(c, 0) + 1
    return out


# --- reading ------------------------------------------------------------------------------------------


def is_lowbit_checkpoint(path) -> bool:
    """True when ``path`` is a directory whose config.json has a ``"lowbit"`` entry."""
    p = Path(path)
    try:
        with open(p / "config.json") as f:
            return "lowbit" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False


def _lowbit_meta(path: Path) -> tuple[dict, dict]:
    config_dict = _read_json(path / "config.json", "model")
    meta = config_dict.get("lowbit")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a lowbit checkpoint (its config.json has no 'lowbit' entry): load it with "
                         "transformers' from_pretrained, or quantize it first (lowbit.quantize_pretrained / lowbit quantize)")
    check_format_version(meta.get("format_version"), path)
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        raise CheckpointError(f"{path}/config.json: lowbit entry lists no shard files")
    bad = [s for s in shards if not isinstance(s, str) or not _SHARD_RE.fullmatch(s)]
    if bad:  # a shard is a file of this directory, never a path elsewhere
        raise CheckpointError(f"{path}/config.json: lowbit shards {bad[:3]!r:.200} are not shard file names "
                              f"(allowed: {_SHARD.format(1, 1)!r}-style names in the directory)")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks shard file(s) {missing} listed in its config.json")
    return config_dict, meta


def from_pretrained(path, *, device: str | torch.device = "cpu"):
    """Load a lowbit checkpoint directory (``save_pretrained`` / ``quantize_pretrained``) as a transformers model.

    The model is built from the saved config without initialising its weights, then the saved
    tensors (plain and quantized) are assigned; every quantized module gets its config back.
    Nothing is unpickled (safetensors and JSON only). ``generate()`` works as on the float model.

    Args:
        path: the checkpoint directory.
        device: where the tensors are loaded.

    Returns:
        The model, in eval mode. Its tokenizer loads with ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        FileNotFoundError: no such directory, no config.json, or a listed shard is missing.
        ValueError: not a lowbit checkpoint, a newer format version, or an unknown config class.
        ImportError: transformers is not installed.
    """
    p = _model_dir(path)
    config_dict, meta = _lowbit_meta(p)
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(p, local_files_only=True)
    dtype = _config_dtype({"dtype": meta.get("dtype")})
    state, configs = read_state([p / s for s in meta["shards"]], device=device)
    # parameters are allocated but never written (no pages touched) before the checkpoint's tensors
    # replace them; buffers computed in __init__ (rotary frequencies) are real
    model = _build(config, dtype, str(device))
    apply_state(model, state, configs, where=p)
    hugepages.advise_model(model)  # as quantize_ does (lowbit.kernels.hugepages)
    try:
        model.generation_config = tf.GenerationConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError):
        pass
    return model.eval()


# --- inspection -------------------------------------------------------------------------------------


def checkpoint_info(path) -> dict:
    """What a lowbit checkpoint holds, read from metadata only (no tensor data is loaded).

    ``path``: a checkpoint directory or a single file written by ``lowbit.save``. Returns a dict
    with ``format_version``, ``lowbit_version``, ``dtype``, ``model_type``, ``files``, ``bytes``
    (tensor bytes on disk), ``quantized_bytes`` / ``float_bytes`` (their split), ``float_params``
    (elements of the unquantized tensors), ``modules`` (``{fqn: config repr}``) and
    ``configs`` (``{config repr: count}``).

    Raises:
        FileNotFoundError / ValueError: as :func:`from_pretrained`; a file without lowbit metadata.
    """
    from lowbit.serialization import decode_config, read_headers

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    info: dict = {"path": str(p)}
    if p.is_dir():
        config_dict, meta = _lowbit_meta(p)
        files = [p / s for s in meta["shards"]]
        info.update(format_version=meta["format_version"], lowbit_version=meta.get("lowbit_version"),
                    dtype=meta.get("dtype"), model_type=config_dict.get("model_type"),
                    architectures=config_dict.get("architectures"), quantization=meta.get("quantization"))
    else:
        files = [p]
    modules: dict[str, str] = {}
    quantized_bytes = float_bytes = 0
    quantized_keys: set[str] = set()
    version = None
    for f, header in zip(files, read_headers(files)):  # checked as from_pretrained checks them
        version = header["format_version"]
        for fqn, c in header["modules"].items():
            modules[fqn] = repr(decode_config(c))
        quantized_keys.update(k for k, e in header["entries"].items() if "alias" not in e)
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes = n * _itemsize(sl.get_dtype())
                if k.split(":")[0] in quantized_keys and ":" in k:
                    quantized_bytes += nbytes
                else:
                    float_bytes += nbytes
    info.setdefault("format_version", version)
    info.update(files=[f.name for f in files], bytes=quantized_bytes + float_bytes, quantized_bytes=quantized_bytes,
                float_bytes=float_bytes, modules=dict(sorted(modules.items(), key=lambda kv: _natural(kv[0]))),
                configs=summarize_configs(modules))
    return info


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _itemsize(code: str) -> int:
    return _ITEMSIZE.get(code, 1)


def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]
