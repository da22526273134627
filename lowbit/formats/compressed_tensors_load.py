"""Reading compressed-tensors checkpoints into lowbit tensors (``lowbit.formats.compressed_tensors`` has the
format's description, the mapping table and the writer): values, scales and zero points become
``Int4Tensor`` / ``Int8Tensor`` / ``Float8Tensor`` fields unchanged, nothing is re-quantized."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.formats.compressed_tensors import (
    QUANT_METHOD,
    READ_FORMATS,
    UnsupportedLayersError,
    _PACKED,
    _bytes,
    _ct,
    _nibbles_to_bytes,
    _unpack_zero_point,
)
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.pretrained.checkpoint import (
    _build,
    _config_dtype,
    _model_dir,
    _read_json,
    _transformers,
)
from lowbit.serialization import CheckpointError, apply_state
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import GROUP_SIZES, Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["is_compressed_tensors_checkpoint", "load_compressed_tensors"]


# --- CT checkpoint -> lowbit -------------------------------------------------------------------------


def is_compressed_tensors_checkpoint(path) -> bool:
    """True when ``path`` is a directory whose config.json has ``quantization_config.quant_method ==
    "compressed-tensors"``."""
    try:
        with open(Path(path) / "config.json") as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _parse_config(qc, where: Path):
    """The checkpoint's ``QuantizationConfig`` (compressed-tensors' pydantic model), checked for what
    lowbit reads."""
    QuantizationConfig, _ = _ct()
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ValueError(f"{where} is not a compressed-tensors checkpoint (quantization_config.quant_method="
                         f"{method!r}, expected {QUANT_METHOD!r})")
    version = qc.get("version")
    if version is not None:
        try:
            major = int(str(version).split(".")[0])
        except ValueError:
            major = None
        if major != 0:
            raise CheckpointError(f"{where}: compressed-tensors version {version!r} is not one this reader knows "
                                  "(it reads the 0.x format)")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise CheckpointError(f"{where}: {key} is set ({str(qc[key])[:120]}); lowbit imports quantized weights "
                                  "without sparsity or transforms")
    fields = {k: v for k, v in qc.items() if k in QuantizationConfig.model_fields}
    try:
        parsed = QuantizationConfig.model_validate(fields)
    except Exception as e:  # pydantic's ValidationError, or the schema's own checks
        raise CheckpointError(f"{where}: quantization_config does not validate as compressed-tensors' "
                              f"QuantizationConfig: {e}") from None
    if parsed.kv_cache_scheme is not None:
        raise CheckpointError(f"{where}: kv_cache_scheme is set; lowbit has no quantized kv cache")
    if str(getattr(parsed.quantization_status, "value", parsed.quantization_status)) != "compressed":
        raise CheckpointError(f"{where}: quantization_status={parsed.quantization_status!r}; lowbit reads "
                              "'compressed' checkpoints (quantized values on disk)")
    return parsed


def _read_tensors(p: Path, device) -> dict[str, torch.Tensor]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index, "model")["weight_map"].values()))
    elif (p / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{p} has no model.safetensors (or model.safetensors.index.json)")
    out = {}
    for name in files:
        if "/" in name or "\\" in name:
            raise CheckpointError(f"{p}: shard {name!r} is not a file of the directory")
        with safe_open(str(p / name), framework="pt", device=str(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _lowbit_config(scheme, fqn: str, tensors: dict):
    """The lowbit config of the same numerics as ``scheme`` (and the module's static tensors)."""
    w, a = scheme.weights, scheme.input_activations

    def refuse(why):
        raise _Refused(why)

    if w is None:
        refuse("activation-only scheme (no quantized weight)")
    if scheme.output_activations is not None:
        refuse("output activation quantization")
    if w.dynamic or w.strategy not in ("group", "channel", "tensor"):
        refuse(f"weight strategy {w.strategy!r} dynamic={w.dynamic} (lowbit reads static group/channel/tensor)")
    if a is not None and (a.num_bits != 8 or a.strategy not in ("token", "tensor")):
        refuse(f"input activations num_bits={a.num_bits} strategy={a.strategy!r}")
    a_kind = None if a is None else (a.type, a.strategy, bool(a.dynamic))
    if w.type == "int" and w.num_bits == 4:
        if w.strategy != "group" or w.group_size not in GROUP_SIZES:
            refuse(f"int4 {w.strategy} group_size={w.group_size} (lowbit's int4 groups: {GROUP_SIZES})")
        if a is None:
            return Int4WeightOnlyConfig(group_size=w.group_size, symmetric=w.symmetric)
        if w.symmetric and a_kind == ("int", "token", True) and not a.symmetric:
            return Int8DynamicActivationInt4WeightConfig(group_size=w.group_size)
        if w.symmetric and a_kind == ("float", "token", True):
            return Float8DynamicActivationInt4WeightConfig(group_size=w.group_size)
        refuse("int4 weights with these activations (lowbit: none, int8 per-token dynamic asymmetric, or float8 "
               "per-token dynamic, with symmetric weights)")
    gran = {"channel": PerRow(), "tensor": PerTensor()}.get(w.strategy) or PerGroup(w.group_size)
    if w.type == "int" and w.num_bits == 8:
        if not w.symmetric:
            refuse("asymmetric int8 weights (lowbit's int8 weights are symmetric)")
        if a is None:
            return Int8WeightOnlyConfig(granularity=gran)
        if w.strategy == "group":
            refuse("int8 group weights with int8 activations")
        if a_kind == ("int", "token", True):
            return Int8DynamicActivationInt8WeightConfig(act_symmetric=a.symmetric, granularity=gran)
        if a_kind == ("int", "tensor", False):
            s = _need(tensors, fqn, "input_scale")
            zp = None if a.symmetric else int(_need(tensors, fqn, "input_zero_point").reshape(-1)[0])
            return Int8StaticActivationInt8WeightConfig(act_scale=float(s.reshape(-1)[0]), act_zero_point=zp,
                                                        granularity=gran)
        refuse(f"int8 weights with {a.type} {a.strategy} dynamic={a.dynamic} activations")
    if w.type == "float" and w.num_bits == 8:
        if w.strategy == "group":
            refuse("float8 group weights (lowbit: per channel or per tensor)")
        if a is None:
            return Float8WeightOnlyConfig(granularity=gran)
        if a_kind == ("float", "token", True) and w.strategy == "channel":
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if a_kind == ("float", "tensor", True) and w.strategy == "tensor":
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())
        if a_kind == ("float", "tensor", False):
            s = _need(tensors, fqn, "input_scale")
            return Float8StaticActivationFloat8WeightConfig(act_scale=float(s.reshape(-1)[0]), granularity=gran)
        refuse(f"float8 {w.strategy} weights with {a.type} {a.strategy} dynamic={a.dynamic} activations")
    refuse(f"weights type={w.type} num_bits={w.num_bits}")


