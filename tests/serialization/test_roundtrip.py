import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.quantize import quantize_
from lowbit.serialization import FORMAT_VERSION, load, save
from lowbit.tensors.base import QuantizedTensor

DATA = Path(__file__).parent / "data"

CONFIGS = [
    Int8WeightOnlyConfig(),
    Int8WeightOnlyConfig(PerGroup(16)),
    Int8DynamicActivationInt8WeightConfig(),
    Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
    Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=4),
    Int4WeightOnlyConfig(group_size=32),
    Int4WeightOnlyConfig(group_size=32, symmetric=True),
    Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
    Int8DynamicActivationInt4WeightConfig(),
    Float8WeightOnlyConfig(),
    Float8WeightOnlyConfig(PerTensor(), dtype=torch.float8_e5m2),
    Float8DynamicActivationFloat8WeightConfig(),
    Float8DynamicActivationFloat8WeightConfig(PerRow()),
    Float8DynamicActivationInt4WeightConfig(group_size=32),
]


def _build(device=None):
    with torch.device(device or "cpu"):
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def _quantized(config):
    torch.manual_seed(0)
    return quantize_(_build(), config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_torch_save_weights_only_into_meta_model(config):
    m = _quantized(config)
    x = torch.randn(3, 32)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert isinstance(sd["0.weight"], QuantizedTensor)
    fresh = _build("meta")
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("target", ["float", "meta"])
def test_safetensors_round_trip(config, target, tmp_path):
    m = _quantized(config)
    x = torch.randn(3, 32)
    path = tmp_path / "m.safetensors"
    save(m, path)
    fresh = _build("meta" if target == "meta" else None)
    load(fresh, path)
    assert torch.equal(fresh(x), m(x))
    assert isinstance(fresh[0].weight, QuantizedTensor) and not fresh[0].weight.requires_grad
    assert repr(config) in repr(fresh[0])


def test_load_state_dict_copy_into_quantized_model():
    m = _quantized(Int8WeightOnlyConfig())
    other = quantize_(_build(), Int8WeightOnlyConfig())
    other.load_state_dict(m.state_dict())  # copy_ between same-layout tensors
    x = torch.randn(2, 32)
    assert torch.equal(other(x), m(x))


def test_tied_weights_saved_once(tmp_path):
    m = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
    m[1].weight = m[0].weight
    save(m, tmp_path / "t.safetensors")
    raw = load_file(tmp_path / "t.safetensors")
    assert list(raw) == ["0.weight"]
    fresh = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
    load(fresh, tmp_path / "t.safetensors")
    assert torch.equal(fresh[1].weight, m[0].weight)


def test_rejects_foreign_and_future_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no lowbit metadata"):
        load(_build(), tmp_path / "plain.safetensors")
    header = {"format_version": FORMAT_VERSION + 1, "entries": {}, "modules": {}}
    save_file({"w": torch.zeros(2)}, tmp_path / "future.safetensors", metadata={"lowbit": json.dumps(header)})
    with pytest.raises(ValueError, match="format_version=2"):
        load(_build(), tmp_path / "future.safetensors")


def test_format_v1_checkpoint_still_loads():
    """tests/data/int8_v1.safetensors was written by format version 1 (tests/data/make_int8_v1.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_int8_v1", DATA / "make_int8_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = load(mod.build().to("meta"), DATA / "int8_v1.safetensors")
    io_ = load_file(DATA / "int8_v1_io.safetensors")
    with torch.no_grad():
        assert torch.equal(model(io_["input"]), io_["output"])
    assert model[4].weight.act_zero_point is not None and model[5].weight.block_size == (1, 8)

