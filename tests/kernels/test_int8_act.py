"""The C++ W8A8 activation quantization and epilogue equal the PyTorch path bit for bit."""

import pytest
import torch

from lowbit.configs import Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig
from lowbit.granularity import PerRow, PerTensor
from lowbit.kernels import _ext
from lowbit.kernels.int8 import _activation_forward_aten, _fused_cpu

pytestmark = pytest.mark.skipif(_ext.load("int8_act") is None, reason="C++ kernel int8_act not available here")

SHAPES = [(1, 64, 48), (7, 100, 33), (64, 512, 256), (3, 17, 5)]
ACTS = {  # (static act_scale, act_zero_point, the config stating the activation spec)
    "dynamic": (None, None, Int8DynamicActivationInt8WeightConfig()),
    "static": (torch.tensor([0.02]), None, Int8StaticActivationInt8WeightConfig(act_scale=0.02)),
    "static-zp": (torch.tensor([0.015]), torch.tensor([5], dtype=torch.int32),
                  Int8StaticActivationInt8WeightConfig(act_scale=0.015, act_zero_point=5)),
    "static-zp-neg": (torch.tensor([0.03]), torch.tensor([-100], dtype=torch.int32),
                      Int8StaticActivationInt8WeightConfig(act_scale=0.03, act_zero_point=-100)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["wrow", "wtensor"])
def test_fused_equals_aten(dtype, shape, act, bias, per_tensor):
    torch.manual_seed(0)
    m, k, n = shape
    x = (torch.randn(m, k) * 3).to(dtype)
    x[0, 0] = 1e4 if dtype != torch.float16 else 6e4  # saturates a static range
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(1 if per_tensor else n, 1) * 0.01 + 1e-4
    b = torch.randn(n).to(dtype) if bias else None
    a_s, a_zp, config = ACTS[act]
    spec = Int8DynamicActivationInt8WeightConfig(granularity=PerTensor() if per_tensor else PerRow()).weight_spec()
    fused = _fused_cpu(x, w, s, b, a_s, a_zp, config.act_spec())
    assert fused is not None
    assert torch.equal(fused, _activation_forward_aten(x, w, s, b, a_s, a_zp, config.act_spec(), spec, "auto"))


def test_not_taken_where_it_does_not_apply():
    x = torch.randn(4, 32)
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    s = torch.rand(8, 1)
    sym, asym = (Int8DynamicActivationInt8WeightConfig(act_symmetric=a).act_spec() for a in (True, False))
    assert _fused_cpu(x, w, s, None, None, None, asym) is None  # dynamic asymmetric: PyTorch path
    assert _fused_cpu(x.t().contiguous().t(), w, s, None, None, None, sym) is None  # non-contiguous input
    assert _fused_cpu(x, w, s, torch.randn(8, dtype=torch.float64), None, None, sym) is None  # bias dtype differs
