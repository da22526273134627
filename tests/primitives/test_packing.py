import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.primitives.packing import pack_int4, unpack_int4


def test_layout():
    v = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    p = pack_int4(v)
    # low nibble = even index; -2 = 0xE, -8 = 0x8
    assert torch.equal(p, torch.tensor([[0xE1, 0x87]], dtype=torch.uint8))
    assert torch.equal(pack_int4(torch.tensor([3, 15], dtype=torch.uint8)), torch.tensor([0xF3], dtype=torch.uint8))


@given(st.integers(0, 2**31 - 1), st.booleans(), st.integers(1, 3))
def test_inverse(seed, signed, rank):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(torch.randint(1, 5, (rank - 1,), generator=g).tolist()) + (2 * int(torch.randint(1, 9, (1,), generator=g)),)
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    v = torch.randint(lo, hi, shape, generator=g).to(dt)
    p = pack_int4(v)
    assert p.shape == shape[:-1] + (shape[-1] // 2,) and p.dtype == torch.uint8
    u = unpack_int4(p, signed=signed)
    assert u.dtype == dt and torch.equal(u, v)
    assert torch.equal(pack_int4(u), p)


def test_errors():
    with pytest.raises(ValueError, match="even last dim"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"outside the 4-bit range \[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="packed must be uint8"):
        unpack_int4(torch.zeros(2, dtype=torch.int8), signed=True)
