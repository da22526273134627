"""The C++ float8 weight-only CPU kernel (csrc/fp8_cpu.cpp) against the reference
(dequantize_float8 in x's dtype, then F.linear). SQNR bounds in dB, measured minima beside."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerRow, PerTensor
from lowbit.kernels import _ext
from lowbit.kernels._fp8_cpu import (CHUNK_ROWS, GEMV_MAX_M, TILED_MAX_M, TILED_MAX_M_AVX2, float8_weight_only_linear_cpu,
                                     tiled_max_m)
from lowbit.primitives.float8 import choose_qparams_float8, dequantize_float8, quantize_float8
from lowbit.spec import QuantSpec

ext = _ext.load("fp8_cpu")
pytestmark = pytest.mark.skipif(ext is None, reason="fp8_cpu C++ extension not available here")

# Kernel vs reference. bf16: the reference rounds q*s to bf16 and F.linear rounds its output
# once; the kernel multiplies exact bf16 q and scales the float32 sum (GEMV/tiled) or the bf16 mm
# output (chunks); measured min 47.6 dB (chunks), 47.4 (GEMV/tiled) over N x K up to 512 x 4096.
# float32: rounding differences only (measured min 121.7 dB). float16: computed in float32
# against a float16 reference (measured min 66.3 dB).
FAST_VS_REF_DB = {torch.bfloat16: 42.0, torch.float32: 110.0, torch.float16: 60.0}

FP8 = {"e4m3fn": "float8_e4m3fn", "e5m2": "float8_e5m2"}
XD = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
GRAN = {"row": PerRow(), "tensor": PerTensor()}
# (gemv_max_m, tiled_max_m, chunk_rows): force each path of the kernel.
PATHS = {"gemv": (4, 4, 256), "tiled": (0, 1 << 30, 256), "chunks": (0, 0, 16), "auto": None}


def _data(fp8, gran, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(FP8[fp8], GRAN[gran])
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g) * 4)
    s = choose_qparams_float8(w, spec)
    return quantize_float8(w, s, spec), s, spec, g


def _ref(x, q, s, spec, b):
    return F.linear(x, dequantize_float8(q, s, spec, output_dtype=x.dtype), b)


def _run(path, x, q, s, b):
    if PATHS[path] is None:
        return float8_weight_only_linear_cpu(x, q, s, b)
    return ext.fp8_linear(x.reshape(-1, q.shape[1]), q, s, b, *PATHS[path]).reshape(*x.shape[:-1], q.shape[0])


def test_thresholds_are_consistent():
    assert 0 <= GEMV_MAX_M <= 4 and TILED_MAX_M >= GEMV_MAX_M and CHUNK_ROWS >= 1
    assert tiled_max_m() == (TILED_MAX_M_AVX2 if _ext.fitting_isa("fp8_cpu") == "avx2" else TILED_MAX_M)
    assert ext is None or _ext.fitting_isa("fp8_cpu") == _ext.active_isa("fp8_cpu")


@pytest.mark.parametrize("fp8", FP8)
def test_conversion_is_exact_for_every_byte(fp8):
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.uint8).reshape(2, 128)
    q = q.view(getattr(torch, FP8[fp8])).contiguous()
    got, want = ext.fp8_to_bf16(q), q.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("gran", GRAN)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 256], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("nk", [(67, 200), (33, 80), (64, 256), (13, 101)], ids=lambda t: f"N{t[0]}K{t[1]}")
def test_matches_reference(nk, m, fp8, gran, xd, path):
    n, k = nk
    q, s, spec, g = _data(fp8, gran, n, k)
    x = torch.randn(m, k, generator=g).to(XD[xd])
    b = torch.randn(n, generator=g).to(XD[xd]) if m % 2 else None
    out = _run(path, x, q, s, b)
    assert out is not None and out.dtype == XD[xd] and out.shape == (m, n)
    assert sqnr(_ref(x, q, s, spec, b).float(), out.float()) >= FAST_VS_REF_DB[XD[xd]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("xd", XD)
def test_non_contiguous_and_batched_x(path, xd):
    q, s, spec, g = _data("e4m3fn", "row", 45, 96)
    base = torch.randn(3, 5, 192, generator=g).to(XD[xd])
    x = base[..., ::2]  # (3, 5, 96), stride 2 in K
    assert not x.is_contiguous()
    b = torch.randn(45, generator=g).to(XD[xd])
    out = _run(path, x, q, s, b)
    assert out.shape == (3, 5, 45) and out.dtype == XD[xd]
    assert sqnr(_ref(x, q, s, spec, b).float(), out.float()) >= FAST_VS_REF_DB[XD[xd]]
    xt = torch.randn(96, 7, generator=g).to(XD[xd]).t()  # transposed (7, 96)
    assert sqnr(_ref(xt, q, s, spec, None).float(), _run(path, xt, q, s, None).float()) >= FAST_VS_REF_DB[XD[xd]]


def _special_weight(fp8, n, k, g):
    """Random bytes (NaN/inf encodings removed) plus rows of zeros, max finite and subnormals."""
    nan_or_inf = (0x7F,) if fp8 == "e4m3fn" else (0x7C, 0x7D, 0x7E, 0x7F)
    max_finite = 0x7E if fp8 == "e4m3fn" else 0x7B
    raw = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    for v in nan_or_inf:
        raw[(raw & 0x7F) == v] = 0x01  # subnormal instead
    raw[0] = 0  # zeros
    raw[1] = max_finite  # max finite, positive
    raw[2] = max_finite | 0x80  # and negative
    raw[3] = torch.randint(0, 8 if fp8 == "e4m3fn" else 4, (k,), generator=g)  # subnormals (and zero)
    raw[3, ::3] |= 0x80
    return raw.to(torch.uint8).view(getattr(torch, FP8[fp8])), raw


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("fp8", FP8)
def test_special_values(fp8, xd, path):
    g = torch.Generator().manual_seed(1)
    n, k = 37, 136
    q, _ = _special_weight(fp8, n, k, g)
    spec = QuantSpec(FP8[fp8], PerRow())
    s = torch.full((n, 1), 2.0**-6) if xd == "fp16" else torch.rand(n, 1, generator=g) + 0.5
    x = torch.randn(9, k, generator=g).to(XD[xd])
    out, ref = _run(path, x, q, s, None).float(), _ref(x, q, s, spec, None).float()
    assert bool(out.isfinite().all()) and bool(ref.isfinite().all())
    assert bool((out[:, 0] == 0).all())
    assert sqnr(ref, out) >= FAST_VS_REF_DB[XD[xd]]
    # the subnormal row alone (tiny values must not be flushed to zero)
    assert sqnr(ref[:, 3], out[:, 3]) >= FAST_VS_REF_DB[XD[xd]] and bool((out[:, 3] != 0).any())


@pytest.mark.parametrize("xd", ["bf16", "fp32"])
@pytest.mark.parametrize("big", [1e3, 1e30], ids=lambda v: f"x{v:g}")
@pytest.mark.parametrize("fp8", FP8)
def test_gemv_large_activations(fp8, big, xd):
    """The AVX2 GEMV multiplies x by 2^j (j <= 120) before the FMAs: large |x| must lower j, not
    overflow to inf."""
    q, s, spec, g = _data(fp8, "row", 37, 136)
    x = (torch.randn(2, 136, generator=g) * big).to(XD[xd])
    out, ref = _run("gemv", x, q, s, None).float(), _ref(x, q, s, spec, None).float()
    assert bool(out.isfinite().all()) and bool(ref.isfinite().all())
    assert sqnr(ref, out) >= FAST_VS_REF_DB[XD[xd]]


@pytest.mark.parametrize("fp8", FP8)
def test_subnormal_weights_survive_flush_denormal(fp8):
    """The AVX2 GEMV holds weights as float32 subnormals (value * 2^-120 / 2^-112): a caller's
    torch.set_flush_denormal(True) (DAZ) must not turn the float8 subnormals into zeros."""
    g = torch.Generator().manual_seed(4)
    n, k = 11, 72
    q, _ = _special_weight(fp8, n, k, g)
    s = torch.rand(n, 1, generator=g) + 0.5
    x = torch.randn(2, k, generator=g)
    ref = _ref(x, q, s, QuantSpec(FP8[fp8], PerRow()), None)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        out = _run("gemv", x, q, s, None)
    finally:
        torch.set_flush_denormal(False)
    assert bool((out[:, 3] != 0).any())
    assert sqnr(ref[:, 3], out[:, 3]) >= FAST_VS_REF_DB[torch.float32]
    assert sqnr(ref, out) >= FAST_VS_REF_DB[torch.float32]


# bf16 activations whose products x q are float32 subnormals or that are subnormal themselves: the
# AVX-512 build's GEMV / tiled paths multiply with vdpbf16ps, which reads subnormal inputs as zero and
# flushes subnormal products and sums whatever MXCSR says (before the fix every output here was 0).
# Rows: a bf16 subnormal, a subnormal / smallest-normal mix, tiny normals, small normals; each row's
# values times 1, 2, 3 along K.
SUBNORMAL_ROWS = (2.0**-128, 0.75 * 2.0**-126, 2.0**-120, 2.0**-100)
SUBNORMAL_K = 72
# The property test's failing example (test_kernel_properties, M = N = K = 1): x the bf16 subnormal
# smallest_normal / 4, the weight's randn value; the reference's output 8.27e-40 (subnormal), kernel 0.
ONE_X, ONE_W = 2.0**-128, 0.2669


@pytest.mark.parametrize("path", ["gemv", "tiled", "chunks", "auto"])
@pytest.mark.parametrize("fp8", FP8)
def test_bf16_subnormal_activations(fp8, path):
    q, s, spec, _ = _data(fp8, "row", 11, SUBNORMAL_K, seed=5)
    x = (torch.tensor(SUBNORMAL_ROWS).reshape(-1, 1) * (1 + torch.arange(SUBNORMAL_K) % 3)).to(torch.bfloat16)
    out, ref = _run(path, x, q, s, None), _ref(x, q, s, spec, None)
    assert bool((ref != 0).all()) and bool((out != 0).all())
    for row in range(len(SUBNORMAL_ROWS)):
        assert sqnr(ref[row], out[row]) >= FAST_VS_REF_DB[torch.bfloat16], row


@pytest.mark.parametrize("path", ["gemv", "tiled", "chunks", "auto"])
@pytest.mark.parametrize("fp8", FP8)
def test_bf16_subnormal_activation_k1(fp8, path):
    spec = QuantSpec(FP8[fp8], PerRow())
    w = torch.tensor([[ONE_W]]).to(torch.bfloat16).float()
    s = choose_qparams_float8(w, spec)
    q = quantize_float8(w, s, spec)
    x = torch.tensor([[ONE_X]]).to(torch.bfloat16)
    out, ref = _run(path, x, q, s, None), _ref(x, q, s, spec, None)
    assert float(ref) != 0.0 and torch.equal(out, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("code", [0x7F, 0xFF], ids=hex)
def test_e4m3fn_nan_propagates(code, xd, path):
    g = torch.Generator().manual_seed(2)
    n, k = 21, 200
    q, raw = _special_weight("e4m3fn", n, k, g)
    raw[5, 17] = code
    raw[12, 199] = code  # in the K tail (200 % 64 != 0)
    q = raw.to(torch.uint8).view(torch.float8_e4m3fn)
    spec = QuantSpec("float8_e4m3fn", PerRow())
    s = torch.rand(n, 1, generator=g) + 0.5
    x = torch.randn(6, k, generator=g).to(XD[xd])
    out, ref = _run(path, x, q, s, None).float(), _ref(x, q, s, spec, None).float()
    nan_cols = torch.zeros(n, dtype=torch.bool)
    nan_cols[[5, 12]] = True
    assert bool(ref[:, nan_cols].isnan().all())
    assert bool(out[:, nan_cols].isnan().all())
    assert bool(out[:, ~nan_cols].isfinite().all())
    assert sqnr(ref[:, ~nan_cols], out[:, ~nan_cols]) >= FAST_VS_REF_DB[XD[xd]]


@pytest.mark.parametrize("path", PATHS)
def test_e5m2_inf_propagates(path):
    g = torch.Generator().manual_seed(3)
    q, raw = _special_weight("e5m2", 9, 64, g)
    raw[4] = 0  # one inf alone in a row: the output is +-inf
    raw[4, 10] = 0x7C
    q = raw.to(torch.uint8).view(torch.float8_e5m2)
    s = torch.ones(1, 1)
    x = torch.randn(3, 64, generator=g).abs().to(torch.bfloat16) + 0.1
    out = _run(path, x, q, s, None).float()
    assert bool(out[:, 4].isinf().all()) and bool((out[:, 4] > 0).all())


def test_per_tensor_scale_shapes_and_unsupported_cases():
    q, s, spec, g = _data("e4m3fn", "tensor", 16, 64)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    ref = _ref(x, q, s, spec, None).float()
    for sc in (s, s.reshape(1), s.reshape(())):
        assert sqnr(ref, float8_weight_only_linear_cpu(x, q, sc).float()) >= FAST_VS_REF_DB[torch.bfloat16]
    assert float8_weight_only_linear_cpu(x, q, s.double()) is None  # scale must be float32
    assert float8_weight_only_linear_cpu(x.double(), q, s) is None
    assert float8_weight_only_linear_cpu(x, q.view(torch.uint8), s) is None
    assert float8_weight_only_linear_cpu(x, q.t(), s) is None  # non-contiguous qdata
    assert float8_weight_only_linear_cpu(x, q, torch.ones(16, 2)) is None  # per-group scale
    assert float8_weight_only_linear_cpu(x, q, s, torch.zeros(16)) is None  # bias dtype != x dtype


def test_empty_and_one_dim():
    q, s, spec, g = _data("e5m2", "row", 8, 64)
    x1 = torch.randn(64, generator=g).to(torch.bfloat16)
    out = float8_weight_only_linear_cpu(x1, q, s)
    assert out.shape == (8,)
    assert sqnr(_ref(x1, q, s, spec, None).float(), out.float()) >= FAST_VS_REF_DB[torch.bfloat16]
    assert float8_weight_only_linear_cpu(torch.randn(0, 64).to(torch.bfloat16), q, s).shape == (0, 8)


@pytest.fixture
def num_threads():
    """Sets torch's thread count for one test and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# The chunked path splits the weight rows over the threads of one parallel region (each thread
