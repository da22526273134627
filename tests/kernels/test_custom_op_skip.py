"""Eager CPU calls wanting no gradient that the decode GEMVs' dispatcher ops do not take (int4 and int8 weight-only,
any other M or dtype) run the custom op's CPU body directly (``int4_linear_cpu``, ``int8._weight_only_cpu``), without
the op's dispatch: the same values as the custom op; a call wanting a gradient still goes through the op."""

import pytest
import torch

import lowbit.kernels.int4 as k4
import lowbit.kernels.int8 as k8
from lowbit import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from lowbit.kernels import _int4_cpu
from lowbit.spec import spec_key

CASES = [  # (module holding the custom op, its name, config, M and x dtype)
    (k4, "int4_weight_only_linear", Int4WeightOnlyConfig(group_size=64), 9, torch.bfloat16),
    (k4, "int4_weight_only_linear", Int4WeightOnlyConfig(group_size=64), 33, torch.bfloat16),
    (k4, "int4_weight_only_linear", Int4WeightOnlyConfig(group_size=64), 3, torch.float32),
    (k8, "int8_weight_only_linear", Int8WeightOnlyConfig(), 17, torch.bfloat16),
    (k8, "int8_weight_only_linear", Int8WeightOnlyConfig(), 300, torch.bfloat16),
    (k8, "int8_weight_only_linear", Int8WeightOnlyConfig(), 200, torch.float32),
]


@pytest.mark.parametrize("mod, name, config, m, dtype", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_eager_calls_skip_the_custom_op(mod, name, config, m, dtype, monkeypatch):
    if mod is k4 and not _int4_cpu.available():
        pytest.skip("int4 C++ extension not available (the custom op's CPU body returns nothing without it)")
    torch.manual_seed(0)
    layer = quantize_(torch.nn.Linear(256, 96).to(dtype), config)
    w = layer.weight
    x = torch.randn(m, 256, dtype=dtype)
    op = getattr(mod, name)
    with torch.no_grad():
        custom = op(x, w.qdata, w.scale, getattr(w, "zero_point", None), layer.bias, spec_key(w.spec), "auto")
    calls = []
    monkeypatch.setattr(mod, name, lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        assert torch.equal(layer(x), custom)
    assert calls == []
    xg = x.clone().requires_grad_()
    layer(xg).float().sum().backward()
    assert calls == [1] and xg.grad is not None
