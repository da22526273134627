"""Every fast int8 kernel against its reference (SQNR bounds in dB, measured values beside)."""

import pytest
import torch

from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.kernels import _ext, host
from lowbit.kernels import w8a8
from lowbit.kernels.int8 import int8_weight_only_linear
from lowbit.kernels.w8a8 import int8_activation_linear
from lowbit.configs import Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig, Int8WeightOnlyConfig
from lowbit.spec import QuantSpec, spec_key
from lowbit.tensors.int8_tensor import Int8Tensor

# fast vs reference. Weight-only: the fast paths multiply in x's dtype with a different
# accumulation order; measured min 47.2 dB (bf16), 65.6 (fp16), 127.5 (fp32).
WEIGHT_ONLY_FAST_VS_REF_DB = {torch.bfloat16: 44.0, torch.float16: 60.0, torch.float32: 110.0}
# W8A8: exact int32 accumulation vs a float32 reference; measured min 87.4 dB (bf16 output).
ACTIVATION_FAST_VS_REF_DB = 80.0

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _act(symmetric: bool, static: bool = False) -> QuantSpec:
    """The activation spec the W8A8 configs state (dynamic per token, or static per tensor)."""
    if static:
        return Int8StaticActivationInt8WeightConfig(act_scale=1.0, act_zero_point=None if symmetric else 0).act_spec()
    return Int8DynamicActivationInt8WeightConfig(act_symmetric=symmetric).act_spec()


