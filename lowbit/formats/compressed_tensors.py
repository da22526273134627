"""compressed-tensors checkpoints (what vLLM, SGLang and transformers load natively), written and read exactly.

A compressed-tensors checkpoint is a transformers directory whose ``config.json`` has a
``quantization_config`` with ``quant_method: "compressed-tensors"`` (schema: the package's pydantic
``QuantizationConfig``), and whose safetensors hold, per quantized linear ``m``:

* ``pack-quantized`` (int weights, no float activations): ``m.weight_packed`` int32, 32 bits of
  consecutive values per word, value ``i`` at bit ``i * num_bits``, each value stored ``+ 2**(bits-1)``
  (signed values as unsigned); ``m.weight_shape`` int64 ``[N, K]``; asymmetric: ``m.weight_zero_point``
  signed values packed the same way along dim 0;
* ``int-quantized`` (int weights with int activations), ``float-quantized`` (float8 e4m3 with float8
  activations), ``naive-quantized`` (the rest): ``m.weight`` int8 / float8_e4m3fn, unpacked;
* ``m.weight_scale``: ``(N, K // g)`` group, ``(N, 1)`` channel, ``(1,)`` tensor; static activations
  ``m.input_scale`` ``(1,)`` (and ``m.input_zero_point`` int8 when asymmetric).

Dequantization is ``(q - zp) * scale`` in the scale's dtype. lowbit writes float32 scales (its own), so
``compressed_tensors``' own ``decompress`` gives ``dequantize()``'s float32 weights bit for bit. A
consumer that casts scales to a bf16 model's dtype rounds them (transformers does): export a float32
model for bit-exact loading there.

=============================================  ===================================================
lowbit config                                  compressed-tensors scheme (format)
=============================================  ===================================================
Int4WeightOnlyConfig(symmetric=True)           W4A16: int4 sym group g (pack-quantized)
Int4WeightOnlyConfig() (int zero point)        W4A16_ASYM: int4 asym group g, zp = zp_lowbit - 8
Int8WeightOnlyConfig (row / group / tensor)    W8A16: int8 sym channel/group/tensor (pack-quantized)
Int8DynamicActivationInt8WeightConfig          W8A8: int8 sym channel/tensor + int8 token dynamic
Int8StaticActivationInt8WeightConfig           W8A8: int8 sym channel/tensor + int8 tensor static
Int8DynamicActivationInt4WeightConfig (8da4w)  W4A8: int4 sym group + int8 token dynamic asymmetric
Float8DynamicActivationInt4WeightConfig        int4 sym group + float8 token dynamic (naive-quantized)
Float8WeightOnlyConfig (e4m3fn)                FP8 weights channel/tensor (naive-quantized)
Float8DynamicActivationFloat8WeightConfig      FP8_DYNAMIC: channel + token / tensor + tensor dynamic
Float8StaticActivationFloat8WeightConfig       FP8: channel/tensor + float8 tensor static
=============================================  ===================================================

The format of each scheme is the one compressed-tensors itself infers (int-quantized when int weights
meet int activations, so 8da4w's int4 values are stored unpacked in int8, as llm-compressor writes W4A8).

Exact: every stored number (values, scales, zero points, static activation scales) is lowbit's, so
weights and static activations dequantize bit for bit both ways (lowbit -> CT -> lowbit gives the
same tensors). Dynamic activation scales are computed at run time by the consumer under the scheme's
definition; compressed-tensors' own reference divides a symmetric int8 amax by 127.5 where lowbit
(and vLLM's kernels) divide by 127, so there the consumer's activations may differ in rounding. A
runtime that fuses q/k/v (or gate/up) into one matmul takes one static input scale for the fused
shards (vLLM: their maximum): calibrate them with a shared scale where that matters.
Refused on export, in one error listing every such layer: an int4 float-domain zero point (CT zero
points are integers), SmoothQuant's ``act_pre_scale``, float8 e5m2 (CT's float8 is e4m3), a quantized
weight shared by several modules, any other tensor or module lowbit can't state in the schema.
Refused on import: a non-trivial ``weight_g_idx`` (act-order without static groups), groups lowbit's
int4 doesn't hold (not 32/64/128/256), transforms, sparsity, kv-cache schemes, unknown formats, schemes
with no lowbit config of the same numerics, missing tensors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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
from lowbit.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.pretrained.checkpoint import (
    _NOT_COPIED,
    _build,
    _config_dtype,
    _float_dtype,
    _model_dir,
    _prepare_out_dir,
    _read_json,
    _state_items,
    _transformers,
)
from lowbit.serialization import CheckpointError, apply_state
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import GROUP_SIZES, Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["is_compressed_tensors_checkpoint", "export_compressed_tensors", "load_compressed_tensors",
           "UnsupportedLayersError"]

QUANT_METHOD = "compressed-tensors"
READ_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_PACKED = "pack-quantized"
_MAX_SHARD_BYTES = 5 * 2**30


class UnsupportedLayersError(ValueError):
    """Layers (or a checkpoint's schemes) with no exact counterpart in the other format; ``layers``
    maps each name to why."""

    def __init__(self, what: str, layers: dict[str, str]):
        self.layers = dict(layers)
        lines = "\n".join(f"  {k}: {v}" for k, v in self.layers.items())
        super().__init__(f"{what} ({len(self.layers)}):\n{lines}")


def _ct():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise ImportError("compressed-tensors checkpoints need the compressed-tensors package: "
                          "pip install compressed-tensors") from e
    return QuantizationConfig, QuantizationScheme


# --- CT's dense int32 packing (4 and 8 bits), byte-wise ---------------------------------------------------
# A word holds 32 // bits consecutive values, value i at bit i * bits: for 4 and 8 bits that is byte j of
# the word (little-endian order of significance) holding values 2j, 2j+1 (4 bits, low nibble first) or j.
# lowbit's int4 layout is the same byte order, so a packed row is lowbit's bytes read four at a time.


def _words(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(R, C)`` -> int32 ``(R, ceil(C / 4))``: byte ``4w + j`` is bits ``8j..8j+7`` of word ``w``."""
    pad = (-b.shape[1]) % 4
    if pad:
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    b = b.to(torch.int64).reshape(b.shape[0], -1, 4)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _bytes(w: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_words`: the first ``n`` bytes of each row of int32 ``w``."""
    v = w.to(torch.int64) & 0xFFFFFFFF
    b = torch.stack([(v >> (8 * j)) & 0xFF for j in range(4)], dim=-1).reshape(w.shape[0], -1)
    return b[:, :n].to(torch.uint8)


def _nibbles_to_bytes(v: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], ``(R, C)`` -> ``(R, ceil(C / 2))`` bytes, even column in the low nibble."""
    if v.shape[1] % 2:
        v = torch.cat([v, v.new_zeros(v.shape[0], 1)], dim=1)
    return v[:, 0::2] | (v[:, 1::2] << 4)


def _bytes_to_nibbles(b: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :n]


def _pack_zero_point(zp: torch.Tensor) -> torch.Tensor:
    """Signed int4 zero points ``(N, G)`` packed along dim 0 as CT does: int32 ``(ceil(N / 8), G)``."""
    return _words(_nibbles_to_bytes((zp.to(torch.int16) + 8).to(torch.uint8).t().contiguous())).t().contiguous()


def _unpack_zero_point(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_zero_point`: int16 values in [-8, 7], ``(n, G)``."""
    t = packed.t().contiguous()
    return (_bytes_to_nibbles(_bytes(t, math.ceil(n / 2)), n).to(torch.int16) - 8).t().contiguous()


# --- lowbit tensor -> CT scheme and tensors ------------------------------------------------------------


def _args(num_bits: int, kind: str, symmetric: bool, strategy: str, group_size=None, dynamic=False) -> dict:
    return {"num_bits": num_bits, "type": kind, "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic}


_STRATEGY = {PerRow: "channel", PerTensor: "tensor"}


def _act_args(t: QuantizedTensor) -> tuple[dict | None, str | None]:
    """``(input_activations args, why not)`` for a tensor's activation spec."""
    a = t.act_spec
    if a is None:
        return None, None
    static = getattr(t, "act_scale", None) is not None
    if a.quant_min is not None or a.quant_max is not None:
        return None, f"activation range [{a.quant_min}, {a.quant_max}] narrower than {a.dtype.name}'s"
    if a.dtype.name == "int8":
        kind = "int"
    elif a.dtype.name == "float8_e4m3fn":
        kind = "float"
    else:
        return None, f"{a.dtype.name} activations (compressed-tensors' float8 is e4m3fn)"
    if isinstance(a.granularity, PerToken) and not static:
        return _args(8, kind, a.symmetric, "token", dynamic=True), None
    if isinstance(a.granularity, PerTensor):
        return _args(8, kind, a.symmetric, "tensor", dynamic=not static), None
    return None, f"activation granularity {a.granularity!r}"


def _weight_args(t: QuantizedTensor) -> tuple[dict | None, str | None]:
    s = t.spec
    if isinstance(t, Int4Tensor):
        if s.has_zero_point and s.zero_point_domain == "float":
            return None, "int4 with a float-domain zero point (compressed-tensors zero points are integers)"
        return _args(4, "int", s.symmetric, "group", t.group_size), None
    if isinstance(t, Int8Tensor):
        if t.zero_point is not None or not s.symmetric:
            return None, "asymmetric int8 weight (no lowbit config makes one)"
        if s.quant_min is not None or s.quant_max is not None:
            return None, f"int8 weight range [{s.qmin}, {s.qmax}] narrower than int8's"
        if isinstance(s.granularity, PerGroup):
            return _args(8, "int", True, "group", s.granularity.group_size), None
        strategy = _STRATEGY.get(type(s.granularity))
        return (_args(8, "int", True, strategy), None) if strategy else (None, f"int8 granularity {s.granularity!r}")
    if isinstance(t, Float8Tensor):
        if s.dtype.name != "float8_e4m3fn":
            return None, f"{s.dtype.name} weight (compressed-tensors' float8 is e4m3fn)"
        strategy = _STRATEGY.get(type(s.granularity))
        return (_args(8, "float", True, strategy), None) if strategy else (None, f"float8 granularity {s.granularity!r}")
    return None, f"{type(t).__name__} has no compressed-tensors scheme"


def _scheme_of(fqn: str, module: nn.Module, t) -> tuple[dict | None, str | None]:
    """``(scheme dict without targets/format, why not)`` for one quantized module."""
    if not isinstance(module, nn.Linear):
        return None, f"{type(module).__name__} (lowbit exports quantized nn.Linear weights only)"
    if t.dim() != 2:
        return None, f"{t.dim()}-D weight"
    if getattr(t, "act_pre_scale", None) is not None:
        return None, "SmoothQuant act_pre_scale (a per-input-channel activation factor compressed-tensors can't state)"
    w, why = _weight_args(t)
    if w is None:
        return None, why
    a, why = _act_args(t)
    if why:
        return None, why
    return {"weights": w, "input_activations": a}, None


def _compressed_tensors(t: QuantizedTensor, scheme: dict, fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (local names) of one quantized weight in format ``fmt``."""
    w = scheme["weights"]
    scale = t.scale.detach().float()
    out = {"weight_scale": scale.reshape(1) if w["strategy"] == "tensor" else scale.contiguous()}
    if isinstance(t, Int4Tensor):
        asym = t.zero_point is not None
        b = t.qdata if asym else t.qdata ^ 0x88  # CT stores value + 8: uint4 as is, int4 nibble t -> t ^ 8
        zp = None if not asym else t.zero_point.to(torch.int16) - 8
        if fmt == _PACKED:
            out["weight_packed"] = _words(b.contiguous())
            out["weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            if asym:
                out["weight_zero_point"] = _pack_zero_point(zp)
        else:  # int-/naive-quantized: signed values unpacked in int8
            v = _bytes_to_nibbles(b, t.shape[1]).to(torch.int16) - 8
            out["weight"] = v.to(torch.int8).contiguous()
            if asym:
                out["weight_zero_point"] = zp.to(torch.int8).contiguous()
    elif isinstance(t, Int8Tensor):
        if fmt == _PACKED:
            out["weight_packed"] = _words(t.qdata.view(torch.uint8) ^ 0x80)
            out["weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        else:
            out["weight"] = t.qdata.contiguous()
    else:
        out["weight"] = t.qdata.contiguous()
    if getattr(t, "act_scale", None) is not None:
        out["input_scale"] = t.act_scale.detach().float().reshape(1)
        zp = getattr(t, "act_zero_point", None)
        if zp is not None:
            out["input_zero_point"] = zp.detach().to(torch.int8).reshape(1)
    return {k: v.detach().cpu() for k, v in out.items()}


def _ct_config(groups: list[tuple[dict, list[str], str]], ignore: list[str]) -> dict:
    """The ``quantization_config`` entry, validated by compressed-tensors' own pydantic models."""
    import compressed_tensors

    QuantizationConfig, _ = _ct()
    formats = sorted({fmt for _, _, fmt in groups})
    config_groups = {f"group_{i}": {"targets": targets, **scheme, "format": fmt}
                     for i, (scheme, targets, fmt) in enumerate(groups)}
    qc = QuantizationConfig.model_validate({
        "config_groups": config_groups, "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "ignore": ignore, "kv_cache_scheme": None,
    })
    return {"version": compressed_tensors.__version__, "quant_method": QUANT_METHOD, "sparsity_config": {},
            "transform_config": {}, **qc.model_dump(exclude=["quant_method"], mode="json")}


def _infer_format(scheme: dict) -> str:
    """The format compressed-tensors itself chooses for ``scheme`` on a linear (its priority list)."""
    from compressed_tensors.compressors.format import infer_module_format

    _, QuantizationScheme = _ct()
    return infer_module_format(nn.Linear, QuantizationScheme.model_validate({"targets": ["Linear"], **scheme})).value


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def export_compressed_tensors(model, out_dir, *, source_dir=None, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a model whose linears hold lowbit tensors as a compressed-tensors checkpoint directory.

    Every quantized linear's values, scales, zero points and static activation scales are written
    as they are (see the module docstring's table); nothing is re-quantized. Float tensors are
    written in the model's dtype, tied weights once (as transformers writes them).

    Args:
        model: a transformers ``PreTrainedModel`` after ``quantize_`` (or ``lowbit.from_pretrained``).
        out_dir: the directory to write (created; must be empty unless ``overwrite``).
        source_dir: the float model's directory: its tokenizer, chat template and other non-weight
            files are copied.
        tokenizer: optional; its ``save_pretrained(out_dir)`` is called.
        overwrite: replace the weights and config of a checkpoint already in ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        TypeError: ``model`` is not a transformers model.
        UnsupportedLayersError: (a ValueError) ONE error listing every layer whose numerics
            compressed-tensors can't state exactly, with the reason; nothing is written.
        ValueError: the model has no quantized layer.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
        ImportError: compressed-tensors is not installed.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    _ct()
    owners: dict[int, list[str]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if isinstance(w, QuantizedTensor):
            owners.setdefault(id(w), []).append(fqn)
    bad: dict[str, str] = {}
    layers: dict[str, tuple[QuantizedTensor, dict, str]] = {}
    for fqn, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if not isinstance(w, QuantizedTensor):
            continue
        if len(owners[id(w)]) > 1:
            bad[fqn] = (f"its quantized weight is shared with {[o for o in owners[id(w)] if o != fqn]} "
                        "(compressed-tensors stores one weight per module): leave the tied head float")
            continue
        scheme, why = _scheme_of(fqn, m, w)
        if scheme is None:
            bad[fqn] = why
            continue
        layers[fqn] = (w, scheme, _infer_format(scheme))
    if bad:
        raise UnsupportedLayersError("these layers have no exact compressed-tensors equivalent; nothing was written "
                                     "(quantize them with another config or leave them float)", bad)
    if not layers:
        raise ValueError("model has no lowbit-quantized linear: there is nothing for compressed-tensors to describe")
    groups: dict[str, tuple[dict, list[str], str]] = {}
    for fqn, (_, scheme, fmt) in layers.items():
        key = json.dumps([scheme, fmt], sort_keys=True)
        groups.setdefault(key, (scheme, [], fmt))[1].append(fqn)
    linears = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(groups) == 1:  # llm-compressor's shape: every Linear, minus the float ones by name
        (scheme, _, fmt), = groups.values()
        qc = _ct_config([(scheme, ["Linear"], fmt)], [f for f in linears if f not in layers])
    else:
        qc = _ct_config(list(groups.values()), [])

    tensors: dict[str, torch.Tensor] = {}
    for key, t, alias in _state_items(model):
        fqn = key.rsplit(".", 1)[0] if "." in key else ""
        if alias is not None:
            continue
        if fqn in layers and key.endswith(".weight"):
            w, scheme, fmt = layers[fqn]
            tensors.update({f"{fqn}.{k}": v for k, v in _compressed_tensors(w, scheme, fmt).items()})
        else:
            tensors[key] = t.detach().contiguous().cpu()

    source = None if source_dir is None else _model_dir(source_dir)
    out = _prepare_out_dir(out_dir, source, overwrite)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if source is not None:
        for f in source.iterdir():
            if f.is_file() and not _NOT_COPIED.fullmatch(f.name):
                shutil.copy2(f, out / f.name)
    _write_shards(out, tensors, _MAX_SHARD_BYTES)
    config_dict = config.to_dict()
    for k in ("lowbit", "quantization_config", "torch_dtype"):
        config_dict.pop(k, None)
    config_dict["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
    config_dict["quantization_config"] = qc
    with open(out / "config.json", "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


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
