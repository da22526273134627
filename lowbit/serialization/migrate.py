"""Reading older checkpoint format versions: each is rewritten, in memory, into the current one
before the current schema checks it (nothing on disk changes).

Format 1 (lowbit 0.1) to 2:

* every quantized tensor's attributes and every module config held ``kernel`` (a
  ``KernelPreference``: how to run, not what the numbers are); it is dropped, and the loaded
  tensors and configs get the default;
* tensors stored no weight spec: a tensor's ``spec`` becomes the ``weight_spec()`` of the config
  the file stores for the module owning it (lowbit 0.1 saved one for every quantized weight; the
  configs of a sharded checkpoint may sit in another shard, so the migration sees all of them).

The tensor data, part names and everything else are the same in both versions. One INFO line on
the ``lowbit.serialization`` logger says that a file was migrated and what changed.

A tensor with no module config to ask (a format-1 file entry without one, or a tensor that
``torch.save`` pickled in lowbit 0.1 and ``torch.load`` restores) gets the weight spec of the
config lowbit 0.1 made its stored layout with (:func:`v1_weight_spec`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

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
from lowbit.kernels.preference import KernelPreference
from lowbit.serialization.codec import CheckpointError, decode_config, decode_value, encode_value
from lowbit.spec import QuantSpec
from lowbit.tensors.base import QuantizedTensor

__all__ = ["migrate_v1", "v1_weight_spec", "upgrade_pickled_state"]

logger = logging.getLogger("lowbit.serialization")


def _drop_kernel(obj: dict, where: str) -> int:
    """Remove a v1 ``kernel`` field from ``obj`` (in place) after checking it is a valid v1 value; 1 if removed."""
    if "kernel" not in obj:
        return 0
    k = obj.pop("kernel")
    allowed = [p.value for p in KernelPreference]
    if not (isinstance(k, dict) and set(k) == {"__enum__", "value"} and k["__enum__"] == "KernelPreference"
            and k["value"] in allowed):
        raise CheckpointError(f"{where}: format-1 kernel {k!r:.80} is not a KernelPreference; allowed values: {allowed}")
    return 1


def _drop_config_kernels(config, where: str) -> int:
    """Drop ``kernel`` from a v1 config JSON and from configs nested in it (``QATConfig.base_config``)."""
    if not isinstance(config, dict):
        return 0
    n = _drop_kernel(config, where) if "__class__" in config else 0
    return n + sum(_drop_config_kernels(v, where) for k, v in config.items() if k != "__class__" and isinstance(v, dict))


def migrate_v1(files: list[tuple[str, dict]], all_modules: dict[str, object],
               stored: Mapping[str, Mapping[str, tuple[torch.dtype | None, tuple[int, ...]]]]) -> None:
    """Rewrite format-1 headers into format 2, in place (see the module docstring).

    Args:
        files: ``(where, header)`` of every format-1 file of one checkpoint; ``header`` has
            ``entries`` and ``modules`` dicts (already checked to be dicts).
        all_modules: every module config JSON of the checkpoint (all files, all versions), by module
            name: a format-1 tensor takes its spec from its module's config wherever it is stored.
        stored: per file (``where``), its tensors' declared dtypes and shapes (for a tensor without a
            module config, whose spec comes from its stored layout).

    Raises:
        CheckpointError: a malformed format-1 kernel value, a config that does not decode, or a
            tensor without a module config whose layout no lowbit 0.1 config made.
    """
    n_configs = [sum(_drop_config_kernels(c, f"{where}: module {fqn!r}") for fqn, c in header["modules"].items())
                 for where, header in files]
    configs: dict[str, object] = {}
    for (where, header), n_config in zip(files, n_configs):
        n_tensors = 0
        for key, entry in header["entries"].items():
            if not isinstance(entry, dict) or "alias" in entry or not isinstance(entry.get("attributes"), dict):
                continue  # aliases migrate unchanged; a malformed entry is reported by the schema check
            attrs = entry["attributes"]
            n_tensors += _drop_kernel(attrs, f"{where}: tensor {key!r}")
            if "spec" in attrs:
                continue
            fqn = key[: -len(".weight")] if key.endswith(".weight") else ("" if key == "weight" else None)
            if fqn is None or fqn not in all_modules:
                attrs["spec"] = encode_value(_entry_v1_spec(key, entry, stored[where], where))
                continue
            if fqn not in configs:
                configs[fqn] = decode_config(all_modules[fqn], f"{where}: module {fqn!r}")
            try:
                spec = configs[fqn].weight_spec()
            except NotImplementedError as e:
                raise CheckpointError(f"{where}: format-1 tensor {key!r}: its module config states no weight spec "
                                      f"({e})") from None
            attrs["spec"] = encode_value(spec)
        header["format_version"] = 2
        logger.info("%s: lowbit checkpoint format 1 read as format 2: dropped the run-time kernel preference of %d "
                    "tensor(s) and %d module config(s); took each quantized tensor's weight spec from its module "
                    "config's weight_spec()", where, n_tensors, n_config)


# --- the weight spec of a lowbit 0.1 tensor, from its stored layout ------------------------------------


class _NoSpec(Exception):
    pass


def v1_weight_spec(cls_name: str, shape: tuple[int, ...], parts: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                   act_spec: QuantSpec | None) -> QuantSpec:
    """The weight spec of a tensor lowbit 0.1 stored without one: that of the config which makes this
    layout (class, part dtypes and shapes, activation spec), so that the spec itself is stated only
    by the configs. ``act_scale`` / ``act_zero_point`` values do not enter a weight spec: a static
    config is built with placeholders.

    Raises:
        ValueError: no lowbit 0.1 config makes this layout.
    """
    try:
        config = _v1_config(cls_name, shape, parts, act_spec)
    except (_NoSpec, ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise ValueError(f"a lowbit 0.1 {cls_name} of shape {list(shape)} with parts "
                         f"{ {n: (str(d), list(s)) for n, (d, s) in parts.items()} } and act_spec={act_spec!r}: no "
                         f"config of lowbit 0.1 made this layout, so it has no weight spec ({e})") from None
    if config.act_spec() != act_spec:
        raise ValueError(f"a lowbit 0.1 {cls_name} with act_spec={act_spec!r} matches no config (nearest: {config!r})")
    return config.weight_spec()


def _int8_granularity(shape, scale):
    if tuple(scale) == (*shape[:-1], 1):
        return PerRow()
    if all(s == 1 for s in scale):
        return PerTensor()
    if tuple(scale[:-1]) == tuple(shape[:-1]) and shape[-1] % scale[-1] == 0:
        return PerGroup(shape[-1] // scale[-1])
    raise _NoSpec(f"scale {list(scale)} is not per row, per tensor or per group")


def _v1_config(cls_name, shape, parts, act):
    scale = parts["scale"][1]
    static = "act_scale" in parts
    if cls_name == "Int8Tensor":
        if "zero_point" in parts:
            raise _NoSpec("no config made int8 weights with a zero point")
        g = _int8_granularity(shape, scale)
        if act is None:
            return Int8WeightOnlyConfig(g)
        if not static:
            return Int8DynamicActivationInt8WeightConfig(act_symmetric=act.symmetric, granularity=g)
        return Int8StaticActivationInt8WeightConfig(act_scale=1.0, act_zero_point=None if act.symmetric else 0,
                                                    granularity=g)
    if cls_name == "Int4Tensor":
        group = shape[-1] // scale[-1]
        zp = parts.get("zero_point")
        if zp is not None:
            return Int4WeightOnlyConfig(group_size=group, zero_point_domain="float" if zp[0] == torch.float32 else "int")
        if act is None:
            return Int4WeightOnlyConfig(group_size=group, symmetric=True)
        if act.dtype.is_float:
            return Float8DynamicActivationInt4WeightConfig(group_size=group)
        return Int8DynamicActivationInt4WeightConfig(group_size=group)
    if cls_name == "Float8Tensor":
        per_row = scale[0] != 1 or (act is not None and isinstance(act.granularity, PerToken))
        g, dtype = (PerRow() if per_row else PerTensor()), parts["qdata"][0]
        if static:
            return Float8StaticActivationFloat8WeightConfig(act_scale=1.0, granularity=g, dtype=dtype)
        if act is None:
            return Float8WeightOnlyConfig(g, dtype=dtype)
        return Float8DynamicActivationFloat8WeightConfig(g, dtype=dtype)
    raise _NoSpec(f"class {cls_name!r} is not a lowbit 0.1 tensor class")


def _entry_v1_spec(key: str, entry: dict, stored, where: str) -> QuantSpec:
    """A format-1 entry without a module config: its spec from its layout (see ``v1_weight_spec``)."""
    try:
        names = entry["tensors"]
        parts = {n: stored[f"{key}:{n}"] for n in names}
        act = decode_value(entry["attributes"].get("act_spec"), f"{where}: tensor {key!r} attribute 'act_spec'")
        return v1_weight_spec(entry["class"], tuple(entry["shape"]), parts, act)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: format-1 tensor {key!r} has no module config, and its weight spec cannot be "
                              f"taken from its layout: {e}") from None


_LOGGED_PICKLE = False


def upgrade_pickled_state(tensor: QuantizedTensor, state: Any) -> Any:
    """``torch.load`` of a quantized tensor that lowbit 0.1 pickled: its state (``__dict__``) had no
    weight ``spec``; it gets the one :func:`v1_weight_spec` finds for its layout (logged once).

    Raises:
        ValueError: no lowbit 0.1 config made the pickled layout.
    """
    global _LOGGED_PICKLE
    if not isinstance(state, dict) or "spec" in state or "spec" not in type(tensor).tensor_attribute_names:
        return state
    parts = {n: (v.dtype, tuple(v.shape)) for n, v in state.items() if isinstance(v, torch.Tensor)}
    state = dict(state)
    state["spec"] = v1_weight_spec(type(tensor).__name__, tuple(tensor.shape), parts, state.get("act_spec"))
    if not _LOGGED_PICKLE:
        _LOGGED_PICKLE = True
        logger.info("torch.load: quantized tensors pickled by lowbit 0.1 (no weight spec) get the weight spec of the "
                    "config that made their stored layout")
    return state
