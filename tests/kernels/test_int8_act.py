"""The C++ W8A8 activation quantization and epilogue equal the PyTorch path bit for bit, and the one-call
dynamic linear (``w8a8_dynamic_linear``) equals those calls bit for bit."""

import pytest
import torch
from torch import nn

from lowbit import quantize_
from lowbit.configs import Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig
from lowbit.granularity import PerRow, PerTensor
from lowbit.kernels import _ext, host
from lowbit.kernels import w8a8 as int8_kernels
from lowbit.kernels.w8a8 import _activation_forward_aten, _fused_cpu, _int8_mm_impl

pytestmark = pytest.mark.skipif(_ext.load("int8_act") is None, reason="C++ kernel int8_act not available here")

SHAPES = [(1, 64, 48), (7, 100, 33), (64, 512, 256), (3, 17, 5)]
ACTS = {  # (static act_scale, act_zero_point, the config stating the activation spec)
    "dynamic": (None, None, Int8DynamicActivationInt8WeightConfig()),
    "static": (torch.tensor([0.02]), None, Int8StaticActivationInt8WeightConfig(act_scale=0.02)),
    "static-zp": (torch.tensor([0.015]), torch.tensor([5], dtype=torch.int32),
                  Int8StaticActivationInt8WeightConfig(act_scale=0.015, act_zero_point=5)),
    "static-zp-neg": (torch.tensor([0.03]), torch.tensor([-100], dtype=torch.int32),
                      Int8StaticActivationInt8WeightConfig(act_scale=0.03, act_zero_point=-100)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["wrow", "wtensor"])
def test_fused_equals_aten(dtype, shape, act, bias, per_tensor):
    torch.manual_seed(0)
    m, k, n = shape
    x = (torch.randn(m, k) * 3).to(dtype)
    x[0, 0] = 1e4 if dtype != torch.float16 else 6e4  # saturates a static range
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(1 if per_tensor else n, 1) * 0.01 + 1e-4
    b = torch.randn(n).to(dtype) if bias else None
    a_s, a_zp, config = ACTS[act]
    spec = Int8DynamicActivationInt8WeightConfig(granularity=PerTensor() if per_tensor else PerRow()).weight_spec()
    fused = _fused_cpu(x, w, s, b, a_s, a_zp, config.act_spec())
    assert fused is not None
    assert torch.equal(fused, _activation_forward_aten(x, w, s, b, a_s, a_zp, config.act_spec(), spec, "auto"))


def test_not_taken_where_it_does_not_apply():
    x = torch.randn(4, 32)
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    s = torch.rand(8, 1)
    sym, asym = (Int8DynamicActivationInt8WeightConfig(act_symmetric=a).act_spec() for a in (True, False))
    assert _fused_cpu(x, w, s, None, None, None, asym) is None  # dynamic asymmetric: PyTorch path
    assert _fused_cpu(x.t().contiguous().t(), w, s, None, None, None, sym) is None  # non-contiguous input
    assert _fused_cpu(x, w, s, torch.randn(8, dtype=torch.float64), None, None, sym) is None  # bias dtype differs


# --- w8a8_dynamic_linear: quantize_i8 + mm_i8 + w8a8_epilogue as one call (AVX2 build) ------------

_DYN = getattr(_ext.load("int8_act"), "w8a8_dynamic_linear", None)
needs_dyn = pytest.mark.skipif(_DYN is None, reason="the active int8_act build has no w8a8_dynamic_linear (AVX2 only)")
EPS = Int8DynamicActivationInt8WeightConfig().act_spec().eps


def _three_calls(x, w, s_w, b, eps=EPS):
    """Today's eager path: the extension's quantize_i8, _int8_mm_impl (mm_i8 here), w8a8_epilogue."""
    ext = _ext.load("int8_act")
    xq, s_x = ext.quantize_i8(x, -1.0, 0, eps)
    return ext.w8a8_epilogue(_int8_mm_impl(xq, w), s_x.contiguous(), s_w, b, None, x)


def _bits(t):
    """The tensor's bits (NaN payloads included), for exact comparisons."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _x_with_special_rows(m, k, dtype, gen):
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    x[0] = 0  # all-zero row: scale = eps
    if m > 1:
        x[1] = ((torch.rand(k, generator=gen) * 2 - 1) * (6e4 if dtype == torch.float16 else 1e30)).to(dtype)
    if m > 2:
        x[2, 0] = 6e4 if dtype == torch.float16 else -3e38  # one outlier in a small row
    return x


def _operands(k, n, dtype, bias):
    """A seeded generator (for x), an int8 (n, k) weight, its per-row scales and a bias or None."""
    gen = torch.Generator().manual_seed(k * 100 + n)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    s_w = torch.rand(n, generator=gen) * 0.01 + 1e-4
    return gen, w, s_w, (torch.randn(n, generator=gen).to(dtype) if bias else None)


@needs_dyn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 31, 64, 100, 576])
@pytest.mark.parametrize("n", [1, 7, 65])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_dynamic_linear_equals_the_three_calls(dtype, k, n, bias):
    gen, w, s_w, b = _operands(k, n, dtype, bias)
    for m in [1, 2, 3, 4, 5, 8, 16, 17, 33, 64]:
        x = _x_with_special_rows(m, k, dtype, gen)
        out = _DYN(x, w, s_w, b, EPS)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.equal(_bits(out), _bits(_three_calls(x, w, s_w, b))), f"M={m}"


@needs_dyn
@pytest.mark.parametrize("threads", [1, 2])
def test_dynamic_linear_reuses_its_buffers_across_shapes_and_threads(threads):
    """Thread-local temporaries: a call after a larger (or smaller, or -128-splitting) one sees none
    of its values; split over 1 or 2 threads."""
    gen = torch.Generator().manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k, n in [(64, 1000, 517), (1, 33, 9), (5, 1000, 3), (2, 31, 517), (1, 576, 1536)]:
            x = torch.randn(m, k, generator=gen, dtype=torch.float32).to(torch.bfloat16)
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
            s_w = torch.rand(n, generator=gen)
            assert torch.equal(_DYN(x, w, s_w, None, EPS), _three_calls(x, w, s_w, None)), (m, k, n)
    finally:
        torch.set_num_threads(old)


@needs_dyn
def test_dynamic_linear_empty_shapes():
    for m, k, n in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        x, w, s_w = torch.randn(m, k), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
        b = torch.randn(n)
        assert torch.equal(_DYN(x, w, s_w, b, EPS), _three_calls(x, w, s_w, b))


@needs_dyn
def test_dynamic_linear_bad_arguments_name_them():
    x, w, s_w, b = torch.randn(3, 40), torch.zeros(5, 40, dtype=torch.int8), torch.ones(5), torch.zeros(5)
    cases = [
        ((torch.empty(3, 40, device="meta"), w, s_w, b, EPS), "x must be a CPU tensor"),
        ((x.t().contiguous().t(), w, s_w, b, EPS), r"x must be a contiguous \(M, K\) tensor"),
        ((x.reshape(1, 3, 40), w, s_w, b, EPS), r"x must be a contiguous \(M, K\) tensor, got sizes \[1, 3, 40\]"),
        ((x.double(), w, s_w, b.double(), EPS), "x must be float32, bfloat16 or float16, got Double"),
        ((x, w.to(torch.uint8), s_w, b, EPS), "w must be int8, got Byte"),
        ((x, w[:, :39], s_w, b, EPS), r"w must be a contiguous \(N, K\) tensor with K = 40"),
        ((x, w.t().contiguous().t(), s_w, b, EPS), r"w must be a contiguous \(N, K\)"),
        ((x, w, torch.ones(4), b, EPS), r"s_w must be a contiguous float32 \(N,\) tensor with N = 5"),
        ((x, w, s_w.double(), b, EPS), r"s_w must be a contiguous float32"),
        ((x, w, s_w.reshape(5, 1), b, EPS), r"s_w must be a contiguous float32 \(N,\)"),
        ((x, w, s_w, b.bfloat16(), EPS), r"bias must be a contiguous \(N,\) tensor in x's dtype \(Float\)"),
        ((x, w, s_w, torch.zeros(6), EPS), r"bias must be a contiguous \(N,\) tensor in x's dtype \(Float\) with N = 5"),
        ((x, w, s_w, torch.zeros(10)[::2], EPS), r"bias must be a contiguous"),
        ((x, w, s_w, b, 0.0), "eps must be positive, got 0"),
    ]
    for args, why in cases:
        with pytest.raises(RuntimeError, match=f"w8a8_dynamic_linear: {why}"):
            _DYN(*args)


def _count_calls(monkeypatch, getter: str) -> list[int]:
    """Wrap ``int8_kernels.<getter>`` (``_dynamic_linear_op`` / ``_static_linear_op``) so that each call of the
    entry it returns appends its M to the list returned."""
    calls, real = [], getattr(int8_kernels, getter)

    def counting(ext):
        fn = real(ext)
        return None if fn is None else (lambda x, *a: calls.append(x.shape[0]) or fn(x, *a))

    monkeypatch.setattr(int8_kernels, getter, counting)
    return calls


@needs_dyn
@pytest.mark.skipif(host.has_int8_dot(), reason="routed only where the CPU has no int8 dot products (here: LOWBIT_ISA=avx2 "
                    "on a VNNI host, where _int_mm / the VNNI mm_i8 run instead)")
def test_fused_route_and_decode_plan_call_the_one_entry(monkeypatch):
    """``_fused_cpu`` (the routing) and the decode plan run dynamic W8A8 at small M as the one call."""
    calls = _count_calls(monkeypatch, "_dynamic_linear_op")
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, dtype=torch.bfloat16)
    quantize_(lin, Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = lin.weight
    with torch.no_grad():
        lin(x)  # the decode plan
        lin(x[:1])
        _fused_cpu(x, w.qdata, w.scale, lin.bias, None, None, w.act_spec)  # the routing
        big = torch.randn(int8_kernels._MM_I8_MAX_M + 1, 64, dtype=torch.bfloat16)
        _fused_cpu(big, w.qdata, w.scale, lin.bias, None, None, w.act_spec)  # above mm_i8's M: the three calls
    assert calls == [3, 1, 3]


# --- w8a8_static_linear: the same with a static activation scale and a zero point of 0 (AVX2 build) -

_STATIC = getattr(_ext.load("int8_act"), "w8a8_static_linear", None)
needs_static = pytest.mark.skipif(_STATIC is None, reason="the active int8_act build has no w8a8_static_linear (AVX2 only)")


def _three_static_calls(x, w, s_w, b, act_scale, eps=EPS):
    """The routing's static path before the one entry: quantize_i8 with the scale, mm_i8, w8a8_epilogue."""
    ext = _ext.load("int8_act")
    xq, _ = ext.quantize_i8(x, act_scale, 0, eps)
    return ext.w8a8_epilogue(_int8_mm_impl(xq, w), torch.tensor([act_scale], dtype=torch.float32), s_w, b, None, x)


@needs_static
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 31, 576])
@pytest.mark.parametrize("n", [1, 65])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_static_linear_equals_the_three_calls(dtype, k, n, bias):
    gen, w, s_w, b = _operands(k, n, dtype, bias)
    for act_scale in [0.003, 0.05, 1.7]:  # saturating at -128 / 127 (rows split by mm_i8), typical, coarse
        for m in [1, 2, 5, 17, 64]:
            x = _x_with_special_rows(m, k, dtype, gen)
            out = _STATIC(x, w, s_w, b, act_scale, EPS)
            assert out.dtype == dtype and out.shape == (m, n)
            assert torch.equal(_bits(out), _bits(_three_static_calls(x, w, s_w, b, act_scale))), (act_scale, m)