# its own buffer and serial at::mm): ranges that do not divide by the thread count or the chunk
# size, fewer rows than threads x 8 (one thread), and more threads than cores. Same bounds as
# every path: FAST_VS_REF_DB (float32 is not bit-identical across thread counts: the BLAS picks
# its kernel by the chunk's width).
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n, chunk", [(67, 16), (7, 256), (300, 256), (9, 4)], ids=lambda v: str(v))
def test_chunks_split_over_threads(n, chunk, threads, xd, num_threads):
    num_threads(threads)
    q, s, spec, g = _data("e4m3fn", "row", n, 200)
    x = torch.randn(40, 200, generator=g).to(XD[xd])
    b = torch.randn(n, generator=g).to(XD[xd])
    out = ext.fp8_linear(x, q, s, b, 0, 0, chunk)
    assert out.shape == (40, n) and out.dtype == XD[xd]
    assert sqnr(_ref(x, q, s, spec, b).float(), out.float()) >= FAST_VS_REF_DB[XD[xd]]


@pytest.mark.parametrize("xd", XD)
def test_chunks_with_an_input_that_requires_grad(xd, num_threads):
    """The worker threads run at::mm_out on a detached input: grad mode on and an input that
    requires grad (training through ``lowbit::float8_weight_only_linear``) must not reach autograd."""
    from lowbit.kernels.float8 import float8_weight_only_linear
    from lowbit.spec import spec_key

    num_threads(2)
    q, s, spec, g = _data("e4m3fn", "row", 300, 200)
    x = torch.randn(tiled_max_m() + 8, 200, generator=g).to(XD[xd]).requires_grad_()
    b = torch.randn(300, generator=g).to(XD[xd]).requires_grad_()
    out = float8_weight_only_linear(x, q, s, b, spec_key(spec), "auto")
    assert sqnr(_ref(x.detach(), q, s, spec, b.detach()).float(), out.detach().float()) >= FAST_VS_REF_DB[XD[xd]]
    out.float().sum().backward()
    w = dequantize_float8(q, s, spec, output_dtype=XD[xd])
    assert torch.allclose(x.grad.float(), w.float().sum(0).expand_as(x), rtol=1e-2, atol=1e-2)
    assert torch.equal(b.grad, torch.full_like(b, x.shape[0]))


