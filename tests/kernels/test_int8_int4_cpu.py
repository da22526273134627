"""lowbit/kernels/_int8_int4_cpu.py and kernel int8_int4 (csrc/int8_int4.cpp, AVX-512 VNNI, or
csrc/int8_int4_avx2.cpp, whichever build loads here; LOWBIT_ISA=avx2 tests the other on an
AVX-512 host): 8da4w with exact int32 group sums.

Two references: (a) the same integer formula in float64 from the same xq, s_x, zp_x (the
primitives'), (b) lowbit's reference 8da4w linear (fake-quantized activation, dequantized weight,
float linear in the input dtype)."""

import copy

import pytest
import torch
from torch import nn

from lowbit import quantize_
from lowbit.configs import Int8DynamicActivationInt4WeightConfig
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerToken
from lowbit.kernels import _cpu_ops, _ext
from lowbit.kernels import _int8_int4_cpu as k8
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.affine import choose_qparams_affine, quantize_affine
from lowbit.primitives.packing import pack_int4
from lowbit.spec import QuantSpec

# (a) Same integers, same formula: the kernel's group sums are exact, so what differs is float32
# rounding (each lane's or group's I * s_w FMA'd into a float32 accumulator, their sum, the s_x
# multiply, the bias add; about 1e-7 relative: measured >= 140 dB over this file's cases, both
# builds). A bf16 x gives the same xq (its values are exact in float32), so its output must be the
# float32 result rounded once: tested exactly, the float32 result by the bound. (Not the bf16 output
# against the float64 formula by SQNR: where the float32 and the float64 value straddle a bf16
# rounding boundary, which happens or not with the order of the float32 additions, the two builds
# land one bf16 ulp apart, and one such step among a case's 37 x m outputs is already ~70 dB.)
FORMULA_DB = {torch.float32: 120.0}
# (b) Against the reference linear: it rounds the dequantized activation and the dequantized weight
# to the input dtype and multiplies in that dtype. float32: float32 rounding only (measured >= 128
# dB; test_int4's 8da4w auto bound is 100). bf16: the activation's and the weight's bf16 rounding
# (2^-9 relative each) and the output's (measured >= 48.3 dB over 3 seeds); the 40 dB bound of
# int4_linear's other bf16 CPU paths (test_int4.AUTO_VS_REF_DB).
REFERENCE_DB = {torch.float32: 100.0, torch.bfloat16: 40.0}

ACT = QuantSpec("int8", PerToken(), symmetric=False)


def _wspec(g):
    return QuantSpec("int4", PerGroup(g), symmetric=True)


W32 = _wspec(32)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def ext():
    e = _ext.load("int8_int4")
    if e is None:
        pytest.skip(f"C++ kernel int8_int4 not available here ({_ext.status()['int8_int4']})")
    return e


@pytest.fixture
def integer_paths(ext):
    """The integer paths at every M: AMX tiles off (on a CPU with them, bf16 x from AMX_MIN_M runs on bf16 tiles)."""
    if hasattr(ext, "set_amx"):
        ext.set_amx(False)
    yield ext
    if hasattr(ext, "set_amx"):
        ext.set_amx(True)


@pytest.fixture
def amx(ext):
    """The AVX-512 build's AMX route, where this process runs AMX tiles (skipped elsewhere)."""
    if not hasattr(ext, "amx_active") or not ext.amx_active():
        pytest.skip("no AMX tiles in this process (the CPU lacks them, the OS refused them, or the AVX2 build runs)")
    return ext


