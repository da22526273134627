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

from safetensors.torch import save_file
from torch import nn

from lowbit.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.pretrained.checkpoint import (
    _NOT_COPIED,
    _float_dtype,
    _model_dir,
    _prepare_out_dir,
    _state_items,
)

from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["export_compressed_tensors", "UnsupportedLayersError"]  # reading: compressed_tensors_load

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