# --- float8 dynamic activations inside the kernel (fp8_linear_act) ------------------------------------

ACT = _ext.load("int8_act")
needs_two_call = pytest.mark.skipif(getattr(ACT, "fake_quant_fp8", None) is None,
                                    reason="int8_act's fake_quant_fp8 (the two-call path) not available here")
EPS = 1e-12


def _act_x(m, k, dtype, gen):
    """Rows of very different magnitudes (1e-6 .. 1e3), an all-zero row (the eps floor)."""
    x = torch.randn(m, k, generator=gen) * torch.logspace(-6, 3, m).unsqueeze(1)
    x[min(1, m - 1)] = 0
    return x.to(dtype)


def _two_calls(x, q, s, b, args, per_token, e5m2, eps=EPS):
    xq, _ = ACT.fake_quant_fp8(x.contiguous(), -1.0, per_token, eps, e5m2)
    return ext.fp8_linear(xq, q, s, b, *args)


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@needs_two_call
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("act", FP8)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("nk", [(67, 200), (13, 101), (5, 1)], ids=lambda t: f"N{t[0]}K{t[1]}")
def test_act_entry_equals_the_two_calls(nk, per_token, fp8, act, xd):
    """fp8_linear_act == fake_quant_fp8, then fp8_linear, bit for bit, for every M from 1 past the
    tiled bound (GEMV, scratch and chunked paths), with and without bias, per-row and per-tensor weight."""
    n, k = nk
    for gran in GRAN:
        q, s, spec, g = _data(fp8, gran, n, k, seed=k)
        b = torch.randn(n, generator=g).to(XD[xd])
        for m in range(1, TILED_MAX_M + 3):
            x = _act_x(m, k, XD[xd], g)
            args = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS)
            for bias in (None, b) if m % 3 else (b,):
                want = _two_calls(x, q, s, bias, args, per_token, act == "e5m2")
                got = ext.fp8_linear_act(x, q, s, bias, *args, per_token, EPS, act == "e5m2")
                assert got.dtype == XD[xd] and torch.equal(got, want), (gran, m, bias is None)


