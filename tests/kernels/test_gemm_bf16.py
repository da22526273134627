"""The AVX-512 int8_gemv build's ``int8_weight_only_gemm`` (csrc/gemm_bf16.h: a bf16 GEMM whose int8 weight
is made bf16 one L2 panel at a time inside the GEMM), int8 weight-only's path for bf16 x above the GEMV's M
on CPUs with AVX-512 BF16. Its products are the reference's (the weight's dequantized bf16 values, float32
sums), so it is held to torch's own bf16 F.linear on those values and to float64, over the shapes where the
blocking has edges: M not a multiple of the 6-row tile, N not a multiple of the 64-column panel, K not a
multiple of the 32-column packing step, K over the 4096-column panel block (float32 running tiles), groups
of 16 (two scales per packing step) to per-row; and one summation order whatever the thread count."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.metrics import sqnr
from lowbit.kernels import int8 as k8

pytestmark = pytest.mark.skipif(k8._gemm_bf16() is None, reason="needs the AVX-512 int8_gemv build on a CPU with avx512_bf16")


def _gemm_builds():
    from lowbit.kernels import _ext

    return [e for e in (_ext.load(n) for n in ("int8_gemv", "int4_cpu", "fp8_cpu")) if hasattr(e, "set_amx")]


_AMX = bool(_gemm_builds()) and any(e.amx_active() for e in _gemm_builds())


@pytest.fixture(autouse=True, params=["amx", "avx512"] if _AMX else ["avx512"])
def tiles(request):
    """On a CPU with AMX every test runs twice: on the tiles (the default there) and on AVX-512 alone."""
    builds = _gemm_builds()
    for e in builds:
        e.set_amx(request.param == "amx")
    yield request.param
    for e in builds:
        e.set_amx(True)


def test_amx_runs_where_the_cpu_has_it(tiles):
    from lowbit.kernels import host

    flags = host.cpu_flags()
    if not {"amx_tile", "amx_bf16", "amx_int8"} <= flags:
        pytest.skip("this CPU has no AMX")
    assert host.amx_active() is (tiles == "amx")
    assert any("on AMX tiles" in value for _, value in host.host_report()) is (tiles == "amx")
    from lowbit.kernels import _int4_cpu

    # int4's gemm_small_bf16 / gemm_bf16 threshold follows the tiles, not the CPU's flags
    assert _int4_cpu.small_max_m() == (_int4_cpu.SMALL_MAX_M_AMX if tiles == "amx" else _int4_cpu.SMALL_MAX_M_LARGE_K)
    assert _int4_cpu.gemv_max_m() == (_int4_cpu.GEMV_MAX_M_AMX if tiles == "amx" else _int4_cpu.GEMV_MAX_M)

TILE_M, PANEL_N, BLOCK_K = 6, 64, 4096  # csrc/gemm_bf16.h's kMR, kNR, kKC
# against F.linear(x, the dequantized bf16 weight, bias): the same products, another float32 summation
# order, one bf16 rounding each; measured 86 .. 102 dB, and inf (equal) on small shapes
VS_F_LINEAR_DB = 70.0
# against float64 on the same bf16 values: the output's bf16 rounding alone (~55.5 dB, as F.linear's own)
VS_FLOAT64_DB = 50.0

SHAPES = [  # (M, N, K, groups)
    (9, 64, 64, 1), (7, 65, 96, 6), (13, 127, 160, 5), (17, 5, 32, 2), (36, 192, 576, 36), (61, 130, 592, 1),
    (12, 129, BLOCK_K, 1), (9, 70, BLOCK_K + 16, 1), (25, 66, 2 * BLOCK_K + 64, 4), (257, 576, 576, 18), (6, 1, 16, 1),
]


def _operands(m, n, k, groups, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    wd = (w.float().reshape(n, groups, -1) * s[:, :, None]).reshape(n, k).bfloat16()  # dequantize_affine's values
    return x, w, s, b, wd


@pytest.mark.parametrize("m, n, k, groups", SHAPES)
def test_against_f_linear_and_float64(m, n, k, groups):
    x, w, s, b, wd = _operands(m, n, k, groups, m * 7919 + n * 31 + k)
    out = k8._gemm_bf16()(x, w, s, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert sqnr(F.linear(x, wd, b).float(), out.float()) >= VS_F_LINEAR_DB
    exact = x.double() @ wd.double().t() + b.double()
    assert sqnr(exact, out.double()) >= VS_FLOAT64_DB


def test_no_bias_broadcast_scale_and_strided_x():
    m, n, k = 20, 100, 640
    x, w, s, _, wd = _operands(m, n, k, 1, 5, bias=False)
    wide = torch.randn(m, 2 * k).bfloat16()
    wide[:, :k] = x
    xv = wide[:, :k]  # row stride 2k, unit column stride
    s_b = s[:1].expand(n, 1)  # stride 0 along N, as int8_weight_only_linear passes a per-tensor scale
    out = k8._gemm_bf16()(xv, w, s_b)
    wd_b = (w.float() * s_b).bfloat16()
    assert sqnr(F.linear(x, wd_b).float(), out.float()) >= VS_F_LINEAR_DB


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_summation_order_whatever_the_threads(threads):
    x, w, s, b, _ = _operands(50, 300, BLOCK_K + 64, 2, 11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = k8._gemm_bf16()(x, w, s, b)
        torch.set_num_threads(threads)
        assert torch.equal(k8._gemm_bf16()(x, w, s, b), one)
    finally:
        torch.set_num_threads(before)


def test_a_row_alone_gives_the_same_bits():
    """Each output element is one float32 sum in k order whatever its row's tile: row i of a batch equals
    row i computed in a batch of its own."""
    x, w, s, b, _ = _operands(23, 70, 1024, 4, 13)
    full = k8._gemm_bf16()(x, w, s, b)
    for i in (0, 5, 6, 22):
        assert torch.equal(k8._gemm_bf16()(x[i : i + 1], w, s, b), full[i : i + 1]), i


def test_empty_and_zero_k():
    x, w, s, b, _ = _operands(9, 16, 32, 1, 17)
    assert k8._gemm_bf16()(x[:0], w, s, b).shape == (0, 16)
    out = k8._gemm_bf16()(x[:, :0], w[:, :0], s, b)
    assert torch.equal(out, b.expand(9, 16))


def test_argument_errors_name_the_argument():
    fn = k8._gemm_bf16()
    x, w, s, b, _ = _operands(9, 16, 64, 2, 19)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        fn(x.float(), w, s, b)
    with pytest.raises(RuntimeError, match="x must be bfloat16 with unit column stride"):
        fn(x.t().contiguous().t(), w, s, b)
    with pytest.raises(RuntimeError, match="w must be contiguous int8"):
        fn(x, w.t().contiguous().t(), s, b)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        fn(x, w, s.double(), b)
    with pytest.raises(RuntimeError, match="group size must divide K and be a multiple of 16"):
        fn(x, w, torch.ones(16, 8), b)
    with pytest.raises(RuntimeError, match="bias must be a floating CPU tensor"):
        fn(x, w, s, b[:3])
    with pytest.raises(RuntimeError, match=r"x \(M, K\) and w \(N, K\) expected"):
        fn(x[:, :32], w, s, b)


@pytest.mark.parametrize("above", [1, 2, 48, 241], ids=lambda a: f"gemv_max+{a}")
def test_int8_weight_only_routes_here_above_the_gemv(above, monkeypatch):
    """int8_weight_only_linear's bf16 x above the GEMV's M runs this GEMM, and equals its reference path."""
    from lowbit.configs import Int8WeightOnlyConfig
    from lowbit.spec import spec_key

    calls = []
    fn = k8._gemm_bf16()
    monkeypatch.setattr(k8, "_gemm_bf16", lambda: lambda *a: calls.append(1) or fn(*a))
    spec = Int8WeightOnlyConfig().weight_spec()
    m = k8._ext_max_m(torch.bfloat16, 96, 1) + above  # the GEMV's limit for bf16 x, K = 96 (16 on AVX-512 without AMX)
    x, w, s, b, _ = _operands(m, 96, 320, 1, m)
    out = k8.int8_weight_only_linear(x, w, s, None, b, spec_key(spec), "auto")
    ref = k8.int8_weight_only_linear(x, w, s, None, b, spec_key(spec), "reference")
    assert calls == [1]
    assert sqnr(ref.float(), out.float()) >= VS_F_LINEAR_DB


# bf16 rows of x that are subnormal or tiny: vdpbf16ps reads subnormal inputs as zero and flushes subnormal
# products and sums, so such rows are scaled by 2^j first and their results by 2^-j (csrc/gemm_bf16.h);
# ordinary rows beside them are used as they are. Rows: a bf16 subnormal, a subnormal / smallest-normal mix,
# tiny normals, small normals, and an ordinary row; each row's values times 1, 2, 3 along K.
SUBNORMAL_ROWS = (2.0**-128, 0.75 * 2.0**-126, 2.0**-120, 2.0**-100, 1.0)
# per row against float64 on the same bf16 values; measured >= 52 dB
SUBNORMAL_DB = 45.0


@pytest.mark.parametrize("k", [96, BLOCK_K + 32])
def test_subnormal_rows_are_not_flushed(k):
    m = 2 * TILE_M + 1
    rows = torch.tensor([SUBNORMAL_ROWS[i % len(SUBNORMAL_ROWS)] for i in range(m)], dtype=torch.float64)
    x = (rows.reshape(-1, 1) * (1 + torch.arange(k) % 3)).to(torch.bfloat16)
    _, w, s, _, wd = _operands(m, 40, k, 2, 23, bias=False)
    out = k8._gemm_bf16()(x, w, s)
    exact = x.double() @ wd.double().t()
    nonzero = exact.to(torch.bfloat16) != 0  # a flushed row would be all zeros
    assert bool(nonzero.any(1).all())
    for i in range(m):
        assert bool((out[i][nonzero[i]] != 0).all()), i
        assert sqnr(exact[i], out[i].double()) >= SUBNORMAL_DB, i


def _int4_weight(kind, n, k, g):
    from lowbit.granularity import PerGroup
    from lowbit.primitives import choose_qparams_affine, pack_int4, quantize_affine
    from lowbit.spec import QuantSpec

    spec = (QuantSpec("int4", PerGroup(g), symmetric=True) if kind == "sym" else
            QuantSpec("uint4", PerGroup(g), symmetric=False, zero_point_domain="float") if kind == "float-zp" else
            QuantSpec("uint4", PerGroup(g), symmetric=False, zero_point_dtype=torch.int8))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) + 0.3
    s, zp = choose_qparams_affine(w, spec)
    q = quantize_affine(w, s, zp, spec)
    return pack_int4(q), s, zp, spec, q


@pytest.mark.parametrize("k", [320, BLOCK_K + 64])
@pytest.mark.parametrize("scheme", ["int8 g16", "int8 per row", "int4 sym", "int4 asym", "int4 float-zp", "float8 e4m3fn",
                                    "float8 e5m2"])
def test_the_panels_hold_the_reference_weight_bit_for_bit(scheme, k):
    """x = the identity: each output is one product 1 * w (exact) plus zeros, so the GEMM returns the bf16
    weight its panels held, W.T, which must be the reference's dequantized weight bit for bit (float8: its
    bf16 value times the scale, rounded once, as the reference dequantizes)."""
    from lowbit.kernels import _ext
    from lowbit.primitives import dequantize_affine, dequantize_float8, quantize_float8, choose_qparams_float8
    from lowbit.granularity import PerRow
    from lowbit.spec import QuantSpec

    n = 70
    eye = torch.eye(k, dtype=torch.bfloat16)
    if scheme.startswith("int8"):
        groups = k // 16 if scheme == "int8 g16" else 1
        _, w, s, _, wd = _operands(1, n, k, groups, 29, bias=False)
        got = k8._gemm_bf16()(eye, w, s)
    elif scheme.startswith("int4"):
        ext = _ext.load("int4_cpu")
        if ext is None or not hasattr(ext, "gemm_bf16"):
            pytest.skip("the int4_cpu build has no gemm_bf16")
        qdata, s, zp, spec, q = _int4_weight(scheme.split()[1], n, k, 64)
        wd = dequantize_affine(q, s, zp, spec, output_dtype=torch.bfloat16)
        got = ext.gemm_bf16(eye, qdata, s, zp, None)
    else:
        from lowbit.kernels._fp8_cpu import float8_weight_only_linear_cpu

        spec = QuantSpec("float8_" + scheme.split()[1], PerRow())
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(31)) * 3
        s = choose_qparams_float8(w, spec)
        q = quantize_float8(w, s, spec)
        wd = dequantize_float8(q, s, spec, output_dtype=torch.bfloat16)
        got = float8_weight_only_linear_cpu(eye, q, s, None)
    assert torch.equal(got, wd.t())