def _weight(n, k, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    spec = QuantSpec("int4", PerGroup(g), symmetric=True)
    s, _ = choose_qparams_affine(w, spec)
    q = quantize_affine(w, s, None, spec)
    return q, pack_int4(q), s


def _formula(x, q, s_w, bias, act=ACT):
    """The kernel's formula in float64 from the primitives' xq, s_x, zp_x, rounded once to x.dtype."""
    m, n, g = x.shape[0], q.shape[0], q.shape[1] // s_w.shape[1]
    s_x, zp_x = choose_qparams_affine(x, act, check_finite=False)
    xq = quantize_affine(x, s_x, zp_x, act).double()
    if zp_x is not None:
        xq = xq - zp_x.double()
    i = (xq.reshape(m, 1, -1, g) * q.double().reshape(1, n, -1, g)).sum(-1)  # exact: integers < 2^53
    out = s_x.double() * (i * s_w.double()).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def _reference_linear(n, k, g, dtype, bias, seed=0):
    """A Linear quantized with the 8da4w config, run on lowbit's reference kernel."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=g, kernel=KernelPreference.REFERENCE))
    return lin


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128, 256])
@pytest.mark.parametrize("m", range(1, 18))
def test_matches_the_integer_formula(ext, m, g, dtype, bias):
    n, k = 37, 11 * g  # odd N; 11 groups: a partial block of 8 groups, a partial unit of 128
    q, qdata, s = _weight(n, k, g, seed=m)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = k8.int8_int4_linear(x, qdata, s, None, b, ACT, _wspec(g))
    assert out is not None and out.dtype == dtype and out.shape == (m, n)
    if dtype == torch.float32:
        assert sqnr(_formula(x, q, s, b).double(), out.double()) >= FORMULA_DB[dtype]
        return
    out32 = k8.int8_int4_linear(x.float(), qdata, s, None, None if b is None else b.float(), ACT, _wspec(g))
    assert torch.equal(out, out32.to(dtype)), "not the float32 result rounded once"
    assert sqnr(_formula(x.float(), q, s, None if b is None else b.float()).double(), out32.double()) >= FORMULA_DB[torch.float32]


GEMM_MIN_M, PANEL_N, TILE_M, BLOCK_M = 9, 64, 6, 256  # csrc/int8_int4.cpp: kGemmMinM, kPanel, kGemmRows, kGemmBlockM


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("m, n", [(GEMM_MIN_M, 37), (GEMM_MIN_M + 1, PANEL_N), (GEMM_MIN_M + TILE_M + 2, PANEL_N + 1),
                                  (BLOCK_M + 1, 2 * PANEL_N + 5)])
def test_gemm_path_matches_the_integer_formula(integer_paths, m, n, g, dtype, bias):
    """The large-M path (64-row weight panels packed per call, 6-row x 32-column tiles, 256-row blocks of x): tile,
    panel and block edges, K with a partial 64-element chunk (7 groups of 32 or 96)."""
    if m > k8.max_m():
        pytest.skip(f"the active build takes M <= {k8.max_m()}")
    k = 7 * g
    q, qdata, s = _weight(n, k, g, seed=m + g)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = k8.int8_int4_linear(x, qdata, s, None, b, ACT, _wspec(g))
    assert out is not None and out.dtype == dtype and out.shape == (m, n)
    out32 = out if dtype == torch.float32 else k8.int8_int4_linear(x.float(), qdata, s, None, None if b is None else b.float(), ACT, _wspec(g))
    assert torch.equal(out, out32.to(dtype)), "not the float32 result rounded once"
    want = _formula(x.float(), q, s, None if b is None else b.float()).double()
    assert sqnr(want, out32.double()) >= FORMULA_DB[torch.float32]
    for row in (0, m // 2, m - 1):  # each row on its own, the ragged last tile among them
        assert sqnr(want[row], out32[row].double()) >= FORMULA_DB[torch.float32], row


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 33, 64])
def test_matches_the_reference_8da4w_linear(ext, m, g, dtype, bias):
    lin = _reference_linear(75, 4 * g, g, dtype, bias, seed=m)
    x = torch.randn(m, 4 * g).to(dtype)
    w = lin.weight
    with torch.no_grad():
        out = k8.int8_int4_linear(x, w.qdata, w.scale, w.zero_point, lin.bias, w.act_spec, w.spec)
        ref = lin(x)
    assert out is not None and out.dtype == ref.dtype
    assert sqnr(ref.float(), out.float()) >= REFERENCE_DB[dtype]


def test_symmetric_activation_spec_has_zero_as_its_zero_point(ext):
    act = QuantSpec("int8", PerToken(), symmetric=True)
    q, qdata, s = _weight(9, 128, 32)
    x = torch.randn(3, 128)
    out = k8.int8_int4_linear(x, qdata, s, None, None, act, W32)
    assert sqnr(_formula(x, q, s, None, act).double(), out.double()) >= FORMULA_DB[torch.float32]


@pytest.mark.parametrize("copies", [1, -(-GEMM_MIN_M // 6)], ids=["per-lane", "gemm"])
@pytest.mark.parametrize("g", [32, 256])
def test_extreme_values_are_exact(ext, g, copies):
    """Rows that saturate the int16 partial sums' bound (every weight 7, i.e. u = 15, against xq =
    -128 or 127 with zp_x = 127 or -128), an all-zero row, a constant row and a row with a huge
    outlier, against every weight -8 / 7 / random: the kernel's sums are exact integers, so only
    float32 rounding separates it from the float64 formula."""
    n, k = 5, 8 * g
    q = torch.full((n, k), 7, dtype=torch.int8)
    q[1] = -8
    q[2, ::2] = -8
    q[3] = torch.randint(-8, 8, (k,), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    q[4, : k // 2] = 0
    s = torch.rand(n, k // g, generator=torch.Generator().manual_seed(1)) + 0.5
    x = torch.randn(6, k)
    x[0] = -1.0  # xq = -128, zp_x = 127: (xq - zp_x) = -255 everywhere
    x[1] = 3.0  # xq = 127, zp_x = -128
    x[2] = 0.0
    x[3, 7] = 1e6
    x[4] = torch.where(torch.arange(k) % 2 == 0, -1.0, 1.0)
    x[5] = -1e-30
    x = x.repeat(copies, 1)  # copies > 1: the same six rows, at least GEMM_MIN_M in all, through the large-M path
    out = k8.int8_int4_linear(x, pack_int4(q), s, None, None, ACT, _wspec(g))[:6]
    want = _formula(x, q, s, None).double()[:6]
    assert sqnr(want, out.double()) >= FORMULA_DB[torch.float32]
    assert torch.equal(out[2], torch.zeros(n))
    for row in range(6):  # each row on its own: an error in a small row can't hide under a large one
        if want[row].abs().max() > 0:
            assert sqnr(want[row], out[row].double()) >= FORMULA_DB[torch.float32], row


def test_a_row_with_nan_or_inf_is_nan_like_the_reference(ext):
    lin = _reference_linear(33, 128, 32, torch.float32, True)
    x = torch.randn(4, 128)
    x[1, 5] = float("inf")
    x[2, 9] = float("nan")
    w = lin.weight
    with torch.no_grad():
        out = k8.int8_int4_linear(x, w.qdata, w.scale, None, lin.bias, w.act_spec, w.spec)
        ref = lin(x)
    assert bool(out[1:3].isnan().all()) and bool(ref[1:3].isnan().all())
    keep = [0, 3]
    assert sqnr(ref[keep], out[keep]) >= REFERENCE_DB[torch.float32]


def test_end_to_end_takes_the_integer_path(ext, monkeypatch):
    """A quantized model's forward (eager, no gradient) runs the integer forward for every layer and
    stays within the reference bound."""
    calls = []
    real_forward, real_op = k8._forward_unfused, k8._dynamic_linear_op

    def op(ext_, act):  # the one-call entry, counted
        fn = real_op(ext_, act)
        return None if fn is None else (lambda x, *a: calls.append(x.shape[0]) or fn(x, *a))

    monkeypatch.setattr(k8, "_dynamic_linear_op", op)
    monkeypatch.setattr(k8, "_forward_unfused", lambda ext_, x, *a: calls.append(-1) or real_forward(ext_, x, *a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 64)).to(torch.bfloat16)  # K = 96: 3 groups
    ref_model = copy.deepcopy(model)
    quantize_(model, Int8DynamicActivationInt4WeightConfig(group_size=32))
    quantize_(ref_model, Int8DynamicActivationInt4WeightConfig(group_size=32, kernel=KernelPreference.REFERENCE))
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref = model(x), ref_model(x)
    assert calls == [6, 6]
    assert sqnr(ref.float(), out.float()) >= REFERENCE_DB[torch.bfloat16]


def test_cases_it_does_not_take_return_none(ext, monkeypatch):
    q, qdata, s = _weight(8, 512, 32)
    x = torch.randn(2, 512)
    assert k8.int8_int4_linear(x, qdata, s, None, None, ACT, W32) is not None
    if k8.max_m() <= 4096:  # the AVX2 build's limit (the AVX-512 build has none)
        assert k8.int8_int4_linear(torch.randn(k8.max_m() + 1, 512), qdata, s, None, None, ACT, W32) is None
    assert k8.int8_int4_linear(torch.randn(0, 512), qdata, s, None, None, ACT, W32) is None
    assert k8.int8_int4_linear(x.half(), qdata, s, None, None, ACT, W32) is None
    assert k8.int8_int4_linear(x, qdata, s, torch.zeros_like(s, dtype=torch.int8), None, ACT, W32) is None
    s16 = s.repeat_interleave(2, dim=1)  # group size 16
    assert k8.int8_int4_linear(x, qdata, s16, None, None, ACT, _wspec(16)) is None
    assert k8.int8_int4_linear(x, qdata, s[:, :1], None, None, ACT, _wspec(512)) is None  # group size 512
    assert k8.int8_int4_linear(x, qdata, s, None, None, QuantSpec("float8_e4m3fn", PerToken()), W32) is None
    uint4 = QuantSpec("uint4", PerGroup(32), symmetric=False, zero_point_dtype=torch.int8)
    assert k8.int8_int4_linear(x, qdata, s, None, None, ACT, uint4) is None
    eager = k8.int8_int4_linear(x, qdata, s, None, None, ACT, W32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    # traced: the dispatcher op, whose body is the eager forward (bit for bit); never with a gradient, nor for a
    # spec the fused entry does not take
    ops, op = [], _cpu_ops.int8_int4_dynamic_linear
    monkeypatch.setattr(_cpu_ops, "int8_int4_dynamic_linear", lambda *a: ops.append(a) or op(*a))
    assert torch.equal(k8.int8_int4_linear(x, qdata, s, None, None, ACT, W32), eager) and len(ops) == 1
    assert k8.int8_int4_linear(x.clone().requires_grad_(), qdata, s, None, None, ACT, W32) is None
    assert k8.int8_int4_linear(x, qdata, s, None, None, QuantSpec("int8", PerToken(), symmetric=True), W32) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_the_fake_quantized_paths_and_the_forward_does_not_change(ext, dtype):
    """With autograd recording, the forward is the same integer result (bit for bit) and the
    gradients are the reference's: straight-through activation quantization, dequantized weight."""
    lin = _reference_linear(40, 128, 32, dtype, True)
    w = lin.weight
    x = torch.randn(3, 128).to(dtype)
    with torch.no_grad():
        plain = k8.int8_int4_linear(x, w.qdata, w.scale, None, lin.bias, w.act_spec, w.spec)
    xa = x.clone().requires_grad_()
    out = k8.int8_int4_linear(xa, w.qdata, w.scale, None, lin.bias, w.act_spec, w.spec)
    assert torch.equal(out, plain) and out.requires_grad
    grad = torch.randn_like(out)
    out.backward(grad)
    got_bias_grad = lin.bias.grad.clone()
    lin.bias.grad = None
    xr = x.clone().requires_grad_()
    lin(xr).backward(grad)
    assert torch.equal(xa.grad, xr.grad) and torch.equal(got_bias_grad, lin.bias.grad)