@needs_two_call
@pytest.mark.parametrize("path", ["gemv", "tiled", "chunks"])
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
def test_act_entry_on_each_path_and_odd_layouts(path, per_token):
    """Each path forced; a non-contiguous x (quantized as its contiguous copy); NaN and inf in x
    (per token: that row's outputs NaN; per tensor: all of them), as the two calls give them."""
    q, s, spec, g = _data("e4m3fn", "row", 37, 96)
    x = _act_x(4, 192, torch.bfloat16, g)[:, ::2]  # (4, 96), column stride 2
    assert not x.is_contiguous()
    for xi in (x, x.contiguous()):
        want = _two_calls(xi, q, s, None, PATHS[path], per_token, False)
        assert torch.equal(ext.fp8_linear_act(xi, q, s, None, *PATHS[path], per_token, EPS, False), want)
    xn = x.contiguous()
    xn[2, 5], xn[3, 1] = float("nan"), float("inf")
    want = _two_calls(xn, q, s, None, PATHS[path], per_token, False)
    got = ext.fp8_linear_act(xn, q, s, None, *PATHS[path], per_token, EPS, False)
    assert _same(got, want) and bool(got[2:].isnan().all()) and (per_token != bool(got[:2].isnan().all()))


@needs_two_call
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("act", FP8)
@pytest.mark.parametrize("nk", [(67, 200), (5, 1)], ids=lambda t: f"N{t[0]}K{t[1]}")
def test_static_act_entry_equals_the_two_calls(nk, act, xd):
    """fp8_linear_act_static == fake_quant_fp8 with the static scale, then fp8_linear, bit for bit, for every M
    from 1 past the tiled bound (GEMV, scratch and chunked paths), scales that saturate and that do not, NaN/inf."""
    n, k = nk
    for gran in GRAN:
        q, s, spec, g = _data("e4m3fn", gran, n, k, seed=k)
        b = torch.randn(n, generator=g).to(XD[xd])
        args = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS)
        for m in range(1, TILED_MAX_M + 3):
            x = _act_x(m, k, XD[xd], g)
            if m == 3:
                x[2, 0] = float("nan")
            for a in (1e-3, 0.37, 20.0):
                bias = b if m % 2 else None
                xq, _ = ACT.fake_quant_fp8(x.contiguous(), a, False, EPS, act == "e5m2")
                want = ext.fp8_linear(xq, q, s, bias, *args)
                got = ext.fp8_linear_act_static(x, q, s, bias, *args, a, EPS, act == "e5m2")
                assert got.dtype == XD[xd] and _same(got, want), (gran, m, a)


