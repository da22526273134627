"""The int8 weight-only decode GEMV as a C++ dispatcher op (lowbit_cpu::int8_weight_only_mm)."""

import pytest
import torch
from torch import nn

from lowbit import Int8WeightOnlyConfig, PerGroup, PerTensor, quantize_
from lowbit.kernels import int8 as K
from lowbit.spec import spec_key

pytestmark = pytest.mark.skipif(K._direct_gemv_op() is None, reason="int8 C++ extension not available")


def _layer(granularity, dtype, bias=True):
    torch.manual_seed(0)
    m = nn.Linear(256, 96, bias=bias).to(dtype)
    return quantize_(m, Int8WeightOnlyConfig(granularity) if granularity else Int8WeightOnlyConfig())


@pytest.mark.parametrize("granularity", [None, PerGroup(32), PerTensor()], ids=["row", "g32", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_direct_op_equals_the_custom_op(granularity, dtype, bias):
    layer = _layer(granularity, dtype, bias)
    w = layer.weight
    x = torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        custom = K.int8_weight_only_linear(x, w.qdata, w.scale, w.zero_point, layer.bias, spec_key(w.spec), "auto")
        direct = K.int8_weight_only_linear_any(x, w.qdata, w.scale, w.zero_point, layer.bias, w.spec, "auto")
        assert torch.equal(direct, custom)
        assert torch.equal(layer(x), custom)


def test_gradients_still_flow_and_compiled_graphs_call_the_op():
    from torch._inductor.utils import run_and_get_code

    layer = _layer(None, torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()  # takes the custom op: its autograd gives the input gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        ref = layer(x.detach())
        out, code = run_and_get_code(torch.compile(layer, fullgraph=True), x.detach())
    assert torch.equal(out, ref)
    assert "lowbit_cpu.int8_weight_only_mm" in "\n".join(code)
