"""The AVX-512 int8_act build's ``gemm_i8`` (csrc/gemm_i8.h: vpdpbusd on weight panels packed per call), the
W8A8 GEMM from M = 5 on CPUs with AVX-512 VNNI: equal to ``torch._int_mm`` bit for bit (int32 sums are
exact), over the shapes where its blocking has edges: M not a multiple of the 6-row tile, N not a
multiple of the 64-column panel, K not a multiple of 4 (a padded copy of a) or of 64 (a partial
chunk), K over the 4096-column panel block (accumulators reloaded), and the thread splits."""

import pytest
import torch

from lowbit.kernels import w8a8 as k8

pytestmark = pytest.mark.skipif(k8._vnni_ext() is None, reason="needs the AVX-512 int8_act build on a CPU with avx512_vnni")

_AMX = k8._vnni_ext() is not None and k8._vnni_ext().amx_active()


@pytest.fixture(autouse=True, params=["amx", "avx512"] if _AMX else ["avx512"])
def tiles(request):
    """On a CPU with AMX every test runs twice: on the tiles (tdpbsud, the default there) and on vpdpbusd."""
    k8._vnni_ext().set_amx(request.param == "amx")
    yield request.param
    k8._vnni_ext().set_amx(True)

TILE_M, PANEL_N, BLOCK_K = 6, 64, 4096  # csrc/gemm_i8.h's kMR, kNR, kKC

SHAPES = [
    (1, 1, 1), (5, 3, 2), (6, 64, 64), (7, 65, 63), (8, 40, 96), (13, 127, 129), (17, 5, 3), (36, 192, 576),
    (61, 130, 577), (100, 64, 4100), (9, 200, 2 * BLOCK_K + 1), (257, 576, 576), (12, 129, BLOCK_K),
    (64, 96, 2 * BLOCK_K + 64), (70, 33, 200),  # AMX: whole 32-row blocks over two K blocks; a partial block
]


def _operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return a, b


def _exact(a, b):
    """a @ b.T in int64, wrapped to int32 as torch._int_mm's int32 sums wrap."""
    acc = a.long() @ b.long().t()
    return ((acc + 2**31) % 2**32 - 2**31).to(torch.int32)


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_exact(m, n, k):
    a, b = _operands(m, n, k, m * 7919 + n * 31 + k)
    out = k8._vnni_ext().gemm_i8(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, _exact(a, b))


def test_equals_int_mm():
    a, b = _operands(64, 96, 320, 3)
    assert torch.equal(k8._vnni_ext().gemm_i8(a, b), torch._int_mm(a, b.t()))


@pytest.mark.parametrize("fill_a, fill_b", [(-128, -128), (-128, 127), (127, -128), (127, 127), (0, -128), (-128, 0)])
def test_extremes(fill_a, fill_b):
    """Every product at the end of the int8 range over two panel blocks of K: the panel's + 128 offset and
    the accumulators' start at -128 * sum(a) at their largest."""
    a = torch.full((7, BLOCK_K + 60), fill_a, dtype=torch.int8)
    b = torch.full((66, BLOCK_K + 60), fill_b, dtype=torch.int8)
    assert torch.equal(k8._vnni_ext().gemm_i8(a, b), _exact(a, b))


def test_wraps_like_int_mm():
    """Past 2^31 the int32 sums wrap mod 2^32, as torch._int_mm's do (2^14 * 2^17 = 2^31 here)."""
    k = 2**17 + 8
    a = torch.full((8, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    out = k8._vnni_ext().gemm_i8(a, b)
    assert torch.equal(out, _exact(a, b)) and out[0, 0].item() < 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_bits_for_any_thread_count(threads):
    a, b = _operands(50, 9 * PANEL_N + 5, 200, 11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = k8._vnni_ext().gemm_i8(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, _exact(a, b))


def test_checks_its_arguments():
    gemm = k8._vnni_ext().gemm_i8
    a, b = _operands(9, 3, 16, 0)
    with pytest.raises(RuntimeError, match="gemm_i8: a must be int8"):
        gemm(a.float(), b)
    with pytest.raises(RuntimeError, match="gemm_i8: b must be int8"):
        gemm(a, b.int())
    with pytest.raises(RuntimeError, match="gemm_i8: a .* must have the same K"):
        gemm(a, b[:, :8].contiguous())
    with pytest.raises(RuntimeError, match="gemm_i8: b must be a contiguous"):
        gemm(a, b.t().contiguous().t())
    assert gemm(a[:0], b).shape == (0, 3)
    assert torch.equal(gemm(a[:, :0], b[:, :0]), torch.zeros(9, 3, dtype=torch.int32))


def test_noncontiguous_operands_still_exact_through_int8_mm():
    """_int8_mm_impl sends only contiguous operands to the C++ GEMMs; the others reach torch._int_mm."""
    a, b = _operands(40, 24, 64, 5)
    assert torch.equal(k8._int8_mm_impl(a[:, ::2], b[:, ::2]), _exact(a[:, ::2], b[:, ::2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m, n, k", [(5, 3, 7), (6, 64, 64), (37, 130, 577), (13, 200, BLOCK_K), (9, 70, BLOCK_K + 4),
                                  (40, 70, BLOCK_K + 1536)])
def test_w8a8_gemm_equals_gemm_then_epilogue(m, n, k, dtype):
    """w8a8_gemm (the epilogue per tile while in L1; for K over one block, the two calls) gives
    w8a8_epilogue(gemm_i8(...))'s bits: per-row and per-tensor s_x, bias, zero-point correction."""
    ext = k8._vnni_ext()
    a, b = _operands(m, n, k, m + n + k)
    g = torch.Generator().manual_seed(k)
    s_x, s_w = torch.rand(m, generator=g) / 1000, torch.rand(n, generator=g) / 1000
    bias = torch.randn(n, generator=g).to(dtype)
    zcorr = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g)
    like = torch.empty(0, dtype=dtype)
    for sx, bb, zc in ((s_x, None, None), (s_x, bias, None), (s_x[:1].contiguous(), bias, zcorr)):
        want = ext.w8a8_epilogue(ext.gemm_i8(a, b), sx, s_w, bb, zc, like)
        got = ext.w8a8_gemm(a, b, sx, s_w, bb, zc, like)
        assert got.dtype == dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_w8a8_gemm_checks_its_arguments():
    ext = k8._vnni_ext()
    a, b = _operands(9, 3, 16, 0)
    like = torch.empty(0)
    with pytest.raises(RuntimeError, match="w8a8_gemm: a must be int8"):
        ext.w8a8_gemm(a.float(), b, torch.ones(9), torch.ones(3), None, None, like)
    with pytest.raises(RuntimeError, match="s_w: float32, N values"):
        ext.w8a8_gemm(a, b, torch.ones(9), torch.ones(4), None, None, like)
    with pytest.raises(RuntimeError, match="bias: N values in x's dtype"):
        ext.w8a8_gemm(a, b, torch.ones(9), torch.ones(3), torch.ones(3, dtype=torch.float64), None, like)