def test_static_act_entry_bad_scale_is_named():
    q, s, spec, g = _data("e4m3fn", "row", 8, 64)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    args = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS)
    for a in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="fp8_linear_act_static: act_scale must be a positive finite float"):
            ext.fp8_linear_act_static(x, q, s, None, *args, a, EPS, False)
    with pytest.raises(RuntimeError, match="fp8_linear_act_static: act_eps must be > 0"):
        ext.fp8_linear_act_static(x, q, s, None, *args, 0.5, 0.0, False)


def test_act_entry_empty_shapes_and_bad_arguments():
    q, s, spec, g = _data("e5m2", "row", 8, 64)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    args = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS)
    assert ext.fp8_linear_act(x[:0], q, s, None, *args, True, EPS, False).shape == (0, 8)
    b = torch.randn(8, generator=g).to(torch.bfloat16)
    q0 = torch.empty(8, 0, dtype=torch.float8_e5m2)  # K = 0: the bias alone, as fp8_linear gives it
    assert torch.equal(ext.fp8_linear_act(x[:, :0], q0, s, b, *args, True, EPS, False), b.expand(3, 8))
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(RuntimeError, match="act_eps must be > 0"):
            ext.fp8_linear_act(x, q, s, None, *args, True, eps, False)
    with pytest.raises(RuntimeError, match="x must be bf16, fp16 or fp32"):
        ext.fp8_linear_act(x.double(), q, s, None, *args, True, EPS, False)
    with pytest.raises(RuntimeError, match=r"x \(M, K\) and qdata \(N, K\) expected"):
        ext.fp8_linear_act(x[:, :63], q, s, None, *args, True, EPS, False)
    with pytest.raises(RuntimeError, match="bias must have N = 8 floating elements"):
        ext.fp8_linear_act(x, q, s, b[:7], *args, True, EPS, False)
    with pytest.raises(TypeError):  # a missing activation argument
        ext.fp8_linear_act(x, q, s, None, *args, True, EPS)


