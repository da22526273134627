"""The int8 weight-only GEMV (csrc/int8_gemv.cpp, AVX-512, or csrc/int8_gemv_avx2.cpp, whichever build
loads here; LOWBIT_ISA=avx2 tests the other on an AVX-512 host) at M = 1..17 (and 33): against the reference by
SQNR, and row by row against the same row alone through the same kind of tile (each kind has one
summation order for every tile shape, M and thread count, so those are equal bit for bit). The AVX-512
build multiplies bf16 x at M >= 2 with vdpbf16ps (its bf16 tiles, on a CPU with AVX-512 BF16 and groups
of a multiple of 32; with one scale per row from M = 9 each block of weight rows converted once, the same sums);
everything else, and bf16 x at M = 1, with float32 FMA (its float tiles)."""

import pytest
import torch

from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.kernels import _ext
from lowbit.kernels.int8 import int8_weight_only_linear
from lowbit.spec import QuantSpec, spec_key
from lowbit.tensors.int8_tensor import Int8Tensor

# Fast vs reference, the bounds of tests/kernels/test_int8.py (a float32 sum in another order, one
# rounding to x's dtype); measured here min 51.0 dB (bf16), 68.8 (fp16), 125.3 (fp32).
FAST_VS_REF_DB = {torch.bfloat16: 44.0, torch.float16: 60.0, torch.float32: 110.0}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (N, K, group): N % 4 and N % 3 tails, groups of 16 to a whole row, K not a multiple of 32 or 64; groups
# of 32, 64 and 576 (whole rows) for the bf16 tiles
SHAPES = [(37, 48, 16), (29, 240, 48), (101, 1040, 1040), (7, 4112, 16), (22, 576, 576), (13, 96, 32), (45, 1024, 64)]
M_ALL = 17  # tiles of 4 rows of x: 17 = 4 x 4 + 1, and every M below it


def _ext_or_skip():
    ext = _ext.load("int8_gemv")
    if ext is None:
        pytest.skip(f"int8_gemv not available here ({_ext.status()['int8_gemv']})")
    return ext


