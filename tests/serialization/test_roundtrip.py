"""lowbit.save / lowbit.load and torch.save / torch.load(weights_only=True): round trips (every tensor
variant, and a property over random models: bit for bit), files and pickles of older versions, and
what the format leaves out (the kernel preference)."""

import dataclasses
import importlib.util
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
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
from lowbit.eval import sqnr
from lowbit.kernels.preference import KernelPreference
from lowbit.serialization import FORMAT_VERSION, CheckpointError, load, read_state, save
from lowbit.serialization.schema import check_schemas, saved_attribute_names
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.int8_tensor import Int8Tensor

DATA = Path(__file__).resolve().parents[1] / "data"
# old files are produced by other kernels than the ones running here (C++ or PyTorch paths): their
# outputs agree to float accumulation order
OLD_OUTPUT_SQNR_DB = 80.0

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_safetensors_round_trip(config, target, dtype, tmp_path):
    """Bit for bit, and every loaded part starts on 64 bytes: safetensors hands out tensors 8-byte
    aligned, on which torch's bf16 _weight_int8pack_mm (int8 weight-only, M <= 8) crashed."""
    torch.manual_seed(0)
    m = quantize_(_build().to(dtype), config)
    x = torch.randn(5, 32).to(dtype)
    path = tmp_path / "m.safetensors"
    save(m, path)
    fresh = _build("meta" if target == "meta" else None).to(dtype)
    load(fresh, path)
    assert torch.equal(fresh(x), m(x))
    assert isinstance(fresh[0].weight, QuantizedTensor) and not fresh[0].weight.requires_grad
    assert repr(config) in repr(fresh[0])
    for name in type(fresh[0].weight).tensor_data_names:
        part = getattr(fresh[0].weight, name)
        assert part.data_ptr() % 64 == 0, name


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


def test_tied_activation_quantized_head_saved_once(tmp_path):
    """A W8A8 head tied to the embedding (one quantized tensor for both): saved once, loaded tied, same values."""
    def tied():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
        m[1].weight = m[0].weight
        return m

    m = quantize_(tied(), {"1": Int8DynamicActivationInt8WeightConfig()})
    save(m, tmp_path / "t.safetensors")
    assert sorted(load_file(tmp_path / "t.safetensors")) == ["0.weight:qdata", "0.weight:scale"]
    fresh = tied()
    load(fresh, tmp_path / "t.safetensors")
    assert fresh[0].weight is fresh[1].weight and fresh[0].weight.act_spec == m[0].weight.act_spec
    ids, x = torch.tensor([[1, 2, 15]]), torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(fresh[0](ids), m[0](ids)) and torch.equal(fresh[1](x), m[1](x))


def test_rejects_foreign_and_future_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no lowbit metadata"):
        load(_build(), tmp_path / "plain.safetensors")
    header = {"format_version": FORMAT_VERSION + 1, "entries": {}, "modules": {}}
    save_file({"w": torch.zeros(2)}, tmp_path / "future.safetensors", metadata={"lowbit": json.dumps(header)})
    with pytest.raises(ValueError, match=f"format_version={FORMAT_VERSION + 1}"):
        load(_build(), tmp_path / "future.safetensors")


def _data_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_format_v1_checkpoint_still_loads(caplog):
    """tests/data/int8_v1.safetensors was written by format version 1 (tests/data/make_int8_v1.py): it is
    migrated (kernel dropped, each tensor's spec from its module config), and the log says so."""
    with caplog.at_level(logging.INFO, logger="lowbit.serialization"):
        model = load(_data_module("make_int8_v1").build().to("meta"), DATA / "int8_v1.safetensors")
    io_ = load_file(DATA / "int8_v1_io.safetensors")
    with torch.no_grad():
        # written by another CPU's float32 sums (torch's own matmul differs in the last bits across hosts)
        assert sqnr(io_["output"], model(io_["input"])) >= OLD_OUTPUT_SQNR_DB
    assert model[4].weight.act_zero_point is not None and model[5].weight.block_size == (1, 8)
    for i in (0, 2, 4, 5):
        assert model[i].weight.spec == model[i].lowbit_config.weight_spec()
        assert model[i].weight.act_spec == model[i].lowbit_config.act_spec()
    assert [r.message for r in caplog.records if "format 1 read as format 2" in r.message] == [
        f"{DATA / 'int8_v1.safetensors'}: lowbit checkpoint format 1 read as format 2: dropped the run-time kernel "
        "preference of 4 tensor(s) and 4 module config(s); took each quantized tensor's weight spec from its module "
        "config's weight_spec()"]


