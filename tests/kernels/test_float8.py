"""Float8 kernels against their reference, and the dispatch rules (SM < 8.9 fallback)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerRow, PerTensor, PerToken
from lowbit.kernels import float8 as k8
from lowbit.kernels.float8 import float8_activation_linear, float8_weight_only_linear
from lowbit.primitives.float8 import choose_qparams_float8, dequantize_float8, fake_quantize_float8, quantize_float8
from lowbit.spec import QuantSpec, spec_key

# fast CPU weight-only vs reference: the per-row scale applied to the output instead of the
# bf16-rounded dequantized weight (bf16); float32 differs by rounding order only
AUTO_VS_REF_DB = {torch.bfloat16: 40.0, torch.float32: 100.0, torch.float16: 55.0}
# _scaled_mm (float32 accumulation of exact float8 products) vs the fake-quant reference
SCALED_MM_VS_REF_DB = 40.0


def _weight(n=64, k=256, dtype="float8_e4m3fn", per_row=True, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    spec = QuantSpec(dtype, PerRow() if per_row else PerTensor())
    s = choose_qparams_float8(w, spec)
    return quantize_float8(w, s, spec), s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("per_row", [True, False], ids=["row", "tensor"])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_weight_only_auto_matches_reference(dtype, fmt, per_row, m):
    q, s = _weight(96, 200, fmt, per_row)
    x = torch.randn(m, 200).to(dtype)
    b = torch.randn(96).to(dtype)
    spec = QuantSpec(fmt, PerRow() if per_row else PerTensor())
    ref = float8_weight_only_linear(x, q, s, b, spec_key(spec), "reference")
    assert torch.equal(ref, F.linear(x, dequantize_float8(q, s, spec, dtype), b))
    out = float8_weight_only_linear(x, q, s, b, spec_key(spec), "auto")
    assert out.dtype == dtype and sqnr(ref.float(), out.float()) >= AUTO_VS_REF_DB[dtype]


@pytest.mark.parametrize("granularity", [PerToken(), PerTensor()], ids=repr)
def test_activation_cpu_route_is_fake_quant_then_weight_only(granularity):
    q, s = _weight(per_row=isinstance(granularity, PerToken))
    act = QuantSpec("float8_e4m3fn", granularity)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    xs = choose_qparams_float8(x, act)
    spec = QuantSpec("float8_e4m3fn", PerRow() if isinstance(granularity, PerToken) else PerTensor())
    want = float8_weight_only_linear(fake_quantize_float8(x, act, xs), q, s, None, spec_key(spec), "reference")
    assert torch.equal(float8_activation_linear(x, q, s, None, spec, act, "reference"), want)


def test_below_sm89_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    k8.scaled_mm_supported.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lowbit.kernels.float8"):
            assert k8.scaled_mm_supported(0) is False
        assert "compute capability (8, 0) < 8.9" in caplog.text and "fall back" in caplog.text
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
        k8.scaled_mm_supported.cache_clear()
        assert k8.scaled_mm_supported(0) is True
    finally:
        k8.scaled_mm_supported.cache_clear()


def test_gradient_flows_through_both_ops():
    q, s = _weight()
    x = torch.randn(3, 256, requires_grad=True)
    spec = QuantSpec("float8_e4m3fn", PerRow())
    float8_activation_linear(x, q, s, None, spec, QuantSpec("float8_e4m3fn", PerToken()), "auto").sum().backward()
    w = dequantize_float8(q, s, spec)
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1), atol=1e-5)


def test_bad_arguments():
    q, s = _weight()
    spec = QuantSpec("float8_e4m3fn", PerRow())
    key = spec_key(spec)
    with pytest.raises(ValueError, match=r"must be \(M, K\) and \(N, K\)"):
        float8_weight_only_linear(torch.randn(2, 100), q, s, None, key, "auto")
    with pytest.raises(TypeError, match="qdata must be float8"):
        float8_weight_only_linear(torch.randn(2, 256), q.float(), s, None, key, "auto")
    with pytest.raises(ValueError, match=r"scale must be \(N, 1\) or \(1, 1\)"):
        float8_weight_only_linear(torch.randn(2, 256), q, s.reshape(1, -1), None, key, "auto")
    with pytest.raises(ValueError, match="does not match qdata dtype"):
        float8_weight_only_linear(torch.randn(2, 256), q, s, None, spec_key(QuantSpec("float8_e5m2", PerRow())), "auto")
    with pytest.raises(ValueError, match="act_spec must be float8"):
        float8_activation_linear(torch.randn(2, 256), q, s, None, spec, QuantSpec("int8", PerToken()), "auto")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("act", ["dynamic-token", "dynamic-tensor", "static"])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_scaled_mm_path_matches_reference(act, m, device):
    """The ``_scaled_mm`` route called the way ``float8_activation_linear`` calls it (CUDA runs it
    on SM >= 8.9; torch's CPU ``_scaled_mm`` runs the same call here, so its arguments are checked
    on every machine, not only where a GPU is)."""
    if device == "cuda" and not k8.scaled_mm_supported(0):
        pytest.skip("float8 _scaled_mm needs compute capability >= 8.9")
    per_row = act == "dynamic-token"
    q, s = _weight(256, 512, per_row=per_row)
    q, s = q.to(device), s.to(device)
    act_spec = QuantSpec("float8_e4m3fn", PerToken() if per_row else PerTensor())
    act_scale = torch.tensor(0.01, device=device) if act == "static" else None
    x = torch.randn(m, 512, dtype=torch.bfloat16, device=device)
    spec = QuantSpec("float8_e4m3fn", PerRow() if per_row else PerTensor())
    ref = float8_activation_linear(x, q, s, None, spec, act_spec, "reference", act_scale=act_scale)
    out = k8._scaled_mm_path(x, q, s, None, act_spec, act_scale)
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == (m, 256)
    assert sqnr(ref.float(), out.float()) >= SCALED_MM_VS_REF_DB


@pytest.mark.parametrize("act", [False, True], ids=["weight-only", "dynamic"])
@pytest.mark.parametrize("m", [1, 2, 48, 200])  # 48, 200: above the AVX-512 build's tiled cap (32), the AVX2 one's (192)
def test_compiled_cpu_graph_runs_the_eager_route(act, m, compiled_vs_eager):
    """On CPU with no gradient wanted, a compiled float8 linear runs eager's route as one op and equals eager bit
    for bit: at M <= tiled_max_m() the C++-kernel ops lowbit_cpu::fp8_small_linear / fp8_small_act_linear, above it
    lowbit::float8_linear_cpu / lowbit::float8_act_linear_cpu (plain ops running the eager route in Python)."""
    from torch import nn

    from lowbit import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow, quantize_
    from lowbit.kernels._fp8_cpu import tiled_max_m

    torch.manual_seed(0)
    cfg = Float8DynamicActivationFloat8WeightConfig(PerRow()) if act else Float8WeightOnlyConfig()
    layer = quantize_(nn.Linear(256, 96).to(torch.bfloat16), cfg)
    eager, out, ops = compiled_vs_eager(layer, torch.randn(m, 256, dtype=torch.bfloat16))
    if m <= tiled_max_m():
        want = "lowbit_cpu::fp8_small_act_linear" if act else "lowbit_cpu::fp8_small_linear"
    else:
        want = "lowbit::float8_act_linear_cpu" if act else "lowbit::float8_linear_cpu"
    assert want in ops, sorted(o for o in ops if "lowbit" in o)
    assert torch.equal(out, eager)


@pytest.mark.parametrize("act", [False, True], ids=["weight-only", "dynamic"])
def test_compiled_graph_sees_a_nan_copied_into_the_weight(act):
    """The compiled small-M ops tell the GEMV the weight holds no NaN / inf byte from the extension's count,
    kept per version of qdata: a copy_ into the quantized weight after compiling bumps the version, and the
    NaN reaches the output row that uses it, as eager gives it."""
    from torch import nn

    from lowbit import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow, quantize_

    cfg = Float8DynamicActivationFloat8WeightConfig(PerRow()) if act else Float8WeightOnlyConfig()
    torch.manual_seed(0)
    layer, other = (quantize_(nn.Linear(256, 48).to(torch.bfloat16), cfg) for _ in range(2))
    other.weight.qdata.view(torch.uint8)[7, 3] = 0x7F  # e4m3fn NaN
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        assert bool(compiled(x).isfinite().all())
        layer.weight.copy_(other.weight)
        out = compiled(x)
        eager = layer(x)
    assert bool(out[0, 7].isnan()) and bool(out[0, torch.arange(48) != 7].isfinite().all())
    assert torch.equal(out.nan_to_num(), eager.nan_to_num())


def test_compiled_cpu_op_bodies_without_the_extension_are_the_reference(monkeypatch):
    from lowbit.kernels import _ext

    q, s = _weight()
    spec, act = QuantSpec("float8_e4m3fn", PerRow()), QuantSpec("float8_e4m3fn", PerToken())
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(_ext, "load", lambda name=None: None)
    ref = float8_weight_only_linear(x, q, s, None, spec_key(spec), "reference")
    assert torch.equal(k8._float8_linear_cpu(x, q, s, None, spec_key(spec)), ref)
    xf = fake_quantize_float8(x, act, choose_qparams_float8(x, act, check_finite=False))
    want = float8_weight_only_linear(xf, q, s, None, spec_key(spec), "reference")
    assert torch.equal(k8._float8_act_linear_cpu(x, q, s, None, spec_key(spec), spec_key(act)), want)
    from lowbit.kernels import _cpu_ops
    from lowbit.kernels._fp8_cpu import CHUNK_ROWS, GEMV_MAX_M, TILED_MAX_M

    tuning = (GEMV_MAX_M, TILED_MAX_M, CHUNK_ROWS)  # the small-M ops' bodies (once the extension has loaded, the
    # dispatcher sends CPU tensors to its kernels, whatever _ext.load says)
    assert torch.equal(_cpu_ops._fp8_small_linear(x, q, s, None, *tuning, spec_key(spec)), ref)
    assert torch.equal(_cpu_ops._fp8_small_act_linear(x, q, s, None, *tuning, True, act.eps, False, spec_key(spec),
                                                      spec_key(act)), want)
