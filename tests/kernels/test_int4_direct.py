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