def test_state_dict_pickled_by_lowbit_0_1_still_loads():
    """tests/data/state_dict_v1.pt: torch.save(state_dict) of every tensor variant at caa1d65, when tensors held
    no weight spec (tests/data/make_state_dict_v1.py). torch.load(weights_only=True) still reads it; each tensor
    gets its config's weight spec and dequantizes to the same values."""
    mod = _data_module("make_state_dict_v1")
    sd = torch.load(DATA / "state_dict_v1.pt", weights_only=True)
    io_ = load_file(DATA / "state_dict_v1_io.safetensors")
    model = mod.build().to("meta")
    model.load_state_dict(sd, assign=True)
    for i, (layer, config) in enumerate(zip(model, mod.CONFIGS)):
        assert layer.weight.spec == config.weight_spec(), i
        assert layer.weight.act_spec == config.act_spec(), i
        assert torch.equal(layer.weight.dequantize(), io_[f"dequant:{i}"]), i
    with torch.no_grad():
        assert sqnr(io_["output"], model(io_["input"])) >= OLD_OUTPUT_SQNR_DB


def test_kernel_preference_is_not_part_of_the_file(tmp_path):
    """A run-time choice: neither the tensors' entries nor the module configs store it; a loaded model gets the default."""
    config = Int4WeightOnlyConfig(group_size=32, kernel=KernelPreference.REFERENCE)
    m = _quantized(config)
    assert m[0].weight.kernel is KernelPreference.REFERENCE
    save(m, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        text = f.metadata()["lowbit"]
    assert "kernel" not in text and "KernelPreference" not in text
    fresh = load(_build("meta"), tmp_path / "m.safetensors")
    assert fresh[0].lowbit_config == dataclasses.replace(config, kernel=KernelPreference.AUTO)
    assert fresh[0].weight.kernel is KernelPreference.AUTO
    assert fresh[0].weight.spec == m[0].weight.spec
    assert torch.equal(fresh[0].weight.dequantize(), m[0].weight.dequantize())


def test_schemas_cover_every_stored_field(monkeypatch):
    """The schema and the classes name the same fields; a field added to a class without its schema is an error
    (at save time too), not a field silently left out of or misnamed in the file."""
    check_schemas()
    assert saved_attribute_names(Int8Tensor) == ("spec", "act_spec")
    monkeypatch.setattr(Int8Tensor, "optional_tensor_data_names", (*Int8Tensor.optional_tensor_data_names, "extra"))
    with pytest.raises(RuntimeError, match="schema of Int8Tensor is out of date"):
        check_schemas()


def test_save_refuses_a_tensor_the_loader_would_refuse(tmp_path):
    m = _quantized(Int8WeightOnlyConfig())
    w = m[0].weight
    m[0].weight = nn.Parameter(w._replace(scale=torch.zeros_like(w.scale)), requires_grad=False)
    with pytest.raises(ValueError, match=r"cannot save '0.weight', the loader would refuse it: .*part 'scale' holds 0.0"):
        save(m, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_config_json_takes_only_allowed_classes_and_fields(tmp_path):
    """Module configs decode through an allow-list: an unknown field is a clear error, not a constructor's TypeError."""
    m = _quantized(Int4WeightOnlyConfig(group_size=32))
    save(m, tmp_path / "m.safetensors")
    header = _header(tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    header["modules"]["0"]["bits"] = 4
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"lowbit": json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: module '0': Int4WeightOnlyConfig has no stored "
                                              r"field\(s\) \['bits'\]; fields: \['group_size', 'symmetric', "
                                              r"'zero_point_domain', 'qparams'\]"):
        read_state([tmp_path / "bad.safetensors"])


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["lowbit"])


def test_the_schema_alone_refuses_a_non_finite_eps(tmp_path):
    """Without a module config to compare with, a spec's eps of 1e999 (inf once parsed) is refused by the schema."""
    save(_quantized(Int8DynamicActivationInt8WeightConfig()), tmp_path / "m.safetensors")
    header = _header(tmp_path / "m.safetensors")
    header["modules"] = {}
    header["entries"]["0.weight"]["attributes"]["act_spec"]["eps"] = "EPS"
    raw = json.dumps(header).replace('"EPS"', "1e999")
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors", metadata={"lowbit": raw})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: tensor '0.weight': act_spec.eps=inf; allowed: a finite"):
        read_state([tmp_path / "bad.safetensors"])


