"""Observers: ranges against hand-computed values, qparams equal to the primitives' on the same data."""

import math

import pytest
import torch

from lowbit.granularity import PerAxis, PerRow, PerTensor, PerToken
from lowbit.observers import MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, make_observer
from lowbit.primitives.affine import choose_qparams_affine
from lowbit.primitives.float8 import choose_qparams_float8
from lowbit.spec import QuantSpec

INT8 = QuantSpec("int8", PerTensor())
INT8_ASYM = QuantSpec("int8", PerTensor(), symmetric=False)
FP8 = QuantSpec("float8_e4m3fn", PerTensor())


def test_minmax_running_range_by_hand():
    obs = MinMaxObserver(INT8_ASYM)
    obs(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    obs(torch.tensor([[-4.0, 0.0], [2.0, 1.0]]))
    assert torch.equal(obs.min_val, torch.tensor([[-4.0]])) and torch.equal(obs.max_val, torch.tensor([[3.0]]))
    assert int(obs.num_batches) == 2
    scale, zp = obs.calculate_qparams()
    assert torch.equal(scale, torch.tensor([[7.0 / 255]]))
    assert torch.equal(zp, torch.tensor([[-128 - round(-4.0 / (7.0 / 255))]], dtype=torch.int32))


def test_moving_average_by_hand():
    obs = MovingAverageMinMaxObserver(INT8, averaging_constant=0.25)
    obs(torch.tensor([[-1.0, 1.0]]))
    obs(torch.tensor([[-5.0, 9.0]]))
    assert torch.equal(obs.min_val, torch.tensor([[-1.0 + 0.25 * (-5.0 + 1.0)]]))
    assert torch.equal(obs.max_val, torch.tensor([[1.0 + 0.25 * (9.0 - 1.0)]]))


def test_percentile_by_hand():
    x = torch.arange(1, 10001, dtype=torch.float32).reshape(100, 100)  # 1..10000
    obs = PercentileObserver(INT8_ASYM, percentile=99.0)
    obs(x)
    assert obs.max_val.item() == 9900.0 and obs.min_val.item() == 101.0
    obs(x + 100)  # equal-size batches: the plain average
    assert obs.max_val.item() == 9950.0 and obs.min_val.item() == 151.0
    per_channel = PercentileObserver(QuantSpec("int8", PerAxis(1)), percentile=100.0)
    per_channel(x)
    assert torch.equal(per_channel.max_val, x.amax(0, keepdim=True))


def test_per_channel_on_flattened_tokens():
    x = torch.randn(2, 5, 8)
    obs = MinMaxObserver(QuantSpec("int8", PerAxis(1)))
    obs(x)
    assert obs.min_val.shape == (1, 8)
    assert torch.equal(obs.max_val, x.reshape(-1, 8).amax(0, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", [INT8, INT8_ASYM, QuantSpec("uint8", PerTensor(), symmetric=False),
                                  QuantSpec("int8", PerRow())], ids=["sym", "asym", "uint8", "row"])
def test_qparams_equal_the_primitives_on_one_batch(dtype, spec):
    x = (torch.randn(16, 64) * 3 + 0.5).to(dtype)
    obs = MinMaxObserver(spec)
    obs(x)
    s, zp = obs.calculate_qparams()
    s_ref, zp_ref = choose_qparams_affine(x, spec)
    assert torch.equal(s, s_ref)
    assert (zp is None and zp_ref is None) or torch.equal(zp, zp_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float8_qparams_equal_the_primitives(dtype):
    x = (torch.randn(16, 64) * 7).to(dtype)
    obs = MinMaxObserver(FP8)
    obs(x)
    s, zp = obs.calculate_qparams()
    assert zp is None and torch.equal(s, choose_qparams_float8(x, FP8))


def test_all_zero_input_gives_eps_scale_not_nan():
    for spec in (INT8, INT8_ASYM, FP8):
        obs = MinMaxObserver(spec)
        obs(torch.zeros(4, 8))
        s, zp = obs.calculate_qparams()
        assert s.item() == torch.tensor(spec.eps, dtype=torch.float32).item() and math.isfinite(s.item())
        if zp is not None:
            assert zp.item() == spec.qmin  # 0 maps to qmin: exactly representable


def test_errors_name_the_observer():
    obs = MinMaxObserver(INT8, name="blocks.0.q_proj")
    with pytest.raises(RuntimeError, match="'blocks.0.q_proj' has seen no data"):
        obs.calculate_qparams()
    with pytest.raises(ValueError, match="'blocks.0.q_proj'.*NaN or inf"):
        obs(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        obs(torch.tensor([[1.0, float("inf")]]))
    assert not obs.has_data  # a rejected batch leaves no trace
    with pytest.raises(TypeError, match="observes floating tensors"):
        obs(torch.tensor([[1, 2]]))
    per_token = MinMaxObserver(QuantSpec("int8", PerToken()), name="t")
    per_token(torch.randn(3, 4))
    with pytest.raises(ValueError, match="range shape .* differs"):
        per_token(torch.randn(5, 4))


def test_bad_arguments():
    with pytest.raises(TypeError, match="QuantSpec"):
        MinMaxObserver("int8")
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(INT8, averaging_constant=0.0)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(INT8, percentile=40)
    with pytest.raises(ValueError, match="PercentileObserver granularity"):
        PercentileObserver(QuantSpec("int8", PerRow()))
    with pytest.raises(ValueError, match="observer='histogram'; allowed"):
        make_observer("histogram", INT8)


def test_state_dict_round_trip():
    obs = MinMaxObserver(INT8)
    obs(torch.randn(4, 4))
    fresh = MinMaxObserver(INT8)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.calculate_qparams()[0], obs.calculate_qparams()[0])