def test_bad_python_arguments_name_the_argument(ext):
    _, qdata, s = _weight(8, 256, 32)
    x = torch.randn(2, 256)
    with pytest.raises(TypeError, match="act_spec must be a QuantSpec"):
        k8.int8_int4_linear(x, qdata, s, None, None, "int8", W32)
    with pytest.raises(TypeError, match="spec must be a QuantSpec, got str"):
        k8.int8_int4_linear(x, qdata, s, None, None, ACT, "int4")
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        k8.int8_int4_linear(x.to(torch.int8), qdata, s, None, None, ACT, W32)
    with pytest.raises(TypeError, match="qdata must be a uint8"):
        k8.int8_int4_linear(x, qdata.to(torch.int8), s, None, None, ACT, W32)
    with pytest.raises(ValueError, match=r"input \(2, 254\) and qdata \(8, 128\) must be"):
        k8.int8_int4_linear(x[:, :254], qdata, s, None, None, ACT, W32)
    with pytest.raises(TypeError, match="scale must be a float32"):
        k8.int8_int4_linear(x, qdata, s.double(), None, None, ACT, W32)
    with pytest.raises(ValueError, match=r"scale \(8, 3\) must be \(N, K // group_size\)"):
        k8.int8_int4_linear(x, qdata, s[:, :3], None, None, ACT, W32)
    with pytest.raises(ValueError, match=r"bias must be a floating-point \(8,\) tensor"):
        k8.int8_int4_linear(x, qdata, s, None, torch.zeros(7), ACT, W32)


