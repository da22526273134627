"""The host-dependent CPU paths (``lowbit.kernels.host``): exact int8 x int8 products by float32
GEMMs where the CPU has no int8 dot products, and float32 compute for bf16/fp16 activations at
large M where it has no native half matmul. Each is forced on and off through its environment
variable, so both sides run on any host."""

import types

import pytest
import torch
import torch.nn.functional as F

from lowbit.configs import Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerRow
from lowbit.kernels import _ext, host
from lowbit.kernels import w8a8 as int8_kernels
from lowbit.kernels._fp8_cpu import float8_weight_only_linear_cpu, tiled_max_m
from lowbit.kernels._int4_cpu import int4_linear_cpu, small_max_m
from lowbit.kernels.int4 import dequantize_int4
from lowbit.kernels.int8 import _ext_max_m as int8_gemv_max_m, int8_weight_only_linear
from lowbit.kernels.w8a8 import _int8_mm_float32, int8_activation_linear, int8_mm
from lowbit.primitives import choose_qparams_affine, pack_int4, quantize_affine
from lowbit.spec import QuantSpec, spec_key

# --- exact int8 x int8 by float32 GEMMs ---------------------------------------------------------

MM_SHAPES = [  # (M, K, N): K around the exact chunk (1024), odd N around the row chunk (512)
    (1, 1, 1), (3, 17, 5), (17, 1023, 7), (64, 1024, 513), (5, 1025, 64), (33, 3000, 1030), (2, 4096 + 5, 9),
]


