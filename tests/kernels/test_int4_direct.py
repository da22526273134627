"""The bf16 decode GEMV as a C++ dispatcher op (lowbit_cpu::int4_gemv_bf16), used when no gradient is wanted."""

import pytest
import torch
from torch import nn

from lowbit import Int4WeightOnlyConfig, quantize_
from lowbit.kernels import _int4_cpu
from lowbit.kernels.int4 import int4_weight_only_linear
from lowbit.spec import spec_key

pytestmark = pytest.mark.skipif(_int4_cpu.direct_gemv_op() is None, reason="int4 C++ extension not available")


def _layer(n=96, k=256, g=64, symmetric=False, bias=True):
    torch.manual_seed(0)
    m = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return quantize_(m, Int4WeightOnlyConfig(group_size=g, symmetric=symmetric))


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_direct_op_equals_the_custom_op(m, symmetric, bias):
    layer = _layer(symmetric=symmetric, bias=bias)
    w = layer.weight
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        direct = _int4_cpu.direct_gemv(x, w.qdata, w.scale, w.zero_point, layer.bias)
        custom = int4_weight_only_linear(x, w.qdata, w.scale, w.zero_point, layer.bias, spec_key(w.spec), "auto")
        assert direct is not None and torch.equal(direct, custom)
        assert torch.equal(layer(x), custom)


def test_not_taken_when_a_gradient_is_wanted_or_m_is_large():
    layer = _layer()
    w = layer.weight
    x = torch.randn(2, 256, dtype=torch.bfloat16, requires_grad=True)
    assert _int4_cpu.direct_gemv(x, w.qdata, w.scale, w.zero_point, None) is None
    layer(x).float().sum().backward()  # the custom op's autograd gives the input gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
    big = torch.randn(_int4_cpu.gemv_max_m() + 1, 256, dtype=torch.bfloat16)
    assert _int4_cpu.direct_gemv(big, w.qdata, w.scale, w.zero_point, None) is None
    assert _int4_cpu.direct_gemv(big[:1].float(), w.qdata, w.scale, w.zero_point, None) is None


def test_compiled_graph_calls_the_direct_op():
    from torch._inductor.utils import run_and_get_code

    layer = _layer()
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)
        out, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    assert torch.equal(out, ref)
    assert "lowbit_cpu.int4_gemv_bf16" in "\n".join(code)


@pytest.mark.parametrize("m, dtype", [(9, torch.bfloat16), (33, torch.bfloat16), (3, torch.float32)], ids=str)
def test_eager_calls_above_the_gemv_skip_the_custom_op(m, dtype, monkeypatch):
    """An eager CPU call wanting no gradient that the GEMV does not take runs the custom op's CPU body
    (int4_linear_cpu) directly: the same values as the custom op; a call wanting a gradient goes through the op."""
    import lowbit.kernels.int4 as k4

    layer = _layer(bias=True)
    layer.to(dtype)
    w = layer.weight
    x = torch.randn(m, 256, dtype=dtype)
    with torch.no_grad():
        custom = int4_weight_only_linear(x, w.qdata, w.scale, w.zero_point, layer.bias, spec_key(w.spec), "auto")
    calls = []
    op = k4.int4_weight_only_linear
    monkeypatch.setattr(k4, "int4_weight_only_linear", lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        assert torch.equal(layer(x), custom)
    assert calls == []
    xg = x.clone().requires_grad_()
    layer(xg).float().sum().backward()
    assert calls == [1] and xg.grad is not None