class _Refused(Exception):
    pass


def _need(tensors: dict, fqn: str, name: str) -> torch.Tensor:
    key = f"{fqn}.{name}"
    if key not in tensors:
        raise CheckpointError(f"tensor {key!r} is missing (its scheme needs it)")
    return tensors[key]


def _import_weight(fqn: str, module: nn.Linear, scheme, fmt: str, tensors: dict, dtype: torch.dtype):
    """``(lowbit tensor, config, keys used)`` for one compressed linear."""
    n, k = module.out_features, module.in_features
    config = _lowbit_config(scheme, fqn, tensors)
    w = scheme.weights
    used = {f"{fqn}.{x}" for x in ("weight_scale", "weight_zero_point", "weight_shape", "weight_packed", "weight",
                                    "input_scale", "input_zero_point", "weight_g_idx") if f"{fqn}.{x}" in tensors}
    g_idx = tensors.get(f"{fqn}.weight_g_idx")
    if g_idx is not None:
        if w.strategy != "group" or not torch.equal(g_idx.long().reshape(-1).cpu(), torch.arange(k) // w.group_size):
            raise _Refused("weight_g_idx is not arange(K) // group_size (act-order without static groups): no "
                           "lowbit layout holds a permuted group assignment")
    if w.strategy == "group" and k % w.group_size:
        raise CheckpointError(f"{fqn}: group_size={w.group_size} does not divide in_features={k}")
    scale = _need(tensors, fqn, "weight_scale").float()
    want = {"group": (n, k // max(w.group_size or 1, 1)), "channel": (n, 1), "tensor": (1, 1)}[w.strategy]
    if scale.numel() != want[0] * want[1]:
        raise CheckpointError(f"{fqn}.weight_scale has shape {tuple(scale.shape)}; a {w.strategy} scale of a "
                              f"({n}, {k}) weight has {want}")
    scale = scale.reshape(want).contiguous()
    packed = fmt == _PACKED
    if packed:
        shape = tuple(int(x) for x in _need(tensors, fqn, "weight_shape").reshape(-1).tolist())
        if shape != (n, k):
            raise CheckpointError(f"{fqn}.weight_shape is {list(shape)}, the model's linear is ({n}, {k})")
        raw = _need(tensors, fqn, "weight_packed")
        want_words = math.ceil(k * w.num_bits / 32)
        if raw.dtype != torch.int32 or tuple(raw.shape) != (n, want_words):
            raise CheckpointError(f"{fqn}.weight_packed is {raw.dtype} {tuple(raw.shape)}; expected int32 "
                                  f"({n}, {want_words})")
    else:
        raw = _need(tensors, fqn, "weight")
        if tuple(raw.shape) != (n, k):
            raise CheckpointError(f"{fqn}.weight has shape {tuple(raw.shape)}, the model's linear is ({n}, {k})")
    spec, act = config.weight_spec(), config.act_spec()
    if isinstance(config, (Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig,
                           Float8DynamicActivationInt4WeightConfig)):
        if packed:
            b = _bytes(raw, k // 2)  # CT's value + 8, two per byte, even k low: lowbit's byte layout
        else:
            _check_dtype(raw, torch.int8, fqn)
            _check_range(raw, -8, 7, f"{fqn}.weight")
            b = _nibbles_to_bytes((raw.to(torch.int16) + 8).to(torch.uint8))
        zp = None
        if not w.symmetric:
            z = _need(tensors, fqn, "weight_zero_point")
            z = _unpack_zero_point(z, n) if packed else z.to(torch.int16)
            if tuple(z.shape) != want:
                raise CheckpointError(f"{fqn}.weight_zero_point has shape {tuple(z.shape)}, expected {want}")
            _check_range(z, -8, 7, f"{fqn}.weight_zero_point")
            zp = (z + 8).to(torch.int8).contiguous()
        qdata = b if zp is not None else b ^ 0x88
        t = Int4Tensor(qdata=qdata.contiguous(), scale=scale, zero_point=zp, spec=spec, act_spec=act,
                       kernel=config.kernel, shape=(n, k), dtype=dtype)
    elif w.type == "int":
        if packed:
            q = (_bytes(raw, k) ^ 0x80).view(torch.int8)
        else:
            _check_dtype(raw, torch.int8, fqn)
            q = raw
        static = isinstance(config, Int8StaticActivationInt8WeightConfig)
        t = Int8Tensor(qdata=q.contiguous(), scale=scale, spec=spec, act_spec=act, kernel=config.kernel, dtype=dtype,
                       act_scale=torch.tensor([config.act_scale], dtype=torch.float32) if static else None,
                       act_zero_point=(torch.tensor([config.act_zero_point], dtype=torch.int32)
                                       if static and config.act_zero_point is not None else None))
    else:
        _check_dtype(raw, torch.float8_e4m3fn, fqn)
        static = isinstance(config, Float8StaticActivationFloat8WeightConfig)
        t = Float8Tensor(qdata=raw.contiguous(), scale=scale, spec=spec, act_spec=act, kernel=config.kernel,
                         dtype=dtype, act_scale=torch.tensor([config.act_scale], dtype=torch.float32) if static else None)
    return t.to(module.weight.device), config, used


def _check_dtype(t: torch.Tensor, dtype: torch.dtype, fqn: str) -> None:
    if t.dtype != dtype:
        raise CheckpointError(f"{fqn}.weight has dtype {t.dtype}; its scheme stores {dtype}")


def _check_range(t: torch.Tensor, lo: int, hi: int, name: str) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise CheckpointError(f"{name} holds values in [{int(t.min())}, {int(t.max())}], outside [{lo}, {hi}]")


def load_compressed_tensors(path, *, device="cpu"):
    """Load a compressed-tensors checkpoint as a transformers model whose linears hold lowbit tensors.

    The stored values, scales and zero points become lowbit's ``Int4Tensor`` / ``Int8Tensor`` /
    ``Float8Tensor`` fields unchanged (no re-quantization); each module gets the lowbit config of
    the same numerics (the module docstring's table, read right to left), so the model runs on
    lowbit's kernels and re-exports to the same checkpoint tensors.

    Args:
        path: the checkpoint directory (config.json with a compressed-tensors ``quantization_config``).
        device: where the tensors are loaded.

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: no such directory, config.json or weights.
        ValueError: not a compressed-tensors checkpoint; an unknown version, format or schema
            (``CheckpointError``); a missing or malformed tensor; ``UnsupportedLayersError``
            listing every layer whose scheme has no exact lowbit counterpart (e.g. a non-trivial
            ``weight_g_idx``) with the reason.
        ImportError: transformers or compressed-tensors is not installed.
    """
    p = _model_dir(path)
    config_dict = _read_json(p / "config.json", "model")
    qc = _parse_config(config_dict.get("quantization_config"), p)
    from compressed_tensors.utils.match import match_named_modules
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(p, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = _config_dtype(config_dict)
    tensors = _read_tensors(p, device)
    model = _build(config, dtype, str(device))

    schemes: dict[str, tuple] = {}
    for name, scheme in qc.config_groups.items():
        fmt = scheme.format or qc.format
        fmt = getattr(fmt, "value", fmt)
        for fqn, m in match_named_modules(model, scheme.targets, qc.ignore):
            schemes.setdefault(fqn, (m, scheme, fmt, name))
    bad: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    configs = {}
    used: set[str] = set()
    for fqn, (m, scheme, fmt, group) in schemes.items():
        if not isinstance(m, nn.Linear):
            bad[fqn] = f"{type(m).__name__} is quantized by {group}; lowbit imports quantized nn.Linear weights only"
            continue
        if fmt not in READ_FORMATS:
            bad[fqn] = f"format {fmt!r} ({group}); lowbit reads {', '.join(READ_FORMATS)}"
            continue
        try:
            t, cfg, keys = _import_weight(fqn, m, scheme, fmt, tensors, dtype)
        except _Refused as e:
            bad[fqn] = f"{e} ({group})"
            continue
        state[f"{fqn}.weight"] = t
        configs[fqn] = cfg
        used |= keys
    if bad:
        raise UnsupportedLayersError(f"{p}: these layers have no exact lowbit equivalent", bad)
    own = model.state_dict()
    for key, t in tensors.items():
        if key in used:
            continue
        if key not in own:
            raise CheckpointError(f"{p}: tensor {key!r} belongs to no parameter of {type(model).__name__} and "
                                  "to no quantized layer's scheme (is a config group missing?)")
        state[key] = t.to(own[key].dtype) if t.is_floating_point() and own[key].is_floating_point() else t
    # tied parameters (an output head sharing the embedding) are stored once
    by_id: dict[int, str] = {}
    for key, t in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(t), key)
        if key not in state and first in state:
            state[key] = state[first]
    apply_state(model, state, configs, where=p)
    try:
        model.generation_config = tf.GenerationConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError):
        pass
    return model.eval()
