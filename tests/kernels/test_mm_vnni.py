"""The AVX-512 int8_act build's ``mm_i8`` (vpdpbusd; csrc/int8_act.cpp): exact int8 x int8 -> int32 for
small M on CPUs with AVX-512 VNNI, and the routing that calls it (or gemm_i8, tests/kernels/test_gemm_i8.py)
only there."""

import pytest
import torch

from lowbit.kernels import _ext, host
from lowbit.kernels import w8a8 as k8

pytestmark = pytest.mark.skipif(k8._vnni_ext() is None, reason="needs the AVX-512 int8_act build on a CPU with avx512_vnni")

SHAPES = [(1, 1, 1), (1, 5, 3), (2, 4, 63), (3, 7, 64), (4, 4, 65), (5, 9, 127), (8, 3, 128), (13, 17, 200),
          (16, 6, 1000), (17, 2, 4096)]


def _operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return a, b


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_exact(m, n, k):
    a, b = _operands(m, n, k, m * 1000 + k)
    assert torch.equal(k8._vnni_ext().mm_i8(a, b), a.int() @ b.int().t())


@pytest.mark.parametrize("fill_a, fill_b", [(-128, -128), (-128, 127), (127, -128), (127, 127), (0, -128)])
def test_extremes(fill_a, fill_b):
    """Every product at the end of the int8 range, K = 4096: the largest sums the int32 holds here."""
    a = torch.full((3, 4096), fill_a, dtype=torch.int8)
    b = torch.full((5, 4096), fill_b, dtype=torch.int8)
    assert torch.equal(k8._vnni_ext().mm_i8(a, b), a.int() @ b.int().t())


def test_checks_its_arguments():
    mm = k8._vnni_ext().mm_i8
    a, b = _operands(2, 3, 16, 0)
    with pytest.raises(RuntimeError, match="mm_i8: a must be int8"):
        mm(a.float(), b)
    with pytest.raises(RuntimeError, match="must have the same K"):
        mm(a, b[:, :8].contiguous())
    with pytest.raises(RuntimeError, match="mm_i8: a must be a contiguous"):
        mm(a.t().contiguous().t(), b)
    assert mm(a[:0], b).shape == (0, 3)


@pytest.mark.parametrize("m", [1, 4, 5, 7, 8, 16, 17, 64])
def test_int8_mm_routes_small_m_to_mm_i8_and_the_rest_to_gemm_i8(m, monkeypatch):
    calls = []
    ext = k8._vnni_ext()
    real_mm, real_gemm = ext.mm_i8, ext.gemm_i8
    monkeypatch.setattr(ext, "mm_i8", lambda a, b: calls.append(("mm_i8", a.shape[0])) or real_mm(a, b))
    monkeypatch.setattr(ext, "gemm_i8", lambda a, b: calls.append(("gemm_i8", a.shape[0])) or real_gemm(a, b))
    a, b = _operands(m, 40, 96, m)
    assert torch.equal(k8._int8_mm_impl(a, b), a.int() @ b.int().t())
    assert calls == [("mm_i8" if m <= k8._VNNI_MM_MAX_M else "gemm_i8", m)]


def test_never_called_without_vnni(monkeypatch):
    """A CPU with the AVX-512 build but no avx512_vnni (or LOWBIT_INT8_DOT=float32 here) must not reach the
    VNNI code: _vnni_ext gives None, and the no-dot-product branch takes neither VNNI entry."""
    flags = host.cpu_flags() - {"avx512_vnni"}
    monkeypatch.setattr(host, "cpu_flags", lambda: flags)
    assert k8._vnni_ext() is None
    monkeypatch.undo()
    monkeypatch.setenv(host.INT8_ENV, "float32")
    assert not host.has_int8_dot() and _ext.active_isa("int8_act") == "avx512"
    a, b = _operands(5, 24, 64, 1)
    ext = _ext.load("int8_act")
    for name in ("mm_i8", "gemm_i8"):
        monkeypatch.setattr(ext, name, lambda *args, name=name: pytest.fail(f"the VNNI {name} ran on the no-dot-product branch"),
                            raising=True)
    assert torch.equal(k8._int8_mm_impl(a, b), a.int() @ b.int().t())
    a, b = _operands(40, 24, 64, 2)
    assert torch.equal(k8._int8_mm_impl(a, b), a.int() @ b.int().t())