def _args(m=2, n=8, k=256, groups=8):
    q, qdata, s = _weight(n, k, k // groups)
    x = torch.randn(m, k)
    s_x, zp = choose_qparams_affine(x, ACT)
    return dict(xq=quantize_affine(x, s_x, zp, ACT), x_scale=s_x, x_zero_point=zp.int(), qdata=qdata, scale=s,
                bias=None, out=torch.empty(m, n))


def _call(ext, a):
    return ext.int8_int4_linear(a["xq"], a["x_scale"], a["x_zero_point"], a["qdata"], a["scale"], a["bias"], a["out"])


@pytest.mark.parametrize("field, value, why", [
    ("xq", lambda a: a["xq"].int(), r"xq must be contiguous int8 \(M, K\)"),
    ("xq", lambda a: a["xq"].t().contiguous().t(), r"xq must be contiguous int8"),
    ("x_scale", lambda a: a["x_scale"][:1], r"x_scale must be contiguous float32 with one value per row of xq \(2\)"),
    ("x_scale", lambda a: a["x_scale"].double(), r"x_scale must be contiguous float32"),
    ("x_zero_point", lambda a: a["x_zero_point"].long(), r"x_zero_point must be contiguous int32"),
    ("x_zero_point", lambda a: a["x_zero_point"] + 300, r"x_zero_point must be in \[-128, 127\]"),
    ("qdata", lambda a: a["qdata"][:, :64], r"qdata must be contiguous uint8 \(N, K/2\) with K = 256"),
    ("qdata", lambda a: a["qdata"].to(torch.int8), r"qdata must be contiguous uint8"),
    ("scale", lambda a: a["scale"][:4], r"scale must be contiguous float32 \(N, G\) with N = 8"),
    ("scale", lambda a: a["scale"][:, :3].contiguous(), r"scale groups \(3\) must divide K \(256\)"),
    ("scale", lambda a: a["scale"].repeat_interleave(2, 1), r"group size must be a multiple of 32 and at most 256, got 16"),
    ("bias", lambda a: torch.zeros(7), r"bias must be contiguous float32, bfloat16 or float16 \(N,\) with N = 8"),
    ("bias", lambda a: torch.zeros(8, dtype=torch.int32), r"bias must be contiguous float32"),
    ("out", lambda a: torch.empty(2, 7), r"out must be contiguous float32, bfloat16 or float16 \(M, N\) = \(2, 8\)"),
    ("out", lambda a: torch.empty(2, 8, dtype=torch.int32), r"out must be contiguous"),
])
def test_bad_kernel_arguments_raise_before_touching_memory(ext, field, value, why):
    a = _args()
    a[field] = value(a)
    with pytest.raises(RuntimeError, match=why):
        _call(ext, a)


def test_kernel_refuses_groups_its_int16_sums_cannot_hold(ext):
    a = _args(k=1024, groups=2)
    with pytest.raises(RuntimeError, match=r"group size must be a multiple of 32 and at most 256, got 512"):
        _call(ext, a)


@pytest.mark.parametrize("g", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("n", [1, 15, 16, 37])
def test_large_m_matches_the_integer_formula(ext, g, n):
    """M from 32 up, where the AVX-512 build runs its 16-row panel GEMM (N below, at and past a
    panel; M past its 256-row blocks); the AVX2 build runs its one kernel."""
    k = 11 * g if g == 32 else 3 * g
    q, qdata, s = _weight(n, k, g, seed=n)
    gen = torch.Generator().manual_seed(g + n)
    for m in (32, 40, 300):
        x = torch.randn(m, k, generator=gen) * 3
        x[1] = x[1].abs()  # a row with zp_x = -128
        b = torch.randn(n, generator=gen)
        out = ext.int8_int4_dynamic_linear(x, qdata, s, b, ACT.qmin, ACT.qmax, ACT.eps)
        assert sqnr(_formula(x, q, s, b).double(), out.double()) >= FORMULA_DB[torch.float32], m


@pytest.mark.parametrize("g", [96, 160, 192, 224])
@pytest.mark.parametrize("groups", [1, 5, 7])
def test_any_group_that_is_a_multiple_of_32_up_to_256_is_taken(ext, g, groups):
    """Groups that are not powers of two: in the AVX-512 build a unit of 128 weights then spans two
    groups at shifting offsets (a pattern repeating every 3, 5, 3 or 7 units), and K ends mid-unit."""
    q, qdata, s = _weight(9, g * groups, g, seed=groups)
    for m in (1, 3, 9):
        x = torch.randn(m, g * groups)
        out = k8.int8_int4_linear(x, qdata, s, None, None, ACT, _wspec(g))
        assert sqnr(_formula(x, q, s, None).double(), out.double()) >= FORMULA_DB[torch.float32], m


def _activation_cases():
    """(name, x) inputs for the activation quantizer: scales from 1e-6 to 1e3, one-signed rows, coarse
    values, all-zero rows with a -0.0 (scale = eps), K not a multiple of 8, three dtypes, exact .5 ties."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for k in (1, 7, 64, 129, 576):
            for mag in (1e-6, 1e-2, 1.0, 1e3):
                x = torch.randn(5, k, generator=gen) * mag
                yield f"{dtype}-k{k}-randn{mag:g}", x.to(dtype)
            yield f"{dtype}-k{k}-positive", torch.rand(3, k, generator=gen).to(dtype)
            yield f"{dtype}-k{k}-negative", (-torch.rand(3, k, generator=gen)).to(dtype)
            yield f"{dtype}-k{k}-halfgrid", (torch.randint(-6, 7, (4, k), generator=gen) * 0.5).to(dtype)
            z = torch.zeros(2, k, dtype=dtype)
            z[0, 0] = -0.0
            yield f"{dtype}-k{k}-zeros", z
    # scale exactly 1 (max - min = 255): x / s lands on .5 ties, which round half to even must settle
    ties = torch.tensor([[0.0, 255.0, 0.5, 1.5, 2.5, 100.5, 253.5, 254.5, 3.5],
                         [-255.0, 0.0, -0.5, -1.5, -2.5, -100.5, -253.5, -254.5, -3.5]])
    yield "ties", ties


def test_activation_quantizer_equals_the_primitives_bit_for_bit(ext):
    for name, x in _activation_cases():
        s, zp = choose_qparams_affine(x, ACT, check_finite=False)
        q = quantize_affine(x, s, zp, ACT)
        q2, s2, zp2, ok = ext.quantize_act_asym(x, ACT.qmin, ACT.qmax, ACT.eps)
        assert ok, name
        assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(zp2, zp.to(torch.int32)), name


def test_activation_quantizer_declines_nan_and_inf_and_the_linear_still_matches(ext):
    x = torch.randn(3, 64)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 5] = bad
        assert ext.quantize_act_asym(y, ACT.qmin, ACT.qmax, ACT.eps)[3] is False
    # the Python side then uses the primitives: same xq, s, zp as they give
    y = x.clone()
    y[1, 5] = float("inf")
    xq, s, zp = k8._quantize_input(ext, y, ACT)
    s_ref, zp_ref = choose_qparams_affine(y, ACT, check_finite=False)
    assert torch.equal(xq, quantize_affine(y, s_ref, zp_ref, ACT)) and torch.equal(s, s_ref) and torch.equal(zp, zp_ref)


@pytest.mark.parametrize("args, why", [
    ((torch.zeros(2, 3, dtype=torch.int32), -128, 127, 1e-7), r"x must be contiguous float32, bfloat16 or float16"),
    ((torch.zeros(2, 3, 4), -128, 127, 1e-7), r"x must be contiguous float32, bfloat16 or float16 \(M, K\)"),
    ((torch.zeros(2, 3), -129, 127, 1e-7), r"qmin, qmax must satisfy -128 <= qmin < qmax <= 127"),
    ((torch.zeros(2, 3), 5, 5, 1e-7), r"qmin, qmax must satisfy"),
    ((torch.zeros(2, 3), -128, 127, 0.0), r"eps must be positive"),
])
def test_activation_quantizer_bad_arguments_name_the_argument(ext, args, why):
    with pytest.raises(RuntimeError, match=why):
        ext.quantize_act_asym(*args)


# --- int8_int4_dynamic_linear: quantize_act_asym + int8_int4_linear as one call --------------------


def _bits(t):
    """The tensor's bits (NaN payloads included), for exact comparisons."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _one_call(ext, x, qdata, s, b, act=ACT):
    return ext.int8_int4_dynamic_linear(x, qdata, s, b, act.qmin, act.qmax, act.eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("g, groups", [(32, 1), (32, 18), (64, 9), (96, 5), (256, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("bias", [None, "same", "float32"])
def test_one_call_equals_the_two_calls(ext, dtype, g, groups, n, bias):
    """Bit for bit against quantize_act_asym + int8_int4_linear (``_forward_unfused``) for M = 1 .. MAX_M,
    odd N, group counts that fill a block of 8 groups or not, bias in x's dtype or another, a zero
    row, a huge row, a row with one outlier, and finite rows whose scale overflows to inf (NaN out)."""
    k = g * groups
    q, qdata, s = _weight(n, k, g, seed=groups)
    gen = torch.Generator().manual_seed(n + groups)
    b = None if bias is None else torch.randn(n, generator=gen).to(dtype if bias == "same" else torch.float32)
    big = 6e4 if dtype == torch.float16 else 1e30
    for m in [1, 2, 3, 4, 7, 16, 17, 33, k8.MAX_M]:
        x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
        x[0] = 0
        if m > 1:
            x[1] = ((torch.rand(k, generator=gen) * 2 - 1) * big).to(dtype)
        if m > 2:
            x[2, -1] = big
        if m > 3 and dtype != torch.float16:
            x[3, 0], x[3, -1] = 3e38, -3e38  # max - min overflows float32: an infinite scale
        out = _one_call(ext, x, qdata, s, b)
        want = k8._forward_unfused(ext, x, qdata, s, b, ACT)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.equal(_bits(out), _bits(want)), f"M={m}"
        if m > 3 and dtype != torch.float16:
            assert bool(out[3].isnan().all())


@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_reuses_its_buffers_across_shapes(ext, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, groups, n in [(64, 24, 300), (1, 3, 5), (5, 18, 192), (2, 1, 77), (1, 18, 576)]:
            _, qdata, s = _weight(n, 32 * groups, 32, seed=m)
            x = torch.randn(m, 32 * groups).bfloat16()
            assert torch.equal(_one_call(ext, x, qdata, s, None), k8._forward_unfused(ext, x, qdata, s, None, ACT))
    finally:
        torch.set_num_threads(old)


def test_one_call_declines_nan_and_inf_and_forward_falls_back(ext):
    _, qdata, s = _weight(9, 128, 32)
    x = torch.randn(3, 128)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 5] = bad
        assert _one_call(ext, y, qdata, s, None) is None
        out, want = k8._forward(ext, y, qdata, s, None, ACT), k8._forward_unfused(ext, y, qdata, s, None, ACT)
        assert torch.equal(_bits(out), _bits(want)) and bool(out[1].isnan().all())


def test_one_call_is_not_offered_where_quantize_act_asym_is_not_used(ext):
    assert k8._dynamic_linear_op(ext, ACT) is not None
    assert k8._dynamic_linear_op(ext, QuantSpec("int8", PerToken(), symmetric=True)) is None
    assert k8._dynamic_linear_op(ext, QuantSpec("int8", PerToken(), symmetric=False, scale_dtype=torch.bfloat16)) is None


@pytest.mark.parametrize("arg, value, why", [
    ("x", lambda a: torch.empty(2, 256, device="meta"), r"x must be a defined CPU tensor"),
    ("x", lambda a: a["x"].int(), r"x must be contiguous float32, bfloat16 or float16 \(M, K\), got Int"),
    ("x", lambda a: a["x"].t().contiguous().t(), r"x must be contiguous"),
    ("x", lambda a: a["x"].reshape(1, 2, 256), r"x must be contiguous float32, bfloat16 or float16 \(M, K\)"),
    ("qdata", lambda a: a["qdata"][:, :64], r"qdata must be contiguous uint8 \(N, K/2\) with K = 256"),
    ("qdata", lambda a: a["qdata"].to(torch.int8), r"qdata must be contiguous uint8"),
    ("scale", lambda a: a["scale"][:4], r"scale must be contiguous float32 \(N, G\) with N = 8"),
    ("scale", lambda a: a["scale"].double(), r"scale must be contiguous float32"),
    ("scale", lambda a: a["scale"][:, :3].contiguous(), r"scale groups \(3\) must divide K \(256\)"),
    ("scale", lambda a: a["scale"].repeat_interleave(2, 1), r"group size must be a multiple of 32 and at most 256, got 16"),
    ("bias", lambda a: torch.zeros(7), r"bias must be contiguous float32, bfloat16 or float16 \(N,\) with N = 8"),
    ("bias", lambda a: torch.zeros(8, dtype=torch.int32), r"bias must be contiguous float32"),
    ("bias", lambda a: torch.zeros(16)[::2], r"bias must be contiguous"),
    ("qmin", lambda a: -129, r"qmin, qmax must satisfy -128 <= qmin < qmax <= 127, got -129, 127"),
    ("qmax", lambda a: -128, r"qmin, qmax must satisfy"),
    ("eps", lambda a: 0.0, r"eps must be positive, got 0"),
])
def test_one_call_bad_arguments_raise_naming_them(ext, arg, value, why):
    _, qdata, s = _weight(8, 256, 32)
    a = dict(x=torch.randn(2, 256), qdata=qdata, scale=s, bias=None, qmin=ACT.qmin, qmax=ACT.qmax, eps=ACT.eps)
    a[arg] = value(a)
    with pytest.raises(RuntimeError, match=why):
        ext.int8_int4_dynamic_linear(**a)


# ---- the AMX route (csrc/int8_int4.cpp, run_amx): bf16 x from AMX_MIN_M on a CPU with AMX tiles ------------------
# x's integers xq - zp_x (exact in bf16) times the weight's reference bf16 values, float32 sums over all of K on the
# tiles, s_x per row, the bias, one rounding to bf16. (c) Against that formula in float64 rounded once to bf16: the
# float32 sums' order moves an output across a bf16 rounding boundary now and then (one bf16 step ~2^-8 relative;
# measured >= 134 dB over these cases on a 2-core Xeon guest, most outputs equal; the bound allows one such step). (d) Against the float64 value unrounded: the output's
# own bf16 rounding (~52-56 dB, as gemm_bf16's VS_FLOAT64_DB).
AMX_MIN_M = 32  # csrc/int8_int4.cpp: kAmxMinM
AMX_FORMULA_DB = 70.0
AMX_FLOAT64_DB = 50.0


def _bf16_weight_formula(x, q, s_w, bias, act=ACT):
    """The AMX route's formula in float64 from the primitives' xq, s_x, zp_x and the weight's bf16 values."""
    s_x, zp_x = choose_qparams_affine(x, act, check_finite=False)
    xq = quantize_affine(x, s_x, zp_x, act).double() - zp_x.double()
    g = q.shape[1] // s_w.shape[1]
    w = (q.float() * s_w.repeat_interleave(g, dim=1)).bfloat16().double()  # dequantize_affine's values
    out = s_x.double() * (xq @ w.T)
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
@pytest.mark.parametrize("m, n, groups", [(AMX_MIN_M, 37, 3), (AMX_MIN_M + 1, 64, 5), (47, 65, 4), (71, 130, 2),
                                          (257, 29, 3)])
def test_amx_route_matches_its_formula(amx, m, n, groups, g, bias):
    """AMX's 32-row blocks (a partial last one), 64-column panels (a partial last one), odd N."""
    k = groups * g
    q, qdata, s = _weight(n, k, g, seed=m + g)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).bfloat16()
    b = torch.randn(n).bfloat16() if bias else None
    out = k8.int8_int4_linear(x, qdata, s, None, b, ACT, _wspec(g))
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    want = _bf16_weight_formula(x.float(), q, s, None if b is None else b.float())
    assert sqnr(want.bfloat16().double(), out.double()) >= AMX_FORMULA_DB
    assert sqnr(want, out.double()) >= AMX_FLOAT64_DB
    for row in (0, m // 2, m - 1):
        assert sqnr(want[row].bfloat16().double(), out[row].double()) >= AMX_FORMULA_DB, row
    amx.set_amx(False)  # the integer paths on the same input: within the reference bound of the tiles' result
    try:
        exact = k8.int8_int4_linear(x, qdata, s, None, b, ACT, _wspec(g))
    finally:
        amx.set_amx(True)
    assert sqnr(_formula(x.float(), q, s, None if b is None else b.float()).double(), exact.double()) >= 45.0
    assert sqnr(exact.double(), out.double()) >= REFERENCE_DB[torch.bfloat16]


def test_amx_route_takes_k_past_a_panel_block_and_is_taken(amx):
    """K past gemm_bf16's 4096-column panel block (running float32 tiles between blocks); the route is the one
    taken: its output is the bf16-weight formula's, which the integer paths' is not."""
    m, n, g = 40, 70, 32
    k = 4096 + 4 * g
    q, qdata, s = _weight(n, k, g, seed=3)
    x = torch.randn(m, k).bfloat16()
    out = k8.int8_int4_linear(x, qdata, s, None, None, ACT, _wspec(g))
    want = _bf16_weight_formula(x.float(), q, s, None)
    assert sqnr(want.bfloat16().double(), out.double()) >= AMX_FORMULA_DB
    amx.set_amx(False)
    try:
        exact = k8.int8_int4_linear(x, qdata, s, None, None, ACT, _wspec(g))
    finally:
        amx.set_amx(True)
    assert not torch.equal(out, exact)
    assert sqnr(want.bfloat16().double(), exact.double()) < AMX_FORMULA_DB


def test_amx_route_rows_nan_zero_and_not_taken_cases(amx):
    """A row holding NaN / inf gives NaN, an all-zero row gives the bias exactly, the other rows their formula;
    float32 x, M below AMX_MIN_M and a group that is not a power of two stay on the integer paths (exact)."""
    m, n, g = 36, 33, 32
    k = 4 * g
    q, qdata, s = _weight(n, k, g, seed=5)
    x = torch.randn(m, k).bfloat16()
    x[1, 5] = float("inf")
    x[2, 9] = float("nan")
    x[3] = 0.0
    b = torch.randn(n).bfloat16()
    out = k8._forward(amx, x, qdata, s, b, ACT)  # the one-call entry (NaN rows through the primitives)
    assert bool(out[1:3].isnan().all())
    assert torch.equal(out[3], b)
    keep = [i for i in range(m) if i not in (1, 2)]
    want = _bf16_weight_formula(x[keep].float(), q, s, b.float())
    assert sqnr(want.bfloat16().double(), out[keep].double()) >= AMX_FORMULA_DB
    for xx, gg in ((torch.randn(m, k), g), (torch.randn(AMX_MIN_M - 1, k).bfloat16(), g), (torch.randn(m, 3 * 96).bfloat16(), 96)):
        qq, qd, ss = _weight(n, xx.shape[1], gg, seed=7)
        got = k8.int8_int4_linear(xx, qd, ss, None, None, ACT, _wspec(gg))
        got32 = k8.int8_int4_linear(xx.float(), qd, ss, None, None, ACT, _wspec(gg))
        assert torch.equal(got, got32.to(xx.dtype)), (xx.dtype, xx.shape, gg)
