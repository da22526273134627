import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.granularity import PerRow
from lowbit.primitives.float8 import (
    choose_qparams_float8,
    choose_qparams_float8_from_amax,
    dequantize_float8,
    fake_quantize_float8,
    quantize_float8,
)
from lowbit.spec import QuantSpec

E4M3 = QuantSpec("float8_e4m3fn")
E5M2 = QuantSpec("float8_e5m2")


def test_e4m3_hand_example():
    x = torch.tensor([-56.0, 1.0, 0.3])  # amax 56 = 448 / 8 -> scale 1/8
    s = choose_qparams_float8(x, E4M3)
    assert torch.equal(s, torch.tensor([0.125]))
    q = quantize_float8(x, s, E4M3)
    # x / s = [-448, 8, 2.4]; in [2, 4) e4m3 steps by 0.25, so 2.4 -> 2.5
    assert torch.equal(q, torch.tensor([-448.0, 8.0, 2.5]).to(torch.float8_e4m3fn))
    assert torch.equal(dequantize_float8(q, s, E4M3), torch.tensor([-56.0, 1.0, 0.3125]))


def test_e5m2_hand_example():
    x = torch.tensor([56.0, 0.1])  # amax 56 = 57344 / 1024
    s = choose_qparams_float8(x, E5M2)
    assert torch.equal(s, torch.tensor([1 / 1024]))
    q = quantize_float8(x, s, E5M2)
    # 0.1 * 1024 = 102.4; in [64, 128) e5m2 steps by 16, so 102.4 -> 96
    assert torch.equal(q, torch.tensor([57344.0, 96.0]).to(torch.float8_e5m2))
    assert torch.equal(dequantize_float8(q, s, E5M2), torch.tensor([56.0, 0.09375]))


def test_saturates_instead_of_nan():
    q = quantize_float8(torch.tensor([1000.0, -1e6]), torch.ones(1), E4M3)
    assert torch.equal(q.float(), torch.tensor([448.0, -448.0]))


def test_eps_clamps_zero_scale():
    s = choose_qparams_float8(torch.zeros(2, 3), QuantSpec("float8_e4m3fn", PerRow()))
    assert torch.equal(s, torch.full((2, 1), 1e-12))
    assert torch.equal(choose_qparams_float8_from_amax(torch.tensor([0.0, 896.0]), E4M3), torch.tensor([1e-12, 2.0]))


@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.sampled_from([E4M3, E5M2, QuantSpec("float8_e4m3fn", PerRow())]),
)
def test_fake_equals_two_step_and_idempotent(seed, dtype, spec):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    s = choose_qparams_float8(x, spec)
    assert s.dtype == torch.float32
    q = quantize_float8(x, s, spec)
    dq = dequantize_float8(q, s, spec)
    assert torch.equal(fake_quantize_float8(x, spec), dequantize_float8(q, s, spec, x.dtype))
    assert torch.equal(quantize_float8(dq, s, spec), q)


def test_fake_quantize_gradient():
    x = torch.tensor([1.0, 2.0, 1000.0], requires_grad=True)
    fake_quantize_float8(x, E4M3, scale=torch.ones(1)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        choose_qparams_float8(torch.arange(3), E4M3)
    with pytest.raises(ValueError, match="NaN or inf"):
        choose_qparams_float8(torch.tensor([1.0, float("inf")]), E4M3)
    with pytest.raises(ValueError, match="integer format"):
        choose_qparams_float8(torch.randn(3), QuantSpec("int8"))
    with pytest.raises(TypeError, match="qdata has dtype"):
        dequantize_float8(torch.zeros(3, dtype=torch.float8_e5m2), torch.ones(1), E4M3)
    with pytest.raises(ValueError, match="empty"):
        choose_qparams_float8(torch.empty(0), E4M3)


def test_quantize_leaves_its_input_alone():
    x = torch.randn(4, 8)
    before = x.clone()
    quantize_float8(x, choose_qparams_float8(x, E4M3), E4M3)
    assert torch.equal(x, before)