def _weights(granularity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 512, generator=g)
    return Int8Tensor.from_float(w, QuantSpec("int8", granularity)), g


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("m", [1, 4, 16, 64], ids=lambda m: f"M{m}")  # C++ (<=1 AVX-512, <=16 AVX2), int8pack (<=8), chunked
@pytest.mark.parametrize("granularity", [PerRow(), PerGroup(64), PerGroup(16), PerGroup(8), PerTensor()], ids=repr)
def test_weight_only_fast_matches_reference(dtype, m, granularity):
    t, g = _weights(granularity)
    x = torch.randn(m, 512, generator=g).to(dtype)
    b = torch.randn(256, generator=g).to(dtype)
    ref = int8_weight_only_linear(x, t.qdata, t.scale, None, b, spec_key(t.spec), "reference")
    fast = int8_weight_only_linear(x, t.qdata, t.scale, None, b, spec_key(t.spec), "auto")
    assert fast.dtype == dtype and fast.shape == (m, 256)
    assert sqnr(ref.float(), fast.float()) >= WEIGHT_ONLY_FAST_VS_REF_DB[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("m", [1, 3], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n, k, group", [(37, 48, 16), (29, 240, 48), (101, 1040, 1040), (7, 4112, 16)], ids=str)
def test_cpp_gemv_on_odd_shapes_and_group_sizes(n, k, group, m, dtype):
    """The C++ GEMV itself (whichever build runs here) at any M it takes: odd N, K not a multiple of
    32 or 64 (the vector loops' tails), groups of 16 to a whole row."""
    from lowbit.kernels import _ext

    ext = _ext.load("int8_gemv")
    if ext is None:
        pytest.skip(f"C++ kernel int8_gemv not available here ({_ext.status()['int8_gemv']})")
    g = torch.Generator().manual_seed(n)
    t = Int8Tensor.from_float(torch.randn(n, k, generator=g), QuantSpec("int8", PerGroup(group)))
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int8_weight_only_linear(x, t.qdata, t.scale, None, None, spec_key(t.spec), "reference")
    out = ext.int8_weight_only_mm(x, t.qdata, t.scale)
    assert out.dtype == dtype and out.shape == (m, n)
    assert sqnr(ref.float(), out.float()) >= WEIGHT_ONLY_FAST_VS_REF_DB[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("m", [1, 64], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("mode", ["dynamic-sym", "dynamic-asym", "static-sym", "static-asym"])
def test_activation_fast_matches_reference(dtype, m, mode):
    t, g = _weights(PerRow())
    x = torch.randn(m, 512, generator=g).to(dtype)
    b = torch.randn(256, generator=g).to(dtype)
    sym = mode.endswith("-sym")
    s = torch.tensor([0.03]) if mode.startswith("static") else None
    zp = torch.tensor([2], dtype=torch.int32) if mode == "static-asym" else None
    act = _act(sym, static=s is not None)
    ref = int8_activation_linear(x, t.qdata, t.scale, b, s, zp, act, t.spec, "reference")
    fast = int8_activation_linear(x, t.qdata, t.scale, b, s, zp, act, t.spec, "auto")
    assert fast.dtype == dtype
    assert sqnr(ref.float(), fast.float()) >= ACTIVATION_FAST_VS_REF_DB


def test_asymmetric_correction_is_exact_integer_math():
    # with scales of 1 the fast path is pure integer arithmetic: it must equal the float64 result
    q = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    x = torch.randint(-3, 9, (4, 16)).float()  # asymmetric range -> non-zero zero point
    s_w = torch.ones(8, 1)
    zp = torch.tensor([-3], dtype=torch.int32)
    out = int8_activation_linear(x, q, s_w, None, torch.tensor([1.0]), zp, _act(False, True), QuantSpec("int8"), "auto")
    assert torch.equal(out, x @ q.float().t())


def test_asymmetric_correction_follows_in_place_updates():
    t, g = _weights(PerRow())
    x = torch.randn(4, 512, generator=g)
    before = int8_activation_linear(x, t.qdata, t.scale, None, None, None, _act(False), t.spec, "auto")
    t.qdata.copy_(-t.qdata.clamp(min=-127))
    after = int8_activation_linear(x, t.qdata, t.scale, None, None, None, _act(False), t.spec, "auto")
    ref = int8_activation_linear(x, t.qdata, t.scale, None, None, None, _act(False), t.spec, "reference")
    assert not torch.equal(before, after) and sqnr(ref, after) >= ACTIVATION_FAST_VS_REF_DB


def test_bad_arguments():
    t, _ = _weights(PerRow())
    with pytest.raises(ValueError, match="kernel='fastest'"):
        int8_weight_only_linear(torch.randn(2, 512), t.qdata, t.scale, None, None, spec_key(t.spec), "fastest")
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        int8_weight_only_linear(torch.randn(2, 500), t.qdata, t.scale, None, None, spec_key(t.spec), "auto")
    g, _ = _weights(PerGroup(64))
    with pytest.raises(ValueError, match="per-row or per-tensor"):
        int8_activation_linear(torch.randn(2, 512), g.qdata, g.scale, None, None, None, _act(True), g.spec, "auto")


def _count_int_mm(fn, key="aten::_int_mm"):
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == key)


def _keys(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _w8a8_model(device):
    from torch import nn

    from lowbit.configs import Int8DynamicActivationInt8WeightConfig
    from lowbit.quantize import quantize_

    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 32)).to(device)
    return quantize_(m, Int8DynamicActivationInt8WeightConfig())


@pytest.mark.parametrize("freezing", [False, True], ids=["plain", "freezing"])
def test_compiled_w8a8_runs_one_opaque_op_per_linear_cpu(freezing, monkeypatch):
    # with freezing, inductor would rewrite a bare _int_mm into a oneDNN qlinear holding a
    # prepacked second copy of the weight. Compiled CPU W8A8 is one opaque op per linear instead: where the
    # int8_act build loads, lowbit::int8_act_linear_cpu (the eager C++ route whole: same bits as eager),
    # else the traced aten ops around lowbit::int8_mm. Inside either, our GEMM where the CPU has AVX-512 VNNI
    # (gemm_i8), else _int_mm.
    # int8 dot products forced: without them the op computes by float32 GEMMs (tests/kernels/test_host_paths.py)
    monkeypatch.setenv(host.INT8_ENV, "native")
    m = _w8a8_model("cpu")
    x = torch.randn(32, 64)
    torch._dynamo.reset()
    # caches off: a graph traced in another process (say with LOWBIT_NO_EXT=1) may be handed back here
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing, force_disable_caches=True):
        c = torch.compile(m, fullgraph=True)
        assert torch.equal(c(x), m(x))
        whole = _ext.load("int8_act") is not None
        assert _count_int_mm(lambda: c(x), "lowbit::int8_act_linear_cpu") == (3 if whole else 0)
        assert _count_int_mm(lambda: c(x), "lowbit::int8_mm") == (0 if whole else 3)
        assert not {k for k in _keys(lambda: c(x)) if "qlinear" in k or "mkldnn" in k}
        assert _count_int_mm(lambda: c(x)) == (0 if w8a8._vnni_ext() is not None else 3)


def test_the_compiled_cpu_op_falls_back_where_the_cpp_route_does_not_apply(monkeypatch):
    """lowbit::int8_act_linear_cpu is chosen while tracing; a graph holding it may run where the int8_act build
    does not load (torch's caches outlive the process that traced it): it then runs the aten path."""
    w, _ = _weights(PerRow())
    x = torch.randn(9, w.qdata.shape[1])
    act = _act(True)
    want = w8a8._activation_forward_aten(x, w.qdata, w.scale, None, None, None, act, w.spec, "auto")
    monkeypatch.setattr(_ext, "load", lambda name="int8_gemv": None)
    got = torch.ops.lowbit.int8_act_linear_cpu(x, w.qdata, w.scale, None, None, None, spec_key(act), spec_key(w.spec))
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_compiled_w8a8_calls_int_mm_once_per_linear_cuda():
    m = _w8a8_model("cuda").bfloat16()
    c = torch.compile(m, fullgraph=True)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        c(x)
        assert _count_int_mm(lambda: c(x)) == 3


# --- backward: the gradients' values, not only their presence ------------------------------------

BACKWARD_CONFIGS = {
    "wo-row": Int8WeightOnlyConfig(),
    "wo-g32": Int8WeightOnlyConfig(PerGroup(32)),
    "wo-tensor": Int8WeightOnlyConfig(PerTensor()),
    "w8a8-sym": Int8DynamicActivationInt8WeightConfig(),
    "w8a8-asym": Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
    "w8a8-static": Int8StaticActivationInt8WeightConfig(act_scale=0.05),
    "w8a8-static-zp": Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=-7),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("m", [1, 5], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("name", BACKWARD_CONFIGS)
def test_backward_equals_the_float_reference(name, m, dtype):
    """The input gradient is ``grad @ dequantize(W)`` (straight through the activation rounding of
    W8A8) and the bias gradient ``grad.sum(0)``: the float reference's, bit for bit (same ops)."""
    from torch import nn

    from lowbit.quantize import quantize_

    torch.manual_seed(0)
    layer = quantize_(nn.Linear(64, 48).to(dtype), BACKWARD_CONFIGS[name])
    x = torch.randn(m, 64, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, 48, dtype=dtype)
    layer(x).backward(grad)
    xr = x.detach().clone().requires_grad_()
    br = layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(xr, layer.weight.dequantize(dtype), br).backward(grad)
    assert torch.equal(x.grad, xr.grad) and torch.equal(layer.bias.grad, br.grad)
    assert torch.equal(x.grad, grad @ layer.weight.dequantize(dtype))


@pytest.mark.parametrize("k", [1, 3, 7, 9, 17, 24, 33, 48])
@pytest.mark.parametrize("m", [1, 2, 5, 8], ids=lambda m: f"M{m}")
def test_weight_only_small_m_any_k_bf16(k, m):
    """torch._weight_int8pack_mm's vectorized bf16 kernels step K by 8/16 with no tail: for other K
    they read past the operands (garbage outputs or a crash). Integer data: exact either way."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-3, 4, (m, k), generator=g).bfloat16()
    q = torch.randint(-3, 4, (5, k), generator=g, dtype=torch.int8)
    key = spec_key(QuantSpec("int8", PerRow()))
    out = int8_weight_only_linear(x, q, torch.ones(5, 1), None, None, key, "auto")
    assert torch.equal(out, (x.float() @ q.float().t()).bfloat16())


@pytest.mark.parametrize("offset", [8, 40, 1])
@pytest.mark.parametrize("m", [2, 5, 8], ids=lambda m: f"M{m}")
def test_weight_only_misaligned_weight(m, offset):
    """A weight that does not start on 64 bytes (safetensors hands out tensors 8-byte aligned):
    torch._weight_int8pack_mm's aligned loads crashed on it (segmentation fault). Integer data: exact."""
    g = torch.Generator().manual_seed(offset)
    buf = torch.randint(-3, 4, (128 * 64 + 64,), generator=g, dtype=torch.int8)
    start = (-buf.data_ptr()) % 64 + offset
    q = buf[start : start + 128 * 64].view(128, 64)
    assert q.data_ptr() % 64 == offset % 64
    x = torch.randint(-3, 4, (m, 64), generator=g).bfloat16()
    key = spec_key(QuantSpec("int8", PerRow()))
    out = int8_weight_only_linear(x, q, torch.ones(128, 1), None, None, key, "auto")
    assert torch.equal(out, (x.float() @ q.float().t()).bfloat16())


@pytest.mark.parametrize("m", [1, 4, 8], ids=lambda m: f"M{m}")
def test_weight_only_fp16_with_scales_below_fp16_normal_range(m):
    """Rows whose scale (amax / 127) is below float16's smallest normal (6.1e-5): a path that casts the
    scale to float16 (torch._weight_int8pack_mm) loses up to a few tenths of a percent (~50 dB)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 2e-4  # amax ~ 1e-3: scales ~ 8e-6
    t = Int8Tensor.from_float(w, QuantSpec("int8", PerRow()))
    x = torch.randn(m, 256, generator=g).half()
    key = spec_key(t.spec)
    ref = int8_weight_only_linear(x, t.qdata, t.scale, None, None, key, "reference")
    fast = int8_weight_only_linear(x, t.qdata, t.scale, None, None, key, "auto")
    assert sqnr(ref.float(), fast.float()) >= WEIGHT_ONLY_FAST_VS_REF_DB[torch.float16]


def test_the_gemv_limit_follows_the_build_dtype_k_and_groups(monkeypatch):
    """The largest M the int8 GEMV takes: AVX2 192; float32 / float16 x 128; bf16 x on AMX 8; bf16 x with one scale
    per row and K >= LARGE_K on a CPU with AVX-512 BF16 48 (its scratch tiles), else 16."""
    from lowbit.kernels import int8 as k8

    flags = {"plain": frozenset({"avx512f", "avx512bw", "avx512_bf16"}), "amx": frozenset({"avx512_bf16", "amx_bf16"}),
             "no_bf16": frozenset({"avx512f", "avx512bw"})}
    monkeypatch.setattr(host, "cpu_flags", lambda: flags["plain"])
    assert k8._max_m_of("avx2", torch.bfloat16, 4096, 1) == 192
    assert k8._max_m_of("avx512", torch.float32, 4096, 1) == 128
    assert k8._max_m_of("avx512", torch.bfloat16, k8.LARGE_K, 1) == 48
    assert k8._max_m_of("avx512", torch.bfloat16, None, None) == 48  # the largest over every weight
    assert k8._max_m_of("avx512", torch.bfloat16, k8.LARGE_K - 16, 1) == 16
    assert k8._max_m_of("avx512", torch.bfloat16, 4096, 32) == 16
    monkeypatch.setattr(host, "cpu_flags", lambda: flags["no_bf16"])
    assert k8._max_m_of("avx512", torch.bfloat16, 4096, 1) == 16
    monkeypatch.setattr(host, "cpu_flags", lambda: flags["amx"])
    assert k8._max_m_of("avx512", torch.bfloat16, 4096, 1) == 8


@pytest.mark.parametrize("k, groups, m, gemv", [(2048, 1, 48, True), (2048, 1, 49, False), (1024, 1, 17, False),
                                                 (2048, 16, 17, False), (1024, 1, 16, True)], ids=str)
def test_bf16_x_routes_by_m_k_and_groups(k, groups, m, gemv, monkeypatch):
    """Through the custom op: bf16 x goes to the GEMV up to its limit for the weight's K and groups, to gemm_bf16 above."""
    from lowbit.kernels import int8 as k8

    if k8._gemm_bf16() is None or k8._ext_max_m(torch.bfloat16, 2048, 1) != 48:
        pytest.skip("needs the AVX-512 build on a CPU with AVX-512 BF16 and no AMX")
    calls = []
    fn = k8._gemm_bf16()
    monkeypatch.setattr(k8, "_gemm_bf16", lambda: lambda *a: calls.append(1) or fn(*a))
    g = torch.Generator().manual_seed(k + m)
    t = Int8Tensor.from_float(torch.randn(40, k, generator=g), QuantSpec("int8", PerGroup(k // groups)))
    x = torch.randn(m, k, generator=g).bfloat16()
    out = int8_weight_only_linear(x, t.qdata, t.scale, None, None, spec_key(t.spec), "auto")
    ref = int8_weight_only_linear(x, t.qdata, t.scale, None, None, spec_key(t.spec), "reference")
    assert calls == ([] if gemv else [1])
    assert sqnr(ref.float(), out.float()) >= WEIGHT_ONLY_FAST_VS_REF_DB[torch.bfloat16]
