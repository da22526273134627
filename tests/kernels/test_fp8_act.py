"""The one-pass C++ float8 activation fake quantization (``csrc/fp8_act.h``, in the ``int8_act``
kernel) equals the primitives' ``fake_quantize_float8`` bit for bit, and the float8-activation
linear uses it only where it applies."""

import pytest
import torch

from lowbit.configs import Float8DynamicActivationFloat8WeightConfig
from lowbit.granularity import PerRow, PerTensor, PerToken
from lowbit.kernels import _ext
from lowbit.kernels import float8 as f8
from lowbit.kernels._fp8_cpu import tiled_max_m
from lowbit.primitives.float8 import choose_qparams_float8, fake_quantize_float8
from lowbit.spec import QuantSpec

EXT = _ext.load("int8_act")
pytestmark = pytest.mark.skipif(getattr(EXT, "fake_quant_fp8", None) is None,
                                reason="C++ kernel int8_act with fake_quant_fp8 not available here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F8 = ["float8_e4m3fn", "float8_e5m2"]


def _spec(name, per_token):
    return QuantSpec(name, PerToken() if per_token else PerTensor(), symmetric=True)


def _x(m, k, dtype, seed=0):
    """Rows spanning 1e-7 .. 1e3 in magnitude, an all-zero row (the eps floor), odd K."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-7, 3, m).unsqueeze(1)
    x[min(1, m - 1)] = 0
    return x.to(dtype)


def _same(a, b):
    return torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0)) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", F8)
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4096), (9, 333), (33, 64)], ids=lambda s: "x".join(map(str, s)))
def test_dynamic_equals_the_primitives(dtype, name, per_token, shape):
    spec = _spec(name, per_token)
    x = _x(*shape, dtype)
    s = choose_qparams_float8(x, spec, check_finite=False)
    out, scale = EXT.fake_quant_fp8(x, -1.0, per_token, spec.eps, name == "float8_e5m2")
    assert out.dtype == dtype and _same(out, fake_quantize_float8(x, spec, s))
    assert torch.equal(scale, s.float().reshape(scale.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", F8)
def test_static_saturates_like_the_primitives(dtype, name):
    spec = _spec(name, False)
    x = _x(5, 130, dtype)
    for s in (1e-4, 0.02, 3.0):  # 1e-4: most values saturate at +-fmax
        ref = fake_quantize_float8(x, spec, torch.tensor([[s]]))
        out, scale = EXT.fake_quant_fp8(x, s, True, spec.eps, name == "float8_e5m2")
        assert _same(out, ref) and scale.item() == torch.tensor(s).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
def test_nan_and_inf_propagate_as_in_torch(dtype, per_token):
    spec = _spec("float8_e4m3fn", per_token)
    x = _x(4, 40, dtype)
    x[0, 3] = float("nan")
    x[2, 7] = float("inf")
    s = choose_qparams_float8(x, spec, check_finite=False)
    out, _ = EXT.fake_quant_fp8(x, -1.0, per_token, spec.eps, False)
    assert _same(out, fake_quantize_float8(x, spec, s))


@pytest.mark.parametrize("name", F8)
def test_the_rounding_equals_torchs_conversion_at_every_float8_value_midpoint_and_neighbour(name):
    """The kernel rounds with integer and float32 operations (round_f8), not c10's conversion: every
    float8 value, every midpoint between neighbours (the ties) and the float32 values 1-2 ulps either
    side, float32 subnormals, zeros of both signs and random values over every binade, through the
    static scale 1 (so the kernel rounds x itself), against torch's .to(float8)."""
    f8t = getattr(torch, name)
    fmax = torch.finfo(f8t).max
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f8t).float()
    vals = vals[torch.isfinite(vals)].unique().sort().values
    cand = torch.cat([vals, (vals[1:] + vals[:-1]) / 2]).view(torch.int32)
    near = torch.cat([(cand + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    near = near[~near.isnan()]  # -0.0's bits minus one are a NaN (NaN in, NaN out: tested above)
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(100_000, generator=gen) * 2 - 1
    spread = r * torch.exp2(torch.randint(-30, 10, (100_000,), generator=gen).float())
    x = torch.cat([near, spread, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, fmax, -fmax])]).clamp(-fmax, fmax)
    x = torch.cat([x, torch.zeros(-x.numel() % 64)]).reshape(-1, 64).contiguous()
    out, _ = EXT.fake_quant_fp8(x, 1.0, False, 1e-12, name == "float8_e5m2")
    assert torch.equal(out.view(torch.int32), x.to(f8t).float().view(torch.int32))


def test_bad_arguments_raise_naming_them():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        EXT.fake_quant_fp8(x.t(), -1.0, True, 1e-12, False)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        EXT.fake_quant_fp8(x.double(), -1.0, True, 1e-12, False)
    with pytest.raises(RuntimeError, match="x is empty"):
        EXT.fake_quant_fp8(torch.empty(0, 8), -1.0, True, 1e-12, False)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        EXT.fake_quant_fp8(x, -1.0, True, 0.0, False)
    with pytest.raises(RuntimeError, match="static_scale must be finite"):
        EXT.fake_quant_fp8(x, float("inf"), True, 1e-12, False)


# --- the float8-activation linear ---------------------------------------------------------------


def _weight(n, k):
    w = torch.randn(n, k)
    s = (w.abs().amax(1, keepdim=True) / 448).float()
    return (w / s).to(torch.float8_e4m3fn), s


def _spy(ran, name, fn):
    """fn, appending name to ran whenever it returns a tensor (it ran rather than declined)."""
    def wrapped(*args):
        out = fn(*args)
        if out is not None:
            ran.append(name)
        return out
    return wrapped


@pytest.mark.parametrize("granularity", [PerRow(), PerTensor()], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 5, 40, 200])  # 40 and 200: above the AVX-512 build's cap (32), the AVX2 one's (192)
def test_linear_uses_it_and_keeps_the_bits(monkeypatch, granularity, dtype, m):
    """M <= tiled_max_m(): the fake quantization inside the GEMV (one call); above: the one-pass kernel,
    then the weight-only kernel. Each equals the aten ops' route bit for bit."""
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    q, s = _weight(48, 200)
    x = _x(m, 200, dtype, seed=m)
    b = torch.randn(48).to(dtype)
    args = (x, q, s, b, config.weight_spec(), config.act_spec(), "auto")
    ran = []
    one_pass, in_gemv = f8._fake_quantize_cpu, f8.float8_act_linear_cpu

    monkeypatch.setattr(f8, "_fake_quantize_cpu", _spy(ran, "one-pass", one_pass))
    monkeypatch.setattr(f8, "float8_act_linear_cpu", _spy(ran, "in-gemv", in_gemv))
    with torch.no_grad():
        out = f8.float8_activation_linear(*args)
        assert ran == (["in-gemv"] if m <= tiled_max_m() else ["one-pass"])
        monkeypatch.setattr(f8, "float8_act_linear_cpu", lambda *a: None)  # two calls: one pass, then the GEMV
        assert torch.equal(out, f8.float8_activation_linear(*args))
        monkeypatch.setattr(f8, "_fake_quantize_cpu", lambda *a: None)  # the aten ops, then the GEMV
        assert torch.equal(out, f8.float8_activation_linear(*args))


def test_static_scale_and_the_cases_it_leaves_to_aten():
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())
    spec = config.act_spec()
    x = _x(3, 64, torch.bfloat16)
    out = f8._fake_quantize_cpu(x, spec, torch.tensor([0.05]))
    assert torch.equal(out, fake_quantize_float8(x, spec, torch.tensor([[0.05]])))
    assert f8._fake_quantize_cpu(x, spec, torch.tensor([0.0])) is None  # not a positive scale
    assert f8._fake_quantize_cpu(x.t().contiguous().t(), spec, None) is None  # not contiguous
    assert f8._fake_quantize_cpu(x.double(), spec, None) is None
    xr = x.float().requires_grad_()
    assert f8._fake_quantize_cpu(xr, spec, None) is None  # a gradient is wanted: the STE path
    with torch.no_grad():
        assert f8._fake_quantize_cpu(xr, spec, None) is not None