def _set(obj, path: str, value):
    *keys, last = path.split("/")
    for k in keys:
        obj = obj[k]
    obj[last] = value


@pytest.mark.parametrize("config,path,value", [
    (Int8WeightOnlyConfig(), "entries/0.weight/attributes/spec/symmetric", 1),  # == True, but not a bool
    (Int4WeightOnlyConfig(group_size=32), "modules/0/group_size", 32.0),  # == 32, and 32.0 in (32, 64, ...)
    (Int4WeightOnlyConfig(group_size=32), "modules/0/symmetric", 0),
    (Int8DynamicActivationInt8WeightConfig(), "modules/0/act_symmetric", 1),
    (Int8WeightOnlyConfig(PerGroup(16)), "modules/0/granularity/group_size", 16.0),
    (Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=4), "modules/0/act_zero_point", 4.0),
    (Int8WeightOnlyConfig(), "entries/0.weight/attributes/spec/quant_min", True),
], ids=lambda v: v if isinstance(v, str) else None)
def test_field_types_are_exact(tmp_path, config, path, value):
    """A value equal to the right one but of another type (1 for True, 32.0 for 32) is refused by its annotation."""
    save(_quantized(config), tmp_path / "m.safetensors")
    header = _header(tmp_path / "m.safetensors")
    _set(header, path, value)
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors", metadata={"lowbit": json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: .* has the wrong type; allowed: "):
        read_state([tmp_path / "bad.safetensors"])


def test_a_deeply_nested_config_is_refused_not_a_recursion_error(tmp_path):
    """600 nested QATConfigs parse as JSON; decoding them is refused before Python's recursion limit (not under
    hypothesis, which raises that limit)."""
    save(_quantized(Int8WeightOnlyConfig()), tmp_path / "m.safetensors")
    header = _header(tmp_path / "m.safetensors")
    header["modules"]["0"] = "NESTED"
    depth = 600
    nested = ('{"__class__": "QATConfig", "base_config": ' * depth + '{"__class__": "Int8WeightOnlyConfig"}'
              + ', "step": "convert"}' * depth)
    raw = json.dumps(header).replace('"NESTED"', nested)
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors", metadata={"lowbit": raw})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: module '0': .*nested deeper than 8 levels"):
        read_state([tmp_path / "bad.safetensors"])


# --- property: a valid file round-trips bit for bit ---------------------------------------------------------

ROUND_TRIP = CONFIGS + [Int4WeightOnlyConfig(group_size=128), Int8StaticActivationInt8WeightConfig(act_scale=0.1)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(configs=st.lists(st.sampled_from(ROUND_TRIP), min_size=1, max_size=4),
       outs=st.lists(st.sampled_from([1, 3, 8, 24]), min_size=4, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_valid_files_round_trip_bit_for_bit(tmp_path, configs, outs, dtype, seed):
    """save -> load gives the same tensors (every part torch.equal, same specs) and the same outputs; saving
    the loaded model again writes the same bytes."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(128, n).to(dtype) for n in outs[: len(configs)]])
    quantize_(model, {str(i): c for i, c in enumerate(configs)})
    save(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(*[nn.Linear(128, n, device="meta", dtype=dtype) for n in outs[: len(configs)]])
    load(fresh, tmp_path / "a.safetensors")
    for key, t in model.state_dict().items():
        u = fresh.state_dict()[key]
        assert type(u) is type(t) and u.shape == t.shape and u.dtype == t.dtype, key
        if isinstance(t, QuantizedTensor):
            names, _ = t.__tensor_flatten__()
            assert names == u.__tensor_flatten__()[0], key
            assert all(torch.equal(getattr(t, n), getattr(u, n)) for n in names), key
            assert all(getattr(t, n) == getattr(u, n) for n in saved_attribute_names(type(t))), key
        else:
            assert torch.equal(t, u), key
    x = torch.randn(2, 128, dtype=dtype)
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(model, fresh))
    assert [repr(m) for m in fresh] == [repr(m) for m in model]
    save(fresh, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()

