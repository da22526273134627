"""Every C++ entry point checks its own arguments: whatever Python passes (dtypes, ranks, shapes,
strides, group sizes, zero-point dtypes), a call either computes the right thing or raises a
clear error before touching memory. Nothing reads out of bounds, nothing returns garbage."""

import pytest
import torch

from lowbit.kernels import _ext


def _ext_or_skip(name):
    ext = _ext.load(name)
    if ext is None:
        pytest.skip(f"C++ kernel {name} not available here ({_ext.status()[name]})")
    return ext


# --- int4_cpu ------------------------------------------------------------------------------------

N, K = 64, 256


def _w4(k=K, groups=8, n=N):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    return q, torch.rand(n, groups, generator=g) + 0.1, torch.randint(0, 16, (n, groups), dtype=torch.int8, generator=g)


def _int4_calls(ext, x, q, s, zp, b=None):
    """Each entry point with the same weight (x in the dtype each one takes)."""
    out = torch.empty(q.shape[0], 2 * q.shape[1], dtype=torch.float32)
    return {
        "gemv_bf16": lambda: ext.gemv_bf16(x[:1].bfloat16(), q, s, zp, b),
        "gemv_f32": lambda: ext.gemv_f32(x[:1].float(), q, s, zp, b),
        "gemm_small_bf16": lambda: ext.gemm_small_bf16(x.bfloat16(), q, s, zp, b),
        "linear_chunked": lambda: ext.linear_chunked(x.float(), q, s, zp, None if b is None else b.float(), 16),
        "dequant_rows": lambda: ext.dequant_rows(q, s, zp, 0, q.shape[0], out),
        "gemm_bf16": lambda: _entry(ext, "gemm_bf16")(x.bfloat16(), q, s, zp, b),
    }


def _entry(ext, name):
    """An entry point only some builds have (gemm_bf16: the AVX-512 one), or skip."""
    fn = getattr(ext, name, None)
    if fn is None:
        pytest.skip(f"the active build has no {name}")
    return fn


@pytest.mark.parametrize("groups, k, why", [
    (16, K, r"power of two >= 32, got 16"),
    (32, K, r"power of two >= 32, got 8"),
    (4, 192, r"power of two >= 32, got 48"),
    (3, K, r"scale groups \(3\) must divide K \(256\)"),
    (0, K, r"scale groups \(0\) must divide K"),
])
@pytest.mark.parametrize("entry", ["gemv_bf16", "gemv_f32", "gemm_small_bf16", "linear_chunked", "dequant_rows", "gemm_bf16"])
def test_int4_group_sizes_the_kernels_cannot_take(groups, k, why, entry):
    ext = _ext_or_skip("int4_cpu")
    q, s, zp = _w4(k, groups)
    with pytest.raises(RuntimeError, match=why):
        _int4_calls(ext, torch.randn(2, k), q, s, zp)[entry]()


