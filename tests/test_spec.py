import pytest
import torch

from lowbit.granularity import PerGroup
from lowbit.spec import FLOAT8_EPS, INT_EPS, QuantSpec


def test_defaults():
    s = QuantSpec("int8")
    assert s.eps == INT_EPS and s.scale_dtype == torch.float32
    assert (s.qmin, s.qmax) == (-128, 127) and not s.has_zero_point
    a = QuantSpec("uint4", PerGroup(32), symmetric=False)
    assert a.zero_point_dtype == torch.int32 and a.has_zero_point
    f = QuantSpec("float8_e4m3fn")
    assert f.eps == FLOAT8_EPS and not f.has_zero_point
    h = QuantSpec("uint4", symmetric=False, zero_point_domain="float")
    assert h.zero_point_dtype == torch.float32


def test_narrow_range():
    s = QuantSpec("int8", quant_min=-127, quant_max=127)
    assert (s.qmin, s.qmax) == (-127, 127)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype="float8_e4m3fn", symmetric=False), "symmetric"),
        (dict(dtype="int8", eps=0.0), "eps"),
        (dict(dtype="int8", eps=float("nan")), "eps"),
        (dict(dtype="int8", quant_min=5, quant_max=4), "quant_min=5 > quant_max=4"),
        (dict(dtype="int4", quant_min=-9), "outside"),
        (dict(dtype="int8", zero_point_domain="float"), "symmetric=False"),
        (dict(dtype="int8", symmetric=False, zero_point_domain="half"), "zero_point_domain"),
        (dict(dtype="int8", scale_dtype=torch.int32), "scale_dtype"),
        (dict(dtype="int12"), "dtype"),
    ],
)
def test_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_granularity_type():
    with pytest.raises(TypeError, match="granularity"):
        QuantSpec("int8", granularity="per_row")
