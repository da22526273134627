"""``quantize_pretrained``: a transformers safetensors checkpoint quantized from disk, one tensor at a time."""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from torch import nn

from lowbit.configs.base import QuantConfig, get_handler
from lowbit.pretrained.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    _NOT_COPIED,
    _ShardWriter,
    _build,
    _check_shard_bytes,
    _dtype_name,
    _model_dir,
    _prepare_out_dir,
    _read_json,
    _release_freed_memory,
    _resolve_dtype,
    _transformers,
    _write_config,
    summarize_configs,
)
from lowbit.quantize import ConfigMapping, _resolve, check_config
from lowbit.serialization import flatten_tensor

__all__ = ["quantize_pretrained", "QuantizeSummary"]

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