@pytest.mark.parametrize("entry", ["gemv_bf16", "gemv_f32", "gemm_small_bf16", "linear_chunked", "dequant_rows", "gemm_bf16"])
def test_int4_bad_weight_arguments(entry):
    ext = _ext_or_skip("int4_cpu")
    q, s, zp = _w4()
    x = torch.randn(2, K)
    bad = {
        r"qdata must be contiguous uint8": [(q.view(torch.int8), s, zp), (torch.empty(K // 2, N, dtype=torch.uint8).t(), s, zp),
                                           (q[None], s, zp)],
        r"scale must be contiguous float32 \(N, G\)": [(q, s.double(), zp), (q, s[:32], zp), (q, s.t().contiguous().t(), zp),
                                                       (q, s[:, :, None], zp)],
        r"zero_point must be contiguous int8 or float32 shaped like scale": [
            (q, s, zp.int()), (q, s, zp[:, :4]), (q, s, zp.double()), (q, s, zp.float()[:, :4]),
            (q, s, zp.float().t().contiguous().t())],
    }
    for why, cases in bad.items():
        for qq, ss, zz in cases:
            with pytest.raises(RuntimeError, match=why):
                _int4_calls(ext, x, qq, ss, zz)[entry]()


def test_int4_bad_activation_and_bias_arguments():
    ext = _ext_or_skip("int4_cpu")
    q, s, zp = _w4()
    xb = torch.randn(2, K).bfloat16()
    gemm = getattr(ext, "gemm_bf16", None)
    bf16_gemm_cases = [] if gemm is None else [
        (lambda: gemm(xb.float(), q, s, zp, None), r"x must be bf16 \(M, K\) with K = 256 and unit column stride"),
        (lambda: gemm(torch.randn(K, 2).bfloat16().t(), q, s, zp, None), "unit column stride"),
        (lambda: gemm(xb, q, s, zp, torch.randn(N + 1)), r"bias must be floating \(N,\) with N = 64"),
    ]
    for call, why in bf16_gemm_cases + [
        (lambda: ext.gemv_bf16(xb.float(), q, s, zp, None), r"x must be bf16 \(M, K\)"),
        (lambda: ext.gemv_bf16(xb[:, :128], q, s, zp, None), r"x must be bf16 \(M, K\) with K = 256"),
        (lambda: ext.gemv_bf16(torch.randn(K, 2).bfloat16().t(), q, s, zp, None), "unit column stride"),
        (lambda: ext.gemv_bf16(xb[:0], q, s, zp, None), r"1 <= M <= 16, got M = 0"),
        (lambda: ext.gemv_bf16(torch.randn(17, K).bfloat16(), q, s, zp, None), r"1 <= M <= 16, got M = 17"),
        (lambda: ext.gemv_bf16(xb, q, s, zp, torch.randn(N - 1)), r"bias must be floating \(N,\) with N = 64"),
        (lambda: ext.gemv_bf16(xb, q, s, zp, torch.ones(N, dtype=torch.int32)), r"bias must be floating"),
        (lambda: ext.gemm_small_bf16(xb[:0], q, s, zp, None), r"1 <= M <= 64, got M = 0"),
        (lambda: ext.gemm_small_bf16(torch.randn(65, K).bfloat16(), q, s, zp, None), r"1 <= M <= 64, got M = 65"),
        (lambda: ext.gemm_small_bf16(xb, q, s, zp, torch.randn(2, N)), r"bias must be floating \(N,\)"),
        (lambda: ext.gemv_f32(torch.randn(2, K), q, s, zp, None), r"x must be \(1, K\)"),
        (lambda: ext.gemv_f32(xb[:1], q, s, zp, None), "x must be float32 or float16"),
        (lambda: ext.linear_chunked(torch.randn(2, K).double(), q, s, zp, None, 16), "x must be bfloat16, float32 or float16"),
        (lambda: ext.linear_chunked(torch.randint(0, 3, (2, K)), q, s, zp, None, 16), "x must be bfloat16, float32 or float16"),
        (lambda: ext.linear_chunked(torch.randn(2, K), q, s, zp, torch.randn(N).bfloat16(), 16), r"bias must be \(N,\) with N = 64 in x's dtype"),
        (lambda: ext.linear_chunked(torch.randn(2, K), q, s, zp, torch.randn(N - 3), 16), r"bias must be \(N,\)"),
        (lambda: ext.dequant_rows(q, s, zp, 0, N + 1, torch.empty(N + 1, K)), r"bad row range \[0, 65\) for N = 64"),
        (lambda: ext.dequant_rows(q, s, zp, 5, 4, torch.empty(N, K)), "bad row range"),
        (lambda: ext.dequant_rows(q, s, zp, 0, N, torch.empty(N - 1, K)), "out must be contiguous"),
        (lambda: ext.dequant_rows(q, s, zp, 0, N, torch.empty(K, N).t()), "out must be contiguous"),
        (lambda: ext.dequant_rows(q, s, zp, 0, N, torch.empty(N, K, dtype=torch.float64)), "dequant output must be"),
    ]:
        with pytest.raises(RuntimeError, match=why):
            call()


def test_int4_empty_and_chunk_edge_cases_compute():
    ext = _ext_or_skip("int4_cpu")
    q, s, zp = _w4()
    assert ext.linear_chunked(torch.randn(0, K), q, s, zp, None, 16).shape == (0, N)
    for chunk in (0, -3, 1, N + 5):  # clamped to [1, N]
        assert ext.linear_chunked(torch.randn(3, K), q, s, zp, None, chunk).shape == (3, N)
    q0, s0, zp0 = q[:0], s[:0], zp[:0]
    assert ext.linear_chunked(torch.randn(3, K), q0, s0, zp0, None, 16).shape == (3, 0)
    assert ext.gemv_bf16(torch.randn(1, K).bfloat16(), q0, s0, zp0, None).shape == (1, 0)


# --- int8_gemv -----------------------------------------------------------------------------------


def test_int8_gemv_checks():
    ext = _ext_or_skip("int8_gemv")
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s = torch.rand(N, 4)
    x = torch.randn(1, K)
    for call, why in [
        (lambda: ext.int8_weight_only_mm(x[:, :128], w, s), r"x \(M, K\) and w \(N, K\) expected"),
        (lambda: ext.int8_weight_only_mm(x[0], w, s), r"x \(M, K\) and w \(N, K\) expected"),
        (lambda: ext.int8_weight_only_mm(x.double(), w, s), "x must be float32, bfloat16 or float16"),
        (lambda: ext.int8_weight_only_mm(x.to(torch.int32), w, s), "x must be float32, bfloat16 or float16"),
        (lambda: ext.int8_weight_only_mm(x, w.to(torch.uint8), s), "w must be contiguous int8"),
        (lambda: ext.int8_weight_only_mm(x, torch.empty(K, N, dtype=torch.int8).t(), s), "w must be contiguous int8"),
        (lambda: ext.int8_weight_only_mm(x, w, s.double()), r"scale must be float32 \(N, groups\)"),
        (lambda: ext.int8_weight_only_mm(x, w, s[:5]), r"scale must be float32 \(N, groups\)"),
        (lambda: ext.int8_weight_only_mm(x, w, torch.rand(N, 32)), "multiple of 16"),  # group size 8
        (lambda: ext.int8_weight_only_mm(x, w, torch.rand(N, 3)), "group size must divide K"),
        (lambda: ext.int8_weight_only_mm(x, w, torch.rand(N, 0)), "group size must divide K"),
    ]:
        with pytest.raises(RuntimeError, match=why):
            call()
    assert ext.int8_weight_only_mm(torch.randn(0, K), w, s).shape == (0, N)


# --- int8_act ------------------------------------------------------------------------------------


def test_int8_act_checks():
    ext = _ext_or_skip("int8_act")
    x = torch.randn(3, 40)
    for call, why in [
        (lambda: ext.quantize_i8(x.t(), 0.1, 0, 1e-6), "x must be a contiguous"),
        (lambda: ext.quantize_i8(x[0], 0.1, 0, 1e-6), "x must be a contiguous"),
        (lambda: ext.quantize_i8(x.double(), 0.1, 0, 1e-6), "x must be float32, bfloat16 or float16"),
        (lambda: ext.quantize_i8(x, 0.1, 200, 1e-6), r"zero_point must be in \[-128, 127\], got 200"),
    ]:
        with pytest.raises(RuntimeError, match=why):
            call()
    acc = torch.randint(-1000, 1000, (3, 8), dtype=torch.int32)
    sx, sw = torch.rand(3, 1), torch.rand(8)
    for call, why in [
        (lambda: ext.w8a8_epilogue(acc.long(), sx, sw, None, None, x), "acc must be contiguous int32"),
        (lambda: ext.w8a8_epilogue(acc.t().contiguous().t(), sx, sw, None, None, x), "acc must be contiguous int32"),
        (lambda: ext.w8a8_epilogue(acc, torch.rand(2), sw, None, None, x), "s_x: float32, 1 or M values"),
        (lambda: ext.w8a8_epilogue(acc, sx.double(), sw, None, None, x), "s_x: float32"),
        (lambda: ext.w8a8_epilogue(acc, sx, torch.rand(7), None, None, x), "s_w: float32, N values"),
        (lambda: ext.w8a8_epilogue(acc, sx, sw, None, torch.zeros(7, dtype=torch.int32), x), "zcorr: int32, N values"),
        (lambda: ext.w8a8_epilogue(acc, sx, sw, None, torch.zeros(8), x), "zcorr: int32"),
        (lambda: ext.w8a8_epilogue(acc, sx, sw, torch.zeros(8).bfloat16(), None, x), "bias: N values in x's dtype"),
        (lambda: ext.w8a8_epilogue(acc, sx, sw, torch.zeros(9), None, x), "bias: N values"),
        (lambda: ext.w8a8_epilogue(acc, sx, sw, None, None, x.double()), "output must be float32, bfloat16 or float16"),
    ]:
        with pytest.raises(RuntimeError, match=why):
            call()


# --- fp8_cpu -------------------------------------------------------------------------------------


def test_fp8_checks():
    ext = _ext_or_skip("fp8_cpu")
    q = torch.randn(N, K).to(torch.float8_e4m3fn)
    s = torch.rand(N, 1)
    x = torch.randn(2, K).bfloat16()
    for call, why in [
        (lambda: ext.fp8_linear(x[:, :100], q, s, None, 4, 32, 256), r"x \(M, K\) and qdata \(N, K\) expected"),
        (lambda: ext.fp8_linear(x, q.view(torch.uint8), s, None, 4, 32, 256), "qdata must be float8_e4m3fn or float8_e5m2"),
        (lambda: ext.fp8_linear(x, torch.randn(K, N).to(torch.float8_e4m3fn).t(), s, None, 4, 32, 256), "qdata must be contiguous"),
        (lambda: ext.fp8_linear(x.double(), q, s, None, 4, 32, 256), "x must be bf16, fp16 or fp32"),
        (lambda: ext.fp8_linear(x, q, s.double(), None, 4, 32, 256), "scale must be float32"),
        (lambda: ext.fp8_linear(x, q, torch.rand(N, 2), None, 4, 32, 256), "scale must have N or 1 elements"),
        (lambda: ext.fp8_linear(x, q, s, torch.zeros(N - 1), 4, 32, 256), r"bias must have N = 64 floating elements"),
        (lambda: ext.fp8_linear(x, q, s, torch.zeros(N, dtype=torch.int32), 4, 32, 256), "bias must have N = 64 floating"),
        (lambda: ext.fp8_linear(x, q, s, None, 5, 32, 256), "gemv_max_m must be <= 4"),
        (lambda: ext.fp8_to_bf16(q.t()), "qdata must be 2-D contiguous"),
        (lambda: ext.fp8_to_bf16(q.view(torch.uint8)), "qdata must be float8"),
    ]:
        with pytest.raises(RuntimeError, match=why):
            call()
    for chunk in (0, -1):
        assert ext.fp8_linear(torch.randn(40, K).bfloat16(), q, s, None, 4, 32, chunk).shape == (40, N)
