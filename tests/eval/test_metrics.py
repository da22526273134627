import math

import pytest
import torch

from lowbit.eval.metrics import sqnr


def test_known_value():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert sqnr(ref, ref + torch.tensor([0.05, 0.0])) == pytest.approx(40.0)  # 20 log10(100)


def test_equal_and_zero_signal():
    x = torch.randn(8)
    assert sqnr(x, x.clone()) == math.inf
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf


def test_mixed_dtypes_and_shape_error():
    x = torch.randn(16)
    assert sqnr(x, x.bfloat16()) > 40
    with pytest.raises(ValueError, match="shape"):
        sqnr(torch.zeros(3), torch.zeros(4))
