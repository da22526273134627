"""The int8 x int8 GEMM ``mm_i8`` of the active int8_act build (AVX2 ``vpmaddubsw``, csrc/int8_act_avx2.cpp;
AVX-512 VNNI, csrc/int8_act.cpp) is exact: equal to the int32 product bit for bit. The AVX-512 build's is
VNNI code, run here only on a CPU with avx512_vnni."""

import re

import pytest
import torch

from lowbit.kernels import _ext, host

_EXT = _ext.load("int8_act")
_MM = getattr(_EXT, "mm_i8", None)
if _ext.active_isa("int8_act") == "avx512" and "avx512_vnni" not in host.cpu_flags():
    _MM = None
pytestmark = pytest.mark.skipif(_MM is None, reason="no mm_i8 this CPU can run")

I8 = torch.int8


def _reference(a, b):
    """The exact int32 product (not torch._int_mm: on VNNI hosts it misreads K = 1's transposed weight,
    tests/kernels/test_int8_mm_k1.py)."""
    return a.int() @ b.int().t()


def _rand(*shape, low=-128):
    return torch.randint(low, 128, shape, dtype=I8)


@pytest.mark.parametrize("k", [1, 15, 31, 32, 33, 100, 4096 + 8])
@pytest.mark.parametrize("n", [1, 7, 65])
def test_equals_int_mm_for_every_small_m(k, n):
    torch.manual_seed(k * 1000 + n)
    b = _rand(n, k)
    for m in range(1, 18):
        a = _rand(m, k)
        assert torch.equal(_MM(a, b), _reference(a, b)), f"M={m} K={k} N={n}"


@pytest.mark.parametrize("va", [-128, 127], ids=["a-128", "a127"])
@pytest.mark.parametrize("vb", [-128, 127], ids=["b-128", "b127"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_extreme_values_sum_exactly(va, vb, m):
    a, b = torch.full((m, 4096), va, dtype=I8), torch.full((5, 4096), vb, dtype=I8)
    out = _MM(a, b)
    assert torch.equal(out, _reference(a, b))
    assert torch.equal(out, torch.full((m, 5), va * vb * 4096, dtype=torch.int32))  # up to 2^26, exact


@pytest.mark.parametrize("k", [31, 64, 4096 + 8])
def test_rows_with_and_without_minus_128(k):
    # -128 in a takes another path (the row split in two); mixed here with rows that have none,
    # and -128 in b beside negative, zero and positive activations.
    torch.manual_seed(k)
    a, b = _rand(5, k, low=-127), _rand(9, k)
    a[1, ::3] = -128
    a[4, -1] = -128
    b[:, ::2] = -128
    b[3] = 0
    assert torch.equal(_MM(a, b), _reference(a, b))


def test_many_rows_take_several_sweeps():
    torch.manual_seed(0)
    a, b = _rand(71, 4096), _rand(13, 4096)  # more activation bytes than one sweep over the columns holds
    assert torch.equal(_MM(a, b), _reference(a, b))


@pytest.mark.parametrize("threads", [1, 2])
def test_split_over_threads(threads):
    torch.manual_seed(threads)
    a, b = _rand(3, 1000), _rand(517, 1000)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _MM(a, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out, _reference(a, b))


def test_int32_sum_wraps_like_int_mm():
    k = (1 << 17) + 32  # 2^14 * k > 2^31 - 1: both wrap modulo 2^32
    a, b = torch.full((1, k), -128, dtype=I8), torch.full((2, k), -128, dtype=I8)
    assert torch.equal(_MM(a, b), _reference(a, b))


@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_empty(m, k, n):
    a, b = torch.zeros(m, k, dtype=I8), torch.zeros(n, k, dtype=I8)
    out = _MM(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, torch.zeros(m, n, dtype=torch.int32))


def test_bad_arguments_raise_naming_them():
    a, b = _rand(3, 40), _rand(5, 40)
    cases = [
        ((a.t().contiguous().t(), b), "a must be a contiguous"),
        ((a[:, ::2], b[:, ::2]), "a must be a contiguous"),
        ((a, b.t().contiguous().t()), "b must be a contiguous"),
        ((a[0], b), re.escape("a must be a contiguous (M, K) tensor, got sizes [40]")),
        ((a, b.reshape(1, 5, 40)), re.escape("b must be a contiguous (N, K) tensor, got sizes [1, 5, 40]")),
        ((a.to(torch.uint8), b), "a must be int8, got Byte"),
        ((a, b.to(torch.int32)), "b must be int8, got Int"),
        ((a.float(), b), "a must be int8"),
        ((a, _rand(5, 41)), re.escape("a (M, K) and b (N, K) must have the same K, got [3, 40] and [5, 41]")),
    ]
    for args, why in cases:
        with pytest.raises(RuntimeError, match=f"mm_i8: {why}"):
            _MM(*args)
