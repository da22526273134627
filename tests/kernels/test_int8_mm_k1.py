"""``lowbit::int8_mm`` with K = 1: the transposed (N, 1) weight has strides (1, 1), a layout torch's
CPU ``_int_mm`` misreads on hosts with int8 dot products (found by test_kernel_properties on an AVX-512
VNNI host: W8A8 outputs ~1e4 for a Linear(1, 2))."""

import pytest
import torch

from lowbit import configs as C
from lowbit.kernels.w8a8 import int8_mm
from lowbit.quantize import quantize_


@pytest.mark.parametrize("m", [1, 2, 17, 33])
@pytest.mark.parametrize("n", [1, 2, 16, 65])
def test_int8_mm_k1_exact(m, n):
    g = torch.Generator().manual_seed(m * 100 + n)
    a = torch.randint(-128, 128, (m, 1), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, 1), dtype=torch.int8, generator=g)
    assert torch.equal(int8_mm(a, b), a.int() @ b.int().t())


def test_w8a8_linear_with_one_input_feature():
    torch.manual_seed(0)
    lin = torch.nn.Linear(1, 2, bias=False)
    x = torch.randn(3, 1)
    quantize_(lin, C.Int8DynamicActivationInt8WeightConfig())
    w = lin.weight.dequantize(torch.float32)
    xs = x.abs().amax(-1, keepdim=True) / 127  # one input feature: each row quantizes to +-127 exactly
    expected = (torch.round(x / xs) * xs) @ w.t()
    torch.testing.assert_close(lin(x), expected, rtol=1e-6, atol=1e-6)