@pytest.mark.parametrize("shape", MM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_mm_equals_int_mm(shape):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    assert torch.equal(_int8_mm_float32(a, b), torch._int_mm(a, b.t()) if m > 16 else (a.int() @ b.int().t()))


@pytest.mark.parametrize("va, vb", [(-128, -128), (127, 127), (-128, 127)])
def test_float32_mm_extremes_are_exact(va, vb):
    # every product at its largest magnitude: a chunk of 1024 sums to exactly +-2^24, the row to 2^26
    k = 4096 + 1024
    a = torch.full((3, k), va, dtype=torch.int8)
    b = torch.full((5, k), vb, dtype=torch.int8)
    assert torch.equal(_int8_mm_float32(a, b), torch.full((3, 5), va * vb * k, dtype=torch.int32))


def test_float32_mm_empty():
    assert _int8_mm_float32(torch.empty(0, 8, dtype=torch.int8), torch.ones(3, 8, dtype=torch.int8)).shape == (0, 3)
    out = _int8_mm_float32(torch.ones(2, 0, dtype=torch.int8), torch.ones(3, 0, dtype=torch.int8))
    assert torch.equal(out, torch.zeros(2, 3, dtype=torch.int32))


def _spy(monkeypatch):
    calls = []
    real = int8_kernels._int8_mm_float32

    def spy(a, b):
        calls.append(a.shape)
        return real(a, b)

    monkeypatch.setattr(int8_kernels, "_int8_mm_float32", spy)
    return calls


def test_int8_mm_dispatch_follows_the_host(monkeypatch):
    calls = _spy(monkeypatch)
    a = torch.randint(-128, 128, (int8_kernels._MM_I8_MAX_M + 8, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    monkeypatch.setenv(host.INT8_ENV, "float32")
    fast = int8_mm(a, b)
    assert len(calls) == 1
    monkeypatch.setenv(host.INT8_ENV, "native")
    assert torch.equal(int8_mm(a, b), fast) and len(calls) == 1


@pytest.mark.parametrize("has_mm_i8", [True, False], ids=["mm_i8", "no-mm_i8"])
def test_int8_mm_small_m_without_int8_dot(monkeypatch, has_mm_i8):
    # small M: the AVX2 build's mm_i8 where it exists; else _int_mm (converting the weight to float32
    # costs more than _int_mm below _FLOAT_MM_MIN_M), never the float32 path
    calls, small = _spy(monkeypatch), []
    fake = types.SimpleNamespace(mm_i8=lambda a, b: small.append(a.shape) or torch._int_mm(a, b.t()))
    monkeypatch.setattr(int8_kernels._ext, "load", lambda name: fake if has_mm_i8 else None)
    # the fake stands for the AVX2 build (the AVX-512 build's mm_i8 is VNNI code, never taken here)
    monkeypatch.setattr(int8_kernels._ext, "active_isa", lambda name: "avx2" if has_mm_i8 else None)
    monkeypatch.setenv(host.INT8_ENV, "float32")
    a = torch.randint(-128, 128, (min(int8_kernels._MM_I8_MAX_M, int8_kernels._FLOAT_MM_MIN_M - 1), 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    assert torch.equal(int8_mm(a, b), a.int() @ b.int().t())
    assert len(small) == int(has_mm_i8) and not calls


def test_int8_mm_keeps_int_mm_when_float32_matmul_may_round(monkeypatch):
    # with set_float32_matmul_precision("medium") oneDNN may multiply float32 in bf16: not exact
    calls = _spy(monkeypatch)
    monkeypatch.setenv(host.INT8_ENV, "float32")
    a = torch.randint(-128, 128, (int8_kernels._MM_I8_MAX_M + 8, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not host.float32_matmul_exact()
        assert torch.equal(int8_mm(a, b), torch._int_mm(a, b.t())) and not calls
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("act", ["dynamic", "static-zp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_linear_same_bits_either_way(monkeypatch, act, dtype):
    torch.manual_seed(0)
    m, k, n = 40, 1100, 70
    x = torch.randn(m, k).to(dtype)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n, 1) * 0.01 + 1e-4
    b = torch.randn(n).to(dtype)
    if act == "dynamic":
        config, a_s, a_zp = Int8DynamicActivationInt8WeightConfig(), None, None
    else:
        config = Int8StaticActivationInt8WeightConfig(act_scale=0.02, act_zero_point=-7)
        a_s, a_zp = torch.tensor([0.02]), torch.tensor([-7], dtype=torch.int32)
    args = (x, w, s, b, a_s, a_zp, config.act_spec(), config.weight_spec(), "auto")
    monkeypatch.setenv(host.INT8_ENV, "float32")
    fast = int8_activation_linear(*args)
    monkeypatch.setenv(host.INT8_ENV, "native")
    assert torch.equal(int8_activation_linear(*args), fast)


# --- float32 compute for half activations at large M --------------------------------------------

# above every small-M path: int4's, float8's tiles, the int8 GEMV's (its largest limit: float32 / float16 x)
M_LARGE = max(small_max_m(), tiled_max_m(), int8_gemv_max_m(torch.float32), int8_gemv_max_m(torch.bfloat16)) + 7


def _half_then_float(monkeypatch, fn, x, *args):
    """fn on bf16 x with float32 compute forced, and fn on x widened to float32 rounded to bf16."""
    monkeypatch.setenv(host.HALF_ENV, "float32")
    got = fn(x, *args)
    want = fn(x.float(), *args).to(x.dtype)
    return got, want


# measured over 5 seeds: 51.0-51.9 dB (one bf16 rounding of the weights or of x @ Q.T apart)
INT8_FLOAT32_VS_BF16_DB = 45.0
# grouped, float32 compute vs native bf16 on the same bf16 weights: 106.9 dB .. bit-equal (accumulation order)
INT8_GROUPED_FLOAT32_VS_NATIVE_DB = 90.0


@pytest.mark.parametrize("group", [None, 64], ids=["per-row", "g64"])
def test_int8_weight_only_large_m_computes_in_float32(monkeypatch, group):
    torch.manual_seed(0)
    n, k = 300, 256
    w = torch.randn(n, k)
    spec = QuantSpec("int8", PerRow() if group is None else PerGroup(group), symmetric=True)
    s, _ = choose_qparams_affine(w, spec)
    q = quantize_affine(w, s, None, spec)
    x = torch.randn(M_LARGE, k).bfloat16()
    got, want = _half_then_float(monkeypatch, lambda x_: int8_weight_only_linear(x_, q, s, None, None, spec_key(spec), "auto"), x)
    monkeypatch.setenv(host.HALF_ENV, "native")
    native = int8_weight_only_linear(x, q, s, None, None, spec_key(spec), "auto")
    assert native.dtype == torch.bfloat16
    if group is None:  # float32 in, per-row: the same float32 code path, then one rounding
        assert torch.equal(got, want)
        assert sqnr(got.float(), native.float()) >= INT8_FLOAT32_VS_BF16_DB  # bf16 rounds x @ Q.T before the scale
    else:  # grouped: both half paths multiply the reference's bf16-rounded weights (float32 x does not round them)
        assert sqnr(want.float(), got.float()) >= INT8_FLOAT32_VS_BF16_DB
        assert sqnr(native.float(), got.float()) >= INT8_GROUPED_FLOAT32_VS_NATIVE_DB


# int4's float32 path multiplies the reference's own (bf16-rounded) weight values: equal to the
# reference up to accumulation order, as the bf16 chunked path (tests/kernels/test_int4_cpu_ext.py)
INT4_FLOAT32_VS_REFERENCE_DB = 70.0


@pytest.mark.skipif(_ext.load("int4_cpu") is None, reason="C++ kernel int4_cpu not available here")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int4_large_m_computes_in_float32(monkeypatch, bias):
    torch.manual_seed(0)
    n, k, g = 200, 256, 64
    spec = QuantSpec("int4", PerGroup(g), symmetric=True)
    s, _ = choose_qparams_affine(torch.randn(n, k), spec)
    q = pack_int4(quantize_affine(torch.randn(n, k), s, None, spec))
    x = torch.randn(M_LARGE, k).bfloat16()
    b = torch.randn(n).bfloat16() if bias else None
    ref = F.linear(x, dequantize_int4(q, s, None, spec, torch.bfloat16), b)
    seen = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **kw: seen.append(a[-1].dtype) or _real(*a, **kw))
    monkeypatch.setenv(host.HALF_ENV, "float32")
    got = int4_linear_cpu(x, q, s, None, b)
    assert seen and set(seen) == {torch.float32} and got.dtype == torch.bfloat16
    assert sqnr(ref.float(), got.float()) >= INT4_FLOAT32_VS_REFERENCE_DB
    seen.clear()
    monkeypatch.setenv(host.HALF_ENV, "native")
    assert sqnr(ref.float(), int4_linear_cpu(x, q, s, None, b).float()) >= INT4_FLOAT32_VS_REFERENCE_DB
    assert not seen  # the C++ linear_chunked in bf16


@pytest.mark.skipif(_ext.load("fp8_cpu") is None, reason="C++ kernel fp8_cpu not available here")
def test_float8_large_m_computes_in_float32(monkeypatch):
    torch.manual_seed(0)
    n, k = 200, 256
    q = (torch.randn(n, k) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(n, 1) * 0.01 + 1e-3
    x = torch.randn(M_LARGE, k).bfloat16()
    got, want = _half_then_float(monkeypatch, float8_weight_only_linear_cpu, x, q, s)
    assert torch.equal(got, want)


def test_env_values_are_checked(monkeypatch):
    monkeypatch.setenv(host.HALF_ENV, "fp32")
    with pytest.raises(ValueError, match="LOWBIT_HALF_MATMUL='fp32'; allowed"):
        host.matmul_dtype(torch.bfloat16)
    monkeypatch.setenv(host.INT8_ENV, "yes")
    with pytest.raises(ValueError, match="LOWBIT_INT8_DOT='yes'; allowed"):
        host.has_int8_dot()


def test_matmul_dtype(monkeypatch):
    monkeypatch.setenv(host.HALF_ENV, "float32")
    assert host.matmul_dtype(torch.bfloat16) == torch.float32 and host.matmul_dtype(torch.float16) == torch.float32
    assert host.matmul_dtype(torch.float32) == torch.float32
    monkeypatch.setenv(host.HALF_ENV, "native")
    assert host.matmul_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setenv(host.HALF_ENV, "auto")
    native = any(f in host.cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    assert host.matmul_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert [r[0] for r in host.host_report()] == ["bfloat16 large-M matmul", "float16 large-M matmul", "int8 x int8 matmul",
                                                  "bf16 weight-only large-M matmul", "weight pages"]