@needs_static
def test_static_linear_bad_arguments_name_them():
    x, w, s_w, b = torch.randn(3, 40), torch.zeros(5, 40, dtype=torch.int8), torch.ones(5), torch.zeros(5)
    for scale, why in [(0.0, "act_scale must be a positive finite float, got 0"), (-1.0, "act_scale must be a positive"),
                       (float("nan"), "act_scale must be a positive finite float, got nan")]:
        with pytest.raises(RuntimeError, match=f"w8a8_static_linear: {why}"):
            _STATIC(x, w, s_w, b, scale, EPS)
    with pytest.raises(RuntimeError, match=r"w8a8_static_linear: w must be int8, got Byte"):
        _STATIC(x, w.to(torch.uint8), s_w, b, 0.05, EPS)
    with pytest.raises(RuntimeError, match=r"w8a8_static_linear: bias must be a contiguous \(N,\) tensor in x's dtype"):
        _STATIC(x, w, s_w, torch.zeros(6), 0.05, EPS)


@needs_static
@pytest.mark.skipif(host.has_int8_dot(), reason="routed only where the CPU has no int8 dot products")
def test_static_route_and_decode_plan_call_the_one_entry(monkeypatch):
    """``_fused_cpu`` and the decode plan run static W8A8 with a zero point of 0 at small M as the one call; a
    non-zero zero point keeps the three calls (its int32 row-sum correction)."""
    calls = _count_calls(monkeypatch, "_static_linear_op")
    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for zp in (None, 0, 4):
        lin = nn.Linear(64, 24, dtype=torch.bfloat16)
        quantize_(lin, Int8StaticActivationInt8WeightConfig(act_scale=0.02, act_zero_point=zp))
        w = lin.weight
        with torch.no_grad():
            lin(x)  # the decode plan
            _fused_cpu(x, w.qdata, w.scale, lin.bias, w.act_scale, w.act_zero_point, w.act_spec)  # the routing
    assert calls == [3, 3, 3, 3]  # zp None and 0: plan and routing each; zp 4: neither
