"""``quantize_pretrained``: a transformers safetensors checkpoint quantized from disk, one tensor at a time."""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

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
from lowbit.quantize.plan import ConfigMapping, check_config, plan_quantization
from lowbit.serialization import encode_config, flatten_tensor

__all__ = ["quantize_pretrained", "QuantizeSummary"]

# --- streaming quantization -------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizeSummary:
    """What :func:`quantize_pretrained` did."""

    out_dir: Path
    configs: dict[str, str]  # module name -> repr of the config it got (a smaller group where it had to)
    skipped: list[str]  # linear modules left float by skip / the mapping
    source_bytes: int  # float tensors read (a tied tensor once)
    output_bytes: int  # tensors written (a tied tensor once)
    shards: list[str]
    seconds: float  # the whole call, reading and writing included
    quantize_seconds: float  # inside the config handlers only
    dtype: str
    fallback: dict[str, str] = dataclasses.field(default_factory=dict)  # module -> "asked -> got" (smaller group)
    left_float: dict[str, str] = dataclasses.field(default_factory=dict)  # module or parameter -> why it stays float
    quantized_bytes: int = 0  # of output_bytes, the quantized tensors' (data, scales, zero points)
    message: str = ""  # the one summary line (also warned when something fell back or stayed float)

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


def _skip_list(skip) -> list[str]:
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip or [])
    for s in skip:
        if not isinstance(s, str):
            raise TypeError(f"skip entries must be module names or 're:<regex>' strings, got {s!r}")
    return skip


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
    strict: bool = False,
) -> QuantizeSummary:
    """Quantize a transformers safetensors checkpoint on disk into a lowbit checkpoint, streaming.

    The model is built on the ``meta`` device (no memory) only to learn which tensors are
    ``nn.Linear`` weights and which are tied; then each tensor is read alone from its source
    shard, cast to ``dtype``, quantized by the same handler ``quantize_`` uses (linears) or kept
    (norms, embeddings, biases), and appended to the output shard, which is written and freed when
    it reaches ``max_shard_bytes``. Peak memory: about one tensor of float weights, its quantized
    copy and one output shard. The result equals ``quantize_`` on the loaded model (tested).

    The policy is ``quantize_``'s, decided and checked on the skeleton before the first byte is
    written: a group that does not divide a layer falls back to a smaller one (``strict``
    raises instead); a tied weight (an output head sharing the embedding's) stays float unless
    a mapping names the head, and is then quantized once and stored once for both; a tied tensor
    is read once. What differs from "every linear got its config" is warned in one line
    (``QuantizeSummary.message``).

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
        strict: raise (listing every such module) instead of falling back to a smaller group or
            leaving a layer no group fits float.

    Returns:
        A :class:`QuantizeSummary`.

    Raises:
        FileNotFoundError: missing directory, config.json or safetensors weights.
        ValueError: already a lowbit checkpoint; no linear selected; checkpoint keys that do not
            match the model transformers builds from its config; any error ``quantize_`` raises
            before changing a model (all before anything is written).
    """
    t0 = time.perf_counter()
    src = _model_dir(model_dir)
    config_dict = _read_json(src / "config.json", "model")
    if "lowbit" in config_dict:
        raise ValueError(f"{src} is already a lowbit checkpoint; quantize its float source instead")
    skip = _skip_list(skip)
    check_config(config)
    _check_shard_bytes(max_shard_bytes)
    dtype = _resolve_dtype(dtype, config_dict)
    files = _source_files(src)
    tf = _transformers()
    hf_config = tf.AutoConfig.from_pretrained(src, local_files_only=True)
    skeleton = _build(hf_config, dtype, "meta")
    filter_fn = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))

    if not any(filter_fn(m, fqn) for fqn, m in skeleton.named_modules()):
        others = sorted({type(m).__name__ for m in skeleton.modules()
                         if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                         and not isinstance(m, nn.Embedding)})
        hint = f"; its 2-D weights are in {', '.join(others)} modules, which lowbit does not quantize" if others else ""
        raise ValueError(f"{src}: model type {hf_config.model_type!r} ({type(skeleton).__name__}) has no nn.Linear "
                         f"modules to quantize{hint}")
    # the same decisions quantize_ makes on the loaded model, all checked before anything is written
    plan = plan_quantization(skeleton, config, filter_fn, strict=strict, skip=skip)
    if not plan.steps:
        if plan.skipped and not plan.unfit and not plan.tied:
            raise ValueError(f"{src}: every linear is skipped ({len(plan.skipped)} matched skip / None): nothing to quantize")
        raise ValueError(f"{src}: nothing to quantize: {plan.describe()}")

    # which state keys are the same tensor (tied), and which come from which checkpoint key
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for key, p in params.items():
        if key in files:
            canonical.setdefault(id(p), key)
    state_keys = list(skeleton.state_dict().keys())

    def source_key(key: str) -> str:
        if key in files:
            return key
        p = params.get(key)
        if p is not None and id(p) in canonical:
            return canonical[id(p)]
        raise ValueError(f"{src}: the model transformers builds from config.json has tensor {key!r}, which the "
                         f"checkpoint lacks (checkpoint keys look like {sorted(files)[:3]}...)")

    steps = {id(s.module.weight): s for s in plan.steps}  # a quantized weight's tensor -> its step
    plan_keys = [(k, source_key(k), steps.get(id(params[k])) if k in params else None) for k in state_keys]
    extra = sorted(set(files) - {s for _, s, _ in plan_keys})
    if extra:
        raise ValueError(f"{src}: checkpoint tensors {extra[:5]}{'...' if len(extra) > 5 else ''} have no place in "
                         f"the {type(skeleton).__name__} transformers builds from its config.json")

    out = _prepare_out_dir(out_dir, src, overwrite)
    writer = _ShardWriter(out, max_shard_bytes)
    written: dict[str, str] = {}  # source key -> the output key that holds it (tied keys alias it: read once)
    source_bytes = quant_bytes = trimmed_at = 0
    quant_s = 0.0
    bar = _progress(len(plan_keys), progress, f"quantizing {src.name}")
    try:
        for key, skey, step in plan_keys:
            if skey in written:  # a tied tensor (float, or quantized once for all its users): store once
                writer.alias(key, written[skey])
                bar.update(1)
                continue
            t = _read_tensor(files[skey], skey)
            source_bytes += t.numel() * t.element_size()
            if t.is_floating_point():
                t = t.to(dtype)
            if step is None:
                plain, _ = flatten_tensor(key, t)
                writer.add(plain)
            else:
                tmp = _linear_like(step.module, t)
                tq = time.perf_counter()
                get_handler(step.config)(tmp, step.config, step.fqn)
                quant_s += time.perf_counter() - tq
                plain, entry = flatten_tensor(key, tmp.weight.data if isinstance(tmp.weight, nn.Parameter) else tmp.weight)
                writer.add(plain, (key, entry) if entry is not None else None, (step.fqn, tmp.lowbit_config))
                for fqn, _ in step.shares:  # the modules sharing the weight get it (and its config) too
                    writer.modules[fqn] = encode_config(tmp.lowbit_config)
                quant_bytes += sum(x.numel() * x.element_size() for x in plain.values()) if entry is not None else 0
                del tmp
            written[skey] = key
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
    configs = {s.fqn: repr(s.config) for s in plan.steps}
    configs.update({fqn: repr(s.config) for s in plan.steps for fqn, _ in s.shares})
    quantization = {
        "by": "quantize_pretrained",
        "source": str(src),
        "skip": skip,
        "modules": summarize_configs(configs),
    }
    _write_config(out, config_dict, dtype, shards, quantization)
    for f in src.iterdir():
        if f.is_file() and not _NOT_COPIED.fullmatch(f.name):
            shutil.copy2(f, out / f.name)
    message = "quantize_pretrained: " + plan.describe(
        before=(source_bytes, 0), after=(writer.total_bytes - quant_bytes, quant_bytes))
    if plan.notable:
        warnings.warn(message, UserWarning, stacklevel=2)
    left_float = {**plan.unfit, **{k: f"tied to {', '.join(v)}" for k, v in plan.tied.items()},
                  **{k: f"{len(v)}-D parameter outside nn.Linear" for k, v in plan.unhandled.items()}}
    return QuantizeSummary(out, configs, plan.skipped, source_bytes, writer.total_bytes, shards,
                           time.perf_counter() - t0, quant_s, _dtype_name(dtype),
                           fallback={s.fqn: f"{s.asked!r} -> {s.config!r}" for s in plan.fallbacks},
                           left_float=left_float, quantized_bytes=quant_bytes, message=message)


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
