"""Every PTQ config x every way a quantized model is kept: ``torch.save(model)`` + ``torch.load``, the state_dict
with ``weights_only=True``, ``lowbit.save`` / ``lowbit.load``; and a tied head quantized once, through each.

(Quantizing and running under ``torch.inference_mode`` is tested with the kernels.)
"""

import io

import pytest
import torch
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
from lowbit.configs.base import config_classes
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.qat import QATConfig
from lowbit.quantize import quantize_
from lowbit.serialization import load, save
from lowbit.tensors.base import QuantizedTensor

CONFIGS = [
    Int8WeightOnlyConfig(),
    Int8WeightOnlyConfig(PerGroup(16)),
    Int8DynamicActivationInt8WeightConfig(),
    Int8DynamicActivationInt8WeightConfig(act_symmetric=False, granularity=PerTensor()),
    Int8StaticActivationInt8WeightConfig(act_scale=0.05),
    Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=4),
    Int4WeightOnlyConfig(group_size=32),
    Int4WeightOnlyConfig(group_size=32, symmetric=True),
    Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
    Int8DynamicActivationInt4WeightConfig(),
    Float8DynamicActivationInt4WeightConfig(group_size=32),
    Float8WeightOnlyConfig(),
    Float8WeightOnlyConfig(PerTensor(), dtype=torch.float8_e5m2),
    Float8DynamicActivationFloat8WeightConfig(),
    Float8DynamicActivationFloat8WeightConfig(PerRow()),
    Float8StaticActivationFloat8WeightConfig(act_scale=0.01),
    Float8StaticActivationFloat8WeightConfig(act_scale=0.01, granularity=PerRow()),
]
WEIGHT_ONLY = [c for c in CONFIGS if c.act_spec() is None]
ROUTES = ["torch.save(model)", "state_dict weights_only", "lowbit.save"]


def test_every_ptq_config_class_is_in_the_matrix():
    assert {type(c) for c in CONFIGS} == set(config_classes()) - {QATConfig}


def _build(device="cpu", tied=False):
    with torch.device(device):
        m = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 16, bias=False))
    if tied:
        m[4].weight = m[0].weight
    return m


def _round_trip(model, route, tmp_path, tied=False):
    if route == "torch.save(model)":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    fresh = _build("meta", tied)
    if route == "state_dict weights_only":
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf, weights_only=True), assign=True)
        return fresh
    save(model, tmp_path / "m.safetensors")
    return load(fresh, tmp_path / "m.safetensors")


def _run(model):
    ids = torch.tensor([[1, 3, 5, 7], [2, 4, 6, 8]])
    with torch.no_grad():
        return model[1:](model[0](ids))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_every_config_round_trips(config, route, tmp_path):
    torch.manual_seed(0)
    model = quantize_(_build(), config)
    loaded = _round_trip(model, route, tmp_path)
    assert torch.equal(_run(loaded), _run(model))
    for i in (1, 3, 4):
        assert type(loaded[i].weight) is type(model[i].weight)
    if route != "state_dict weights_only":  # a state_dict carries tensors, not the modules' configs
        assert not any(loaded[i].weight.requires_grad for i in (1, 3, 4))
        assert loaded[1].lowbit_config == config and f"quant={config!r}" in repr(loaded[1])
        assert repr(loaded) == repr(model)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("config", WEIGHT_ONLY, ids=repr)
def test_a_tied_head_quantized_once_round_trips(config, route, tmp_path):
    """The head named in the mapping: one quantized tensor for head and embedding, kept one through each route
    (the same object, or for a state_dict the same storage)."""
    torch.manual_seed(0)
    model = quantize_(_build(tied=True), {"4": config, "re:.*": config})
    assert model[4].weight is model[0].weight and isinstance(model[0].weight, QuantizedTensor)
    loaded = _round_trip(model, route, tmp_path, tied=True)
    assert torch.equal(_run(loaded), _run(model))
    head, embed = loaded[4].weight, loaded[0].weight
    if route == "state_dict weights_only":
        names, _ = head.__tensor_flatten__()
        assert all(getattr(head, n).untyped_storage().data_ptr() == getattr(embed, n).untyped_storage().data_ptr()
                   for n in names)
    else:
        assert head is embed
    if route == "lowbit.save":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
            stored = [k for k in f.keys() if k.startswith(("0.weight", "4.weight"))]
        assert stored and all(k.startswith("0.weight:") for k in stored)  # one copy, under the first key