def _weight(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = Int8Tensor.from_float(torch.randn(n, k, generator=g), QuantSpec("int8", PerGroup(group)))
    return t, g


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n, k, group", SHAPES, ids=str)
def test_matches_reference(n, k, group, m, dtype):
    ext = _ext_or_skip()
    t, g = _weight(n, k, group)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int8_weight_only_linear(x, t.qdata, t.scale, None, None, spec_key(t.spec), "reference")
    out = ext.int8_weight_only_mm(x, t.qdata, t.scale)
    assert out.dtype == dtype and out.shape == (m, n)
    assert sqnr(ref.float(), out.float()) >= FAST_VS_REF_DB[dtype]


def _rows_alone(ext, x, t, m):
    """Each row of x through the kernel alone: at M = m (the row repeated m times), the first copy's result."""
    return torch.cat([ext.int8_weight_only_mm(x[i : i + 1].repeat(m, 1), t.qdata, t.scale)[:1] for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("n, k, group", SHAPES, ids=str)
def test_each_row_equals_the_row_alone(n, k, group, dtype):
    """Every M gives each row the bits it gets alone through the same kind of tile: alone at M = 1 for
    M = 1, alone at M = 2 (the bf16 tiles for bf16 x where they apply) for M >= 2. Float32 and float16 x
    have one kind of tile for every M: there the two are the same bits too."""
    ext = _ext_or_skip()
    t, g = _weight(n, k, group)
    x = torch.randn(M_ALL, k, generator=g).to(dtype)
    rows1, rows2 = _rows_alone(ext, x, t, 1), _rows_alone(ext, x, t, 2)
    if dtype != torch.bfloat16:
        assert torch.equal(rows1, rows2)
    assert torch.equal(ext.int8_weight_only_mm(x[:1], t.qdata, t.scale), rows1[:1])
    for m in range(2, M_ALL + 1):
        assert torch.equal(ext.int8_weight_only_mm(x[:m], t.qdata, t.scale), rows2[:m]), f"M={m}"


@pytest.mark.parametrize("n, k", [(101, 1040), (22, 576), (7, 64), (64, 2048)], ids=str)
def test_the_scratch_tiles_equal_the_bf16_tiles(n, k):
    """bf16 x against one scale per row from M = 9 (get_scratch_min_m): each block of 4 weight rows is converted
    once into a scratch for every row of x, with the bf16 tiles' sums in their order: the same bits at every M
    (4-row tiles and their 1-3 row tails, blocks of 1-3 weight rows at N's end, 1 and 2 threads)."""
    ext = _ext_or_skip()
    if not hasattr(ext, "set_scratch_min_m"):
        pytest.skip(f"the {_ext.active_isa('int8_gemv')} build has no scratch tiles")
    t, g = _weight(n, k, k)
    keep, threads = ext.get_scratch_min_m(), torch.get_num_threads()
    try:
        for m in (2, 5, 9, 14, 33):
            x = torch.randn(m, k, generator=g).bfloat16()
            ext.set_scratch_min_m(10**9)
            tiles = ext.int8_weight_only_mm(x, t.qdata, t.scale)
            ext.set_scratch_min_m(2)
            for nt in (1, 2):
                torch.set_num_threads(nt)
                assert torch.equal(ext.int8_weight_only_mm(x, t.qdata, t.scale), tiles), f"M={m} threads={nt}"
            torch.set_num_threads(threads)
    finally:
        ext.set_scratch_min_m(keep)
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="scratch min M must be at least 2, got 1"):
        ext.set_scratch_min_m(1)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's last place as a bf16 value (both bf16)."""
    b32 = b.float()
    exp = torch.frexp(b32.abs().clamp_min(torch.finfo(torch.bfloat16).tiny))[1]
    return (a.float() - b32).abs() / torch.ldexp(torch.ones_like(b32), exp - 8)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n, k, group", [s for s in SHAPES if s[2] % 32 == 0], ids=str)
def test_bf16_x_matches_its_float32_values_to_one_rounding(n, k, group, m):
    """bf16 x against the same values as float32 x (the float tiles): both are float32 sums of the same
    exact products in two orders, so the bf16 result is the float32 result rounded, or its neighbour."""
    ext = _ext_or_skip()
    t, g = _weight(n, k, group)
    x = torch.randn(m, k, generator=g).bfloat16()
    out = ext.int8_weight_only_mm(x, t.qdata, t.scale)
    f32 = ext.int8_weight_only_mm(x.float(), t.qdata, t.scale).bfloat16()
    assert _bf16_ulps(out, f32).max().item() <= 1.0


def test_bf16_x_with_subnormal_rows():
    """vdpbf16ps reads bf16 subnormals as zero and flushes subnormal sums: rows of subnormal and tiny x
    are scaled by a power of two first (bf16_scale.h), so they come out as their float32 values do."""
    ext = _ext_or_skip()
    t, g = _weight(16, 64, 32)
    x = torch.stack([torch.full((64,), 3e-39), torch.randn(64, generator=g) * 1e-36, torch.randn(64, generator=g)]).bfloat16()
    assert (x[0] != 0).all() and x[0].float().abs().max() < torch.finfo(torch.float32).tiny  # subnormal
    out = ext.int8_weight_only_mm(x, t.qdata, t.scale)
    f32 = ext.int8_weight_only_mm(x.float(), t.qdata, t.scale).bfloat16()
    assert (out[:2] != 0).all()
    assert _bf16_ulps(out, f32).max().item() <= 1.0


@pytest.mark.parametrize("group", [64, 576], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("m", [1, 4, 9])
def test_thread_count_does_not_change_the_result(m, group):
    """Above the kernel's serial threshold (1024 x 576 int8 = 576 KiB) rows are split over threads;
    each row's sum is the same whoever computes it (whole rows: the scratch tiles at M = 9)."""
    ext = _ext_or_skip()
    t, g = _weight(1024, 576, group)
    x = torch.randn(m, 576, generator=g).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.int8_weight_only_mm(x, t.qdata, t.scale)
        torch.set_num_threads(max(2, threads))
        many = ext.int8_weight_only_mm(x, t.qdata, t.scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_strided_x_and_broadcast_scale_equal_contiguous_copies(dtype):
    """x with any strides and a scale expanded from (1, 1) (how int8.py passes a per-tensor scale) are read
    in place: same bits as contiguous copies."""
    ext = _ext_or_skip()
    t, g = _weight(45, 96, 96)
    xt = torch.randn(96, 6, generator=g).to(dtype).t()  # (6, 96), strides (1, 6)
    rows = torch.randn(6, 2 * 96, generator=g).to(dtype)[:, ::2]  # (6, 96), strides (192, 2)
    for x in (xt, rows):
        assert torch.equal(ext.int8_weight_only_mm(x, t.qdata, t.scale), ext.int8_weight_only_mm(x.contiguous(), t.qdata, t.scale))
    s = torch.rand(1, 1, generator=g).expand(45, 1)
    x = torch.randn(5, 96, generator=g).to(dtype)
    assert torch.equal(ext.int8_weight_only_mm(x, t.qdata, s), ext.int8_weight_only_mm(x, t.qdata, s.contiguous()))


@pytest.mark.parametrize("granularity", [PerRow(), PerGroup(32), PerTensor()], ids=repr)
def test_the_layer_route_at_small_m_matches_reference(granularity):
    """Whatever int8.py routes to at M = 2..32 (this kernel, _weight_int8pack_mm or the chunked path)
    stays within the bound."""
    g = torch.Generator().manual_seed(1)
    t = Int8Tensor.from_float(torch.randn(96, 256, generator=g), QuantSpec("int8", granularity))
    for m in (2, 4, 8, 16, 32):
        x = torch.randn(m, 256, generator=g).bfloat16()
        ref = int8_weight_only_linear(x, t.qdata, t.scale, None, None, spec_key(t.spec), "reference")
        out = int8_weight_only_linear(x, t.qdata, t.scale, None, None, spec_key(t.spec), "auto")
        assert sqnr(ref.float(), out.float()) >= FAST_VS_REF_DB[torch.bfloat16], f"M={m}"


def test_an_x_above_the_kept_buffer_size_gives_the_same_rows():
    """x over the thread-local buffer's size (16 x 8192 floats) is widened into a buffer of its own."""
    ext = _ext_or_skip()
    t, g = _weight(7, 4112, 16)
    x = torch.randn(40, 4112, generator=g).bfloat16()  # 164,480 floats
    assert torch.equal(ext.int8_weight_only_mm(x, t.qdata, t.scale), _rows_alone(ext, x, t, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("m, n", [(1, 7), (3, 37), (64, 1536), (5, 16)], ids=str)
def test_scale_columns_equals_mul(m, n, dtype):
    """scale_columns_ (the chunked path's per-row weight scale on its output) gives out.mul_(s)'s values,
    bit for bit (NaN as NaN), infinities, -0.0 and the dtype's largest value included."""
    ext = _ext_or_skip()
    g = torch.Generator().manual_seed(m * 1000 + n)
    out = (torch.randn(m, n, generator=g) * 100).to(dtype)
    s = torch.rand(n, 1, generator=g) * 3
    out[0, 0] = float("nan")
    if n > 4:
        out[0, 1], out[0, 2], out[0, 3] = float("inf"), -0.0, torch.finfo(dtype).max
    want = out.clone().mul_(s.reshape(1, -1))
    got = ext.scale_columns_(out, s.reshape(-1))
    assert got.data_ptr() == out.data_ptr()  # in place
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.where(want.isnan(), 0, want).view(bits), torch.where(got.isnan(), 0, got).view(bits))


def test_scale_columns_checks_its_arguments():
    ext = _ext_or_skip()
    with pytest.raises(RuntimeError, match="s must be float32 with N = 4"):
        ext.scale_columns_(torch.zeros(2, 4), torch.ones(3))
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        ext.scale_columns_(torch.zeros(4, 2).t(), torch.ones(4))
    with pytest.raises(RuntimeError, match="out must be float32, bfloat16 or float16"):
        ext.scale_columns_(torch.zeros(2, 4, dtype=torch.int32), torch.ones(4))
