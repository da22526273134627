import pickle

import pytest
import torch

from lowbit.granularity import PerGroup
from lowbit.spec import FLOAT8_EPS, INT_EPS, QuantSpec, spec_from_key, spec_key


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


SYM_NO_STEP = r"\[{}, {}\] of {} \(symmetric=True\) has no room for a step on each side of zero .*infinite.*symmetric=False"
ASYM_NO_STEP = r"\[{}, {}\] of {} \(symmetric=False\) has no room for two values: the scale would be infinite"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype="int1"), SYM_NO_STEP.format(-1, 0, "int1")),  # no positive step: amax / min(0, 1) = inf
        (dict(dtype="uint1"), SYM_NO_STEP.format(0, 1, "uint1")),  # midpoint 1, no step above it
        (dict(dtype="int8", quant_min=0, quant_max=5), SYM_NO_STEP.format(0, 5, "int8")),
        (dict(dtype="int8", quant_min=-5, quant_max=0), SYM_NO_STEP.format(-5, 0, "int8")),
        (dict(dtype="uint8", quant_min=3, quant_max=4), SYM_NO_STEP.format(3, 4, "uint8")),  # midpoint 4: min(0, 1)
        (dict(dtype="uint8", symmetric=False, quant_min=5, quant_max=5), ASYM_NO_STEP.format(5, 5, "uint8")),
        (dict(dtype="int4", symmetric=False, quant_min=7, quant_max=7), ASYM_NO_STEP.format(7, 7, "int4")),
    ],
)
def test_rejects_a_range_with_no_step(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs,qmin,qmax",
    [
        (dict(dtype="int8", quant_min=-1, quant_max=1), -1, 1),  # one step each side of zero
        (dict(dtype="uint8", quant_min=3, quant_max=5), 3, 5),  # midpoint 4, one step each side
        (dict(dtype="uint8", symmetric=False, quant_min=5, quant_max=6), 5, 6),  # two values
        (dict(dtype="int1", symmetric=False), -1, 0),
        (dict(dtype="int8", quant_min=-128, quant_max=127), -128, 127),  # the dtype's own ends
        (dict(dtype="uint4", quant_max=9), 0, 9),  # one end given, the other from the dtype
        (dict(dtype="uint4", quant_min=2), 2, 15),
    ],
)
def test_accepts_the_narrowest_ranges(kwargs, qmin, qmax):
    s = QuantSpec(**kwargs)
    assert (s.qmin, s.qmax) == (qmin, qmax)


@pytest.mark.parametrize(
    "dtype,symmetric,has_zp",
    [("int8", True, False), ("int8", False, True), ("uint8", True, True), ("uint4", False, True),
     ("float8_e4m3fn", True, False), ("float8_e5m2", True, False)],
)
def test_has_zero_point(dtype, symmetric, has_zp):
    assert QuantSpec(dtype, symmetric=symmetric).has_zero_point is has_zp


def test_explicit_fields_are_kept():
    s = QuantSpec(torch.int8, PerGroup(4), eps=2, scale_dtype=torch.bfloat16, zero_point_dtype=torch.int8)
    assert s.dtype.name == "int8" and s.eps == 2.0 and isinstance(s.eps, float)
    assert s.scale_dtype == torch.bfloat16 and s.zero_point_dtype == torch.int8
    assert s.block_size((3, 8)) == (1, 4)
    assert QuantSpec("float8_e5m2").zero_point_dtype is None  # float8 carries no zero point
    with pytest.raises(ValueError, match="quant_min/quant_max are not allowed for float8_e4m3fn"):
        QuantSpec("float8_e4m3fn", quant_max=100)
    with pytest.raises(ValueError, match="eps"):
        QuantSpec("int8", eps=-1e-3)


def test_spec_key_round_trip():
    a = QuantSpec("uint4", PerGroup(32), symmetric=False)
    key = spec_key(a)
    assert isinstance(key, str) and spec_from_key(key) is a and spec_key(a) == key
    b = QuantSpec("uint4", PerGroup(32), symmetric=False)  # equal, registered under the same key
    assert spec_key(b) == key and spec_from_key(key) == b
    # pickling leaves the cached key behind; the copy is equal and gets the key again on demand
    c = pickle.loads(pickle.dumps(a))
    assert c == a and "_key" not in c.__dict__ and spec_key(c) == key
    with pytest.raises(ValueError, match="names no QuantSpec registered"):
        spec_from_key("QuantSpec(nothing)")
    with pytest.raises(TypeError, match="spec must be a QuantSpec, got str"):
        spec_key("int8")
