"""Decode plans (lowbit/kernels/decode.py): the cached small-M route gives the routing's values bit for
bit, is taken where it applies, follows in-place edits, and is dropped on reassignment, pickling
and deep copies."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import quantize_
from lowbit.configs.float8 import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
)
from lowbit.configs.int4 import (
    Float8DynamicActivationInt4WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
)
from lowbit.configs.int8 import (
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.granularity import PerRow
from lowbit.kernels import _ext
from lowbit.kernels.preference import KernelPreference
from lowbit.tensors.base import _PLAN

CONFIGS = {
    "int8wo": Int8WeightOnlyConfig,
    "w8a8": Int8DynamicActivationInt8WeightConfig,
    "w8a8-static": lambda: Int8StaticActivationInt8WeightConfig(act_scale=0.02),
    "w8a8-static-zp": lambda: Int8StaticActivationInt8WeightConfig(act_scale=0.02, act_zero_point=5),
    "int4wo": lambda: Int4WeightOnlyConfig(group_size=64),
    "8da4w": lambda: Int8DynamicActivationInt4WeightConfig(group_size=32),
    "fp8wo": Float8WeightOnlyConfig,
    "fp8dq": Float8DynamicActivationFloat8WeightConfig,
    "fp8dq-row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    "fp8-static": lambda: Float8StaticActivationFloat8WeightConfig(act_scale=0.01),
    "fp8-static-row": lambda: Float8StaticActivationFloat8WeightConfig(act_scale=0.01, granularity=PerRow()),
    "fp8a-int4w": lambda: Float8DynamicActivationInt4WeightConfig(group_size=64),
}
EXT = {"int8wo": "int8_gemv", "w8a8": "int8_act", "w8a8-static": "int8_act", "w8a8-static-zp": "int8_act", "int4wo": "int4_cpu", "8da4w": "int8_int4", "fp8wo": "fp8_cpu",
       "fp8dq": "fp8_cpu", "fp8dq-row": "fp8_cpu", "fp8-static": "fp8_cpu", "fp8-static-row": "fp8_cpu", "fp8a-int4w": "int4_cpu"}


def _linear(name, dtype, n=48, k=128, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(lin, CONFIGS[name]())
    return lin


def _unplanned(lin, x):
    """The same call through the routing only: a copy of the weight whose plan is set to None."""
    w = lin.weight.detach()
    w.__dict__[_PLAN] = None
    return F.linear(x, w, lin.bias)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_planned_equals_routed(name, dtype, m, bias):
    lin = _linear(name, dtype, bias=bias)
    x = torch.randn(m, 128, dtype=dtype)
    x3 = x.reshape(1, m, 128)
    with torch.no_grad():
        out = lin(x)
        assert torch.equal(out, _unplanned(lin, x))
        assert torch.equal(lin(x3), out.reshape(1, m, -1))


def _needs_plan(name):
    """Skip where ``name``'s plan cannot exist: its extension is not available (a host without a compiler, or
    LOWBIT_NO_EXT=1); the plans are the C++ kernels' entries."""
    if _ext.load(EXT[name]) is None:
        pytest.skip(f"extension {EXT[name]} not available")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_is_taken_at_decode(name):
    _needs_plan(name)
    lin = _linear(name, torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x)
        plan = lin.weight.__dict__[_PLAN]
        assert plan is not None and plan(x, None) is not None


@pytest.mark.parametrize("name", ["int8wo", "w8a8", "w8a8-static-zp", "int4wo", "fp8dq-row"])
def test_in_place_edit_is_seen(name):
    lin, other = _linear(name, torch.bfloat16, seed=0), _linear(name, torch.bfloat16, seed=1)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        before = lin(x)
        lin.weight.copy_(other.weight)
        after = lin(x)
        assert torch.equal(after, other(x))
        assert not torch.equal(after, before)


@pytest.mark.parametrize("name", ["fp8wo", "fp8dq-row", "fp8-static"])
def test_a_nan_copied_into_a_float8_weight_is_seen(name):
    """The float8 plans tell the GEMV the weight holds no NaN / inf byte (counted once per version of
    qdata, _fp8_cpu.weight_finite): a copy_ that brings one in bumps the version, and the NaN reaches
    the outputs that use that row, as the reference gives it."""
    lin, other = _linear(name, torch.bfloat16, seed=0), _linear(name, torch.bfloat16, seed=1)
    other.weight.qdata.view(torch.uint8)[7, 3] = 0x7F  # e4m3fn NaN
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert bool(lin(x).isfinite().all())
        lin.weight.copy_(other.weight)
        out = lin(x)
    assert bool(out[0, 7].isnan()) and bool(out[0, torch.arange(48) != 7].isfinite().all())
    assert torch.equal(out.nan_to_num(), _unplanned(lin, x).nan_to_num())


@pytest.mark.parametrize("name", ["w8a8-static", "w8a8-static-zp", "fp8-static"])
def test_in_place_edit_of_the_static_activation_qparams_is_seen(name):
    """The static plan reads act_scale / act_zero_point on every call (a re-calibration edits them in place)."""
    lin = _linear(name, torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        before = lin(x)
        assert (lin.weight.__dict__[_PLAN] is not None) == (_ext.load(EXT[name]) is not None)
        lin.weight.act_scale.mul_(1.7)  # not a power of two: float8 rounding is scale-invariant under those
        if getattr(lin.weight, "act_zero_point", None) is not None:
            lin.weight.act_zero_point.sub_(7)
        after = lin(x)
        assert torch.equal(after, _unplanned(lin, x))
        assert not torch.equal(after, before)


def test_a_static_scale_edited_to_zero_is_refused_not_taken_as_dynamic():
    """quantize_i8 reads a scale <= 0 as "dynamic": plan and routing must not pass one through."""
    lin = _linear("w8a8-static", torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x)
        lin.weight.act_scale.zero_()
        with pytest.raises(ValueError, match="act_scale=0.0: a static activation scale must be a positive finite"):
            lin(x)


def test_reassigning_a_field_drops_the_plan():
    _needs_plan("int8wo")
    lin = _linear("int8wo", torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x)
        assert lin.weight.__dict__[_PLAN] is not None
        lin.weight.kernel = KernelPreference.REFERENCE
        assert _PLAN not in lin.weight.__dict__
        lin(x)
        assert lin.weight.__dict__[_PLAN] is None  # kernel "reference": no plan


def test_pickle_and_deepcopy_leave_the_plan_out():
    _needs_plan("w8a8")
    lin = _linear("w8a8", torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        out = lin(x)
        assert lin.weight.__dict__.get(_PLAN) is not None
        buf = io.BytesIO()
        torch.save(lin, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        dup = copy.deepcopy(lin)
        for m in (loaded, dup):
            assert _PLAN not in m.weight.__dict__
            assert torch.equal(m(x), out)


def test_gradient_wanted_takes_the_routing():
    lin = _linear("int4wo", torch.bfloat16, bias=True)
    lin.bias.requires_grad_(True)
    x = torch.randn(1, 128, dtype=torch.bfloat16, requires_grad=True)
    out = lin(x)
    out.sum().backward()
    assert x.grad is not None and lin.bias.grad is not None
    with torch.no_grad():
        assert torch.equal(out.detach(), lin(x))
