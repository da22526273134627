"""Each scheme's spec is stated once, by its config; everything else reads it.

* Source check: ``QuantSpec(...)`` is constructed only where a scheme is stated (the configs, the
  named scale rules of ``primitives/rules.py``, the fixed softmax grid) and no statement is written
  twice in one file. The kernels and tensors layers construct none: they read the spec the tensor
  stores; calibration observes with the static configs' ``act_spec()``.
* Behaviour: every config's tensor stores exactly ``config.weight_spec()`` / ``config.act_spec()``,
  dequantizes with it, and the QAT mirror fake-quantizes with it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit.configs as C
from lowbit import quantize_
from lowbit.granularity import PerGroup, PerRow
from lowbit.qat.fake_quant import fake_quant_for
from lowbit.spec import QuantSpec, spec_from_key, spec_key

ROOT = Path(__file__).resolve().parents[1] / "lowbit"
# where a QuantSpec may be written (each statement once); calibration reads the static configs' act_spec()
ALLOWED = {"configs/int8.py", "configs/int4.py", "configs/float8.py", "primitives/rules.py", "static/softmax.py",
           "spec.py"}

CONFIGS = [
    C.Int8WeightOnlyConfig(),
    C.Int8WeightOnlyConfig(PerGroup(32)),
    C.Int8DynamicActivationInt8WeightConfig(),
    C.Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
    C.Int8StaticActivationInt8WeightConfig(act_scale=0.05),
    C.Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=3),
    C.Int4WeightOnlyConfig(group_size=32),
    C.Int4WeightOnlyConfig(group_size=32, symmetric=True),
    C.Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
    C.Int8DynamicActivationInt4WeightConfig(),
    C.Float8DynamicActivationInt4WeightConfig(group_size=32),
    C.Float8WeightOnlyConfig(),
    C.Float8DynamicActivationFloat8WeightConfig(),
    C.Float8DynamicActivationFloat8WeightConfig(PerRow()),
    C.Float8StaticActivationFloat8WeightConfig(act_scale=0.01),
]


def _quantspec_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [ast.unparse(n) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "QuantSpec"]


def test_specs_are_written_only_where_schemes_are_stated():
    offenders, repeated = {}, {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        calls = _quantspec_calls(path)
        if calls and rel not in ALLOWED:
            offenders[rel] = calls
        dups = {c for c in calls if calls.count(c) > 1}
        if dups:
            repeated[rel] = sorted(dups)
    assert not offenders, f"QuantSpec(...) written outside the configs/rules: {offenders}"
    assert not repeated, f"the same spec written twice in one file: {repeated}"


def test_kernels_and_tensors_state_no_spec():
    for sub in ("kernels", "tensors"):
        for path in (ROOT / sub).rglob("*.py"):
            assert not _quantspec_calls(path), path


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_tensor_stores_the_config_specs_and_qat_uses_them(config):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    w = layer.weight.detach().clone()
    quantize_(layer, config)
    t = layer.weight
    assert t.spec == config.weight_spec()
    assert t.act_spec == config.act_spec()
    # the QAT mirror's weight equals the converted tensor's dequantized weight (same spec, same rule)
    assert torch.equal(fake_quant_for(config).weight(w).to(t.dequantize().dtype), t.dequantize())


def test_spec_key_round_trips_and_rejects_unknown_keys():
    spec = C.Int4WeightOnlyConfig(group_size=64).weight_spec()
    key = spec_key(spec)
    assert spec_from_key(key) == spec and spec_key(spec) is key  # cached on the spec
    with pytest.raises(ValueError, match="names no QuantSpec"):
        spec_from_key("QuantSpec(dtype=nothing)")
    with pytest.raises(TypeError, match="must be a QuantSpec"):
        spec_key("int8")
    assert isinstance(spec_from_key(key), QuantSpec)
