"""Quantized transformers checkpoints on disk: save, load, and quantize a checkpoint by streaming it.

A lowbit checkpoint is a directory:

* ``config.json``: the model's transformers config, with a ``"lowbit"`` entry (format version,
  lowbit version, the float dtype, the shard files, the quantization that made it);
* ``lowbit-00001-of-0000N.safetensors``: shards in lowbit's safetensors format (plain tensors and
  JSON metadata, see ``lowbit.serialization``); each shard's metadata describes the tensors it
  holds and the configs of the modules whose weights it holds;
* the source's other files (tokenizer, generation config, chat template), copied unchanged.

The weight files are deliberately not named ``model.safetensors``: transformers' own
``from_pretrained`` on such a directory fails with "no file named model.safetensors" instead of
loading quantized parts as garbage. Load with :func:`from_pretrained`.

:func:`quantize_pretrained` reads a float checkpoint one tensor at a time (each source shard is
opened, one tensor read, and closed again, so no mapped file stays resident) and writes the
quantized shards as they fill: peak memory is about one layer's float weights plus one output
shard, whatever the model's size.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.configs.base import QuantConfig, get_handler
from lowbit.quantize import ConfigMapping, _resolve, check_config
from lowbit.serialization import (
    FORMAT_VERSION,
    apply_state,
    check_format_version,
    encode_config,
    file_header,
    flatten_tensor,
    read_state,
)
from lowbit.tensors.base import QuantizedTensor

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "quantize_pretrained",
    "checkpoint_info",
    "is_lowbit_checkpoint",
    "use_packed_gqa_attention",
    "PACKED_GQA_ATTENTION",
    "QuantizeSummary",
    "DEFAULT_MAX_SHARD_BYTES",
]

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
        if not self.tensors and not self.entries:
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
    """``(key, tensor, alias_of)`` for the model's state; a tied float tensor is an alias of its first key."""
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, QuantizedTensor) and t.numel():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in seen:
                yield key, t, seen[ident]
                continue
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
        raise ValueError(f"{path}/config.json: lowbit entry lists no shard files")
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
    apply_state(model, state, configs)
    try:
        model.generation_config = tf.GenerationConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError):
        pass
    return model.eval()