@needs_two_call
def test_float8_act_linear_cpu_wrapper():
    """The Python wrapper: the kernel's one call where it applies (equal to the two calls), None
    where the weight-only wrapper would widen x first (M > tiled_max_m()) or a gradient is wanted."""
    from lowbit.kernels._fp8_cpu import float8_act_linear_cpu

    q, s, spec, g = _data("e4m3fn", "row", 24, 80)
    x = torch.randn(3, 80, generator=g).to(torch.bfloat16)
    want = _two_calls(x, q, s, None, (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS), True, False)
    assert torch.equal(float8_act_linear_cpu(x, q, s, None, True, EPS, False), want)
    assert float8_act_linear_cpu(torch.randn(tiled_max_m() + 1, 80).bfloat16(), q, s, None, True, EPS, False) is None
    assert float8_act_linear_cpu(x.t().contiguous().t(), q, s, None, True, EPS, False) is None
    assert float8_act_linear_cpu(x[:0], q, s, None, True, EPS, False) is None
    assert float8_act_linear_cpu(x, q, s, torch.zeros(24), True, EPS, False) is None  # bias dtype != x dtype
    xr = x.float().requires_grad_()
    assert float8_act_linear_cpu(xr, q, s, None, True, EPS, False) is None


@pytest.mark.skipif(_ext.active_isa("fp8_cpu") != "avx2", reason="csrc/tile_f32.h's tiles are the AVX2 build's")
@pytest.mark.parametrize("xd", XD)
@pytest.mark.parametrize("fp8", FP8)
def test_tiled_any_m(fp8, xd):
    """The tiled path's 4 x 3 register tiles over K blocks (csrc/tile_f32.h): K = 1100 spans two blocks of
    512, a tail and a padded last vector, N = 7 a tail of 3 rows, M = 1..13 every remainder of the 3-row
    tiles; every row of the result equals that row of x alone, and the reference's bound holds."""
    q, s, spec, g = _data(fp8, "row", 7, 1100, seed=6)
    x = torch.randn(13, 1100, generator=g).to(XD[xd])
    b = torch.randn(7, generator=g).to(XD[xd])
    alone = torch.cat([_run("tiled", x[i:i + 1], q, s, b) for i in range(13)])
    for m in range(1, 14):
        assert torch.equal(_run("tiled", x[:m], q, s, b), alone[:m]), m
    assert sqnr(_ref(x, q, s, spec, b), alone) >= FAST_VS_REF_DB[XD[xd]]