# --- streaming quantization -------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizeSummary:
    """What :func:`quantize_pretrained` did."""

    out_dir: Path
    configs: dict[str, str]  # module name -> repr of its config
    skipped: list[str]  # linear modules left float by skip / the mapping
    source_bytes: int  # float tensors read
    output_bytes: int  # tensors written
    shards: list[str]
    seconds: float  # the whole call, reading and writing included
    quantize_seconds: float  # inside the config handlers only
    dtype: str

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _source_files(src: Path) -> dict[str, Path]:
    """``{tensor key: shard path}`` of a safetensors checkpoint (single file or indexed shards)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "model").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        return {k: src / v for k, v in weight_map.items()}
    single = src / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    others = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(f"{src} has no model.safetensors or model.safetensors.index.json{hint}")


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    # one open per tensor: closing the file unmaps it, so its pages leave this process's memory
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def _selection(config, skip) -> tuple[Callable[[str], QuantConfig | None], list[str]]:
    """``(choose, names)``: ``choose(fqn)`` is the config for a module (None: left float; skip wins over
    ``config``), ``names`` the exact module names given (checked to exist)."""
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip or [])
    for s in skip:
        if not isinstance(s, str):
            raise TypeError(f"skip entries must be module names or 're:<regex>' strings, got {s!r}")
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as e:
                raise ValueError(f"skip {s!r} is not a valid regex: {e}") from None
    skip_map = {s: None for s in skip}
    check_config(config)

    def choose(fqn: str) -> QuantConfig | None:
        if _resolve(skip_map, fqn)[0]:
            return None
        if isinstance(config, Mapping):
            return _resolve(config, fqn)[1]
        return config

    names = [k for k in [*skip_map, *(config if isinstance(config, Mapping) else [])] if not k.startswith("re:")]
    return choose, names


def quantize_pretrained(
    model_dir,
    out_dir,
    config: QuantConfig | ConfigMapping,
    *,
    skip: str | list[str] | None = None,
    dtype: str | torch.dtype = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> QuantizeSummary:
    """Quantize a transformers safetensors checkpoint on disk into a lowbit checkpoint, streaming.

    The model is built on the ``meta`` device (no memory) only to learn which tensors are
    ``nn.Linear`` weights and which are tied; then each tensor is read alone from its source
    shard, cast to ``dtype``, quantized by the same handler ``quantize_`` uses (linears) or kept
    (norms, embeddings, biases), and appended to the output shard, which is written and freed when
    it reaches ``max_shard_bytes``. Peak memory: about one tensor of float weights, its quantized
    copy and one output shard. The result equals ``quantize_`` on the loaded model (tested).

    Args:
        model_dir: a transformers model directory (config.json + model.safetensors or an index).
        out_dir: where the lowbit checkpoint goes (created; must be empty unless ``overwrite``).
        config: one config for every linear, or a mapping as ``quantize_`` takes.
        skip: module names or ``"re:<regex>"`` patterns left float (they win over ``config``).
        dtype: the float dtype of the result (activations, scales' compute and unquantized
            tensors): ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        max_shard_bytes: output shard size.
        overwrite: replace a checkpoint already in ``out_dir``.
        progress: a tqdm bar on stderr (None: only on a terminal).
        filter_fn: ``fn(module, fqn) -> bool`` selecting modules (default every ``nn.Linear``).

    Returns:
        A :class:`QuantizeSummary`.

    Raises:
        FileNotFoundError: missing directory, config.json or safetensors weights.
        ValueError: already a lowbit checkpoint; no linear selected; checkpoint keys that do not
            match the model transformers builds from its config; a shape a config can't split.
    """
    t0 = time.perf_counter()
    src = _model_dir(model_dir)
    config_dict = _read_json(src / "config.json", "model")
    if "lowbit" in config_dict:
        raise ValueError(f"{src} is already a lowbit checkpoint; quantize its float source instead")
    choose, exact_names = _selection(config, skip)
    _check_shard_bytes(max_shard_bytes)
    dtype = _resolve_dtype(dtype, config_dict)
    files = _source_files(src)
    tf = _transformers()
    hf_config = tf.AutoConfig.from_pretrained(src, local_files_only=True)
    skeleton = _build(hf_config, dtype, "meta")
    filter_fn = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))

    # which state keys are the same tensor (tied), and which come from which checkpoint key
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for key, p in params.items():
        if key in files:
            canonical.setdefault(id(p), key)
    state_keys = list(skeleton.state_dict().keys())
    linears: dict[str, tuple[nn.Module, QuantConfig]] = {}
    skipped: list[str] = []
    any_linear = False
    for fqn, module in skeleton.named_modules():
        if not filter_fn(module, fqn):
            continue
        any_linear = True
        chosen = choose(fqn)
        if chosen is not None:
            linears[fqn] = (module, chosen)
        else:
            skipped.append(fqn)
    if not any_linear:
        others = sorted({type(m).__name__ for m in skeleton.modules()
                         if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                         and not isinstance(m, nn.Embedding)})
        hint = f"; its 2-D weights are in {', '.join(others)} modules, which lowbit does not quantize" if others else ""
        raise ValueError(f"{src}: model type {hf_config.model_type!r} ({type(skeleton).__name__}) has no nn.Linear "
                         f"modules to quantize{hint}")
    if not linears:
        raise ValueError(f"{src}: every linear is skipped ({len(skipped)} matched skip / None): nothing to quantize")
    unknown = [k for k in exact_names if k not in dict(skeleton.named_modules())]
    if unknown:
        raise ValueError(f"config mapping / skip names modules that do not exist: {unknown}")

    def source_key(key: str) -> str:
        if key in files:
            return key
        p = params.get(key)
        if p is not None and id(p) in canonical:
            return canonical[id(p)]
        raise ValueError(f"{src}: the model transformers builds from config.json has tensor {key!r}, which the "
                         f"checkpoint lacks (checkpoint keys look like {sorted(files)[:3]}...)")

    weight_keys = {f"{fqn}.weight": fqn for fqn in linears}
    plan = [(k, source_key(k)) for k in state_keys]
    extra = sorted(set(files) - {s for _, s in plan})
    if extra:
        raise ValueError(f"{src}: checkpoint tensors {extra[:5]}{'...' if len(extra) > 5 else ''} have no place in "
                         f"the {type(skeleton).__name__} transformers builds from its config.json")

    out = _prepare_out_dir(out_dir, src, overwrite)
    writer = _ShardWriter(out, max_shard_bytes)
    written: dict[str, str] = {}  # source key -> first output key that holds it as a plain tensor
    source_bytes, quant_s, trimmed_at = 0, 0.0, 0
    bar = _progress(len(plan), progress, f"quantizing {src.name}")
    try:
        for key, skey in plan:
            fqn = weight_keys.get(key)
            if fqn is None and skey in written:  # a tied float tensor: store once
                writer.alias(key, written[skey])
                bar.update(1)
                continue
            t = _read_tensor(files[skey], skey)
            source_bytes += t.numel() * t.element_size()
            if t.is_floating_point():
                t = t.to(dtype)
            if fqn is None:
                plain, _ = flatten_tensor(key, t)
                writer.add(plain)
                written.setdefault(skey, key)
            else:
                module, chosen = linears[fqn]
                tmp = _linear_like(module, t)
                tq = time.perf_counter()
                get_handler(chosen)(tmp, chosen, fqn)
                quant_s += time.perf_counter() - tq
                plain, entry = flatten_tensor(key, tmp.weight.data if isinstance(tmp.weight, nn.Parameter) else tmp.weight)
                writer.add(plain, (key, entry) if entry is not None else None, (fqn, tmp.lowbit_config))
                del tmp
            del t
            if source_bytes - trimmed_at > 64 * 2**20:
                _release_freed_memory()
                trimmed_at = source_bytes
            bar.update(1)
        shards = writer.close()
    finally:
        bar.close()
        for part in out.glob(".lowbit-part-*.safetensors"):
            part.unlink()
    configs = {fqn: repr(c) for fqn, (_, c) in linears.items()}
    quantization = {
        "by": "quantize_pretrained",
        "source": str(src),
        "skip": list(skip) if isinstance(skip, (list, tuple)) else ([skip] if skip else []),
        "modules": summarize_configs(configs),
    }
    _write_config(out, config_dict, dtype, shards, quantization)
    for f in src.iterdir():
        if f.is_file() and not _NOT_COPIED.fullmatch(f.name):
            shutil.copy2(f, out / f.name)
    return QuantizeSummary(out, configs, skipped, source_bytes, writer.total_bytes, shards,
                           time.perf_counter() - t0, quant_s, _dtype_name(dtype))


def _linear_like(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A stand-in for ``module`` (a skeleton linear on meta) with a real weight (the bias is not needed:
    biases are separate state keys, stored as they are)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"streaming quantization handles nn.Linear modules, got {type(module).__name__}")
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"checkpoint weight has shape {tuple(weight.shape)}, the model expects "
                         f"{tuple(module.weight.shape)}")
    tmp = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(tmp)
    tmp.in_features, tmp.out_features = module.in_features, module.out_features
    tmp.weight = nn.Parameter(weight, requires_grad=False)
    tmp.bias = None
    return tmp


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, progress: bool | None, desc: str):
    import sys

    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


# --- attention for decoding -------------------------------------------------------------------------

PACKED_GQA_ATTENTION = "lowbit_sdpa"


def _packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, except that one decoded token of a grouped-query model runs on the
    key/value heads: query ``(B, H, 1, D)`` -> ``(B, H_kv, H / H_kv, D)`` against the unrepeated cache.

    transformers does this itself in eager mode but not under torch.compile, where it materializes
    the repeated cache (``repeat_kv``) every step; on CPU that attention cost 0.43-0.48 ms per layer
    against 0.1 ms packed (d=2048, 32/4 heads, 288 cached tokens).
    """
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] == 1 and n_rep > 1 and not dropout and kwargs.get("cache") is None
            and kwargs.get("position_bias") is None and (attention_mask is None or attention_mask.shape[1] == 1)):
        b, h, _, d = query.shape
        out = F.scaled_dot_product_attention(query.reshape(b, h // n_rep, n_rep, d), key, value,
                                             attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_packed_gqa_attention(model: nn.Module | None = None) -> str:
    """Register the ``"lowbit_sdpa"`` attention with transformers and switch ``model`` to it.

    It is transformers' sdpa attention (same masks: the sdpa mask function is registered under the
    same name, without which transformers would pass no mask at all) whose single-token decode step
    of a grouped-query model runs on the key/value heads also under ``torch.compile``. Same values
    as ``"sdpa"`` (equal in eager, tested); what changes is the compiled decode speed.

    Args:
        model: a transformers model to switch (``set_attn_implementation``); None only registers.

    Returns:
        The implementation name, for ``from_pretrained(..., attn_implementation=...)``.

    Raises:
        ImportError: transformers without ``AttentionInterface`` / ``AttentionMaskInterface``.
    """
    _transformers()
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as e:
        raise ImportError("use_packed_gqa_attention needs transformers with AttentionInterface and "
                          "AttentionMaskInterface: pip install -U 'transformers>=4.56'") from e
    AttentionInterface.register(PACKED_GQA_ATTENTION, _packed_gqa_sdpa)
    AttentionMaskInterface.register(PACKED_GQA_ATTENTION, sdpa_mask)
    if model is not None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(PACKED_GQA_ATTENTION)
        else:
            model.config._attn_implementation = PACKED_GQA_ATTENTION
    return PACKED_GQA_ATTENTION


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
    from lowbit.serialization import decode_config, read_header

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
    for f in files:
        header = read_header(f)
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