@pytest.mark.parametrize("fp8", FP8)
def test_count_special(fp8):
    """fp8_count_special counts exactly the NaN / inf encodings: e4m3fn 0x7F / 0xFF, e5m2 exponent 31."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = codes.repeat(3, 1).contiguous().view(getattr(torch, FP8[fp8]))
    want = int((~q.float().isfinite()).sum())
    assert want == (6 if fp8 == "e4m3fn" else 24)
    assert ext.fp8_count_special(q) == want
    assert ext.fp8_count_special(q[:, :0]) == 0
    with pytest.raises(RuntimeError, match="qdata must be float8_e4m3fn or float8_e5m2"):
        ext.fp8_count_special(codes)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("xd", XD)
def test_finite_weight_skips_only_the_check(fp8, xd):
    """finite_weight=True on a weight with no NaN / inf byte: the same outputs bit for bit, every M of the
    GEMV and past it, weight-only and with float8 activations (dynamic and static)."""
    q, s, spec, g = _data(fp8, "row", 13, 200, seed=8)
    assert ext.fp8_count_special(q) == 0
    for m in range(1, GEMV_MAX_M + 3):
        x = torch.randn(m, 200, generator=g).to(XD[xd])
        args = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS)
        assert torch.equal(ext.fp8_linear(x, q, s, None, *args, True), ext.fp8_linear(x, q, s, None, *args)), m
        act = (True, EPS, False)
        assert torch.equal(ext.fp8_linear_act(x, q, s, None, *args, *act, finite_weight=True),
                           ext.fp8_linear_act(x, q, s, None, *args, *act)), m
        assert torch.equal(ext.fp8_linear_act_static(x, q, s, None, *args, 0.05, EPS, True, True),
                           ext.fp8_linear_act_static(x, q, s, None, *args, 0.05, EPS, True)), m


def test_weight_finite_follows_in_place_edits():
    """weight_finite counts once per version: an in-place edit that writes a NaN byte (through a uint8
    view, which shares the version counter) is seen by the next call, and the NaN reaches the output of
    float8_weight_only_linear_cpu at M = 1; a write through .data is not, until forget_finite."""
    from lowbit.kernels._fp8_cpu import forget_finite, weight_finite

    q, s, spec, g = _data("e4m3fn", "row", 9, 64, seed=9)
    x = torch.randn(1, 64, generator=g).bfloat16()
    assert weight_finite(q) and bool(float8_weight_only_linear_cpu(x, q, s).isfinite().all())
    q.view(torch.uint8)[3, 7] = 0x7F
    assert not weight_finite(q)
    out = float8_weight_only_linear_cpu(x, q, s)
    assert bool(out[0, 3].isnan()) and bool(out[0, torch.arange(9) != 3].isfinite().all())
    q.view(torch.uint8)[3, 7] = 0x10
    assert weight_finite(q)
    q.data.view(torch.uint8)[5, 0] = 0xFF  # bypasses the version counter
    assert weight_finite(q)  # documented: not seen
    forget_finite(q)
    assert not weight_finite(q) and bool(float8_weight_only_linear_cpu(x, q, s)[0, 5].isnan())
    with torch.inference_mode():
        qi = q.clone()
    assert not weight_finite(qi)  # no version counter: every call checks


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("finite", [False, True], ids=["checked", "finite"])
def test_gemv_rows_of_x_alone(fp8, finite):
    """The GEMV at M = 1..4 (N = 7: a tail past the row tiles): every row of the result equals that row of x
    alone, bit for bit (the pairs' sums do not depend on the tile shape or on M)."""
    q, s, spec, g = _data(fp8, "row", 7, 200, seed=7)
    x = torch.randn(4, 200, generator=g).bfloat16()
    args = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS, finite)
    alone = torch.cat([ext.fp8_linear(x[i:i + 1], q, s, None, *args) for i in range(4)])
    for m in range(1, 5):
        assert torch.equal(ext.fp8_linear(x[:m], q, s, None, *args), alone[:m]), m
