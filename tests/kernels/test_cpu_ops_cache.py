"""The lowbit_cpu:: dispatcher ops (lowbit/kernels/_cpu_ops.py) exist in every process: their PyTorch body
equals the reference, the C++ kernel takes over once the extension loads, and a compiled graph cached by
a process with the extension runs in one without it (LOWBIT_NO_EXT=1)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowbit import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig,
                    Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerGroup, PerRow, PerTensor, quantize_)
from lowbit.eval.metrics import sqnr
from lowbit.kernels import host
from lowbit.kernels import _cpu_ops, _ext
from lowbit.kernels.int4 import int4_linear, int4_weight_only_linear
from lowbit.kernels.int8 import int8_weight_only_linear
from lowbit.spec import spec_key

# bf16 kernel vs reference bounds, the same as tests/kernels/test_int8.py (WEIGHT_ONLY_FAST_VS_REF_DB) and
# tests/kernels/test_int4.py (AUTO_VS_REF_DB): the C++ GEMVs accumulate in float32 on the unrounded weight
INT8_VS_REF_DB = 44.0
INT4_VS_REF_DB = 40.0

OPS = ("lowbit_cpu::int8_weight_only_mm", "lowbit_cpu::int4_gemv_bf16", "lowbit_cpu::int8_int4_dynamic_linear",
       "lowbit_cpu::w8a8_dynamic_linear", "lowbit_cpu::fp8_small_linear", "lowbit_cpu::fp8_small_act_linear")


def _int8_layer(granularity, dtype=torch.bfloat16, n=96, k=256):
    torch.manual_seed(0)
    m = nn.Linear(k, n).to(dtype)
    return quantize_(m, Int8WeightOnlyConfig(granularity) if granularity else Int8WeightOnlyConfig())


def _int4_layer(symmetric, n=96, k=256, g=64):
    torch.manual_seed(0)
    return quantize_(nn.Linear(k, n).to(torch.bfloat16), Int4WeightOnlyConfig(group_size=g, symmetric=symmetric))


def test_ops_have_a_pytorch_body_and_a_fake_kernel():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _int8_layer(None).weight
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = _cpu_ops.int8_weight_only_mm(torch.empty(3, 256, dtype=torch.bfloat16), w.qdata, w.scale.expand(96, -1))
    assert out.shape == (3, 96) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("granularity", [None, PerGroup(32), PerTensor()], ids=["row", "g32", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_int8_body_without_the_extension_is_eager_without_it(monkeypatch, granularity, dtype, bias, m):
    """Without the extension the op's body runs what eager's custom op runs there (``torch._weight_int8pack_mm``
    at small M on a bf16 per-row weight, converted chunks elsewhere, the bias where each adds it): bit for bit,
    so a graph holding the op computes eager's values in a process without the extension; both near the reference."""
    _ext.load("int8_gemv")  # the loader's record exists before it is patched out
    monkeypatch.setattr(_ext, "load", lambda name="int8_gemv": None)
    layer = _int8_layer(granularity, dtype)
    w, b = layer.weight, layer.bias if bias else None
    x = torch.randn(m, 256, dtype=dtype)
    eager = int8_weight_only_linear(x, w.qdata, w.scale, None, b, spec_key(w.spec), "auto")
    got = _cpu_ops._int8_weight_only_mm(x, w.qdata, w.scale.expand(96, -1), b)
    assert torch.equal(got, eager)
    ref = int8_weight_only_linear(x, w.qdata, w.scale, None, b, spec_key(w.spec), "reference")
    assert sqnr(ref.float(), got.float()) >= INT8_VS_REF_DB


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 4])
def test_int4_body_without_the_extension_is_the_reference(monkeypatch, symmetric, bias, m):
    monkeypatch.setattr(_ext, "load", lambda name="int4_cpu": None)
    layer = _int4_layer(symmetric)
    w, b = layer.weight, layer.bias if bias else None
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    ref = int4_weight_only_linear(x, w.qdata, w.scale, w.zero_point, b, spec_key(w.spec), "reference")
    assert torch.equal(_cpu_ops._int4_gemv_bf16(x, w.qdata, w.scale, w.zero_point, b), ref)


def _8da4w_layer(n=96, k=256, g=32):
    torch.manual_seed(0)
    return quantize_(nn.Linear(k, n).to(torch.bfloat16), Int8DynamicActivationInt4WeightConfig(group_size=g))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 5])
def test_int8_int4_body_without_the_extension_is_the_reference(monkeypatch, bias, m):
    """Without the extension the 8da4w op's body is int4_linear's reference: the activation fake-quantized by the
    primitives, then the dequantized weight (bit for bit)."""
    monkeypatch.setattr(_ext, "load", lambda name="int8_int4": None)
    layer = _8da4w_layer()
    w, b = layer.weight, layer.bias if bias else None
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    ref = int4_linear(x, w.qdata, w.scale, None, b, w.spec, w.act_spec, "reference")
    a = w.act_spec
    got = _cpu_ops._int8_int4_dynamic_linear(x, w.qdata, w.scale, b, a.qmin, a.qmax, a.eps, spec_key(a))
    assert torch.equal(got, ref)


def test_compiled_8da4w_calls_the_op_and_equals_eager():
    """A compiled 8da4w layer runs lowbit_cpu::int8_int4_dynamic_linear (the integer kernel, not the activation
    fake-quantized in the graph and the int4 float GEMV), with eager's values bit for bit, also for an input
    holding NaN (which the fused entry declines: the body then takes the primitives' quantization)."""
    if _ext.load("int8_int4") is None:
        pytest.skip(f"C++ kernels not available here ({_ext.status()})")
    layer = _8da4w_layer()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    xn = x.clone()
    xn[1, 7] = float("nan")
    with torch.no_grad():
        eager, eager_nan = layer(x), layer(xn)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, out_nan = compiled(x), compiled(xn)
    assert "lowbit_cpu::int8_int4_dynamic_linear" in {e.name for e in prof.events()}
    assert torch.equal(out, eager)
    assert torch.equal(out_nan, eager_nan) or (torch.equal(out_nan[[0, 2]], eager_nan[[0, 2]])
                                               and out_nan[1].isnan().all() and eager_nan[1].isnan().all())


def _w8a8_layer(n=96, k=256):
    torch.manual_seed(0)
    return quantize_(nn.Linear(k, n).to(torch.bfloat16), Int8DynamicActivationInt8WeightConfig())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_w8a8_body_without_the_entry_is_the_aten_route(monkeypatch, bias):
    """Where the one-call entry is missing (the AVX-512 build, or no extension) the op's body runs w8a8.py's aten
    route."""
    from lowbit.kernels.w8a8 import _activation_forward_aten

    layer = _w8a8_layer()
    w, b = layer.weight, layer.bias if bias else None
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(_cpu_ops, "_w8a8_entry", lambda: None)
    want = _activation_forward_aten(x, w.qdata, w.scale, b, None, None, w.act_spec, w.spec, "auto")
    got = _cpu_ops._w8a8_dynamic_linear(x, w.qdata, w.scale.expand(96, 1).reshape(-1), b, w.act_spec.eps,
                                        spec_key(w.act_spec), spec_key(w.spec))
    assert torch.equal(got, want)


def test_compiled_w8a8_calls_the_op_and_equals_eager(monkeypatch, compiled_vs_eager):
    """Where the build has the one-call W8A8 entry (AVX2: no int8 dot products), a compiled dynamic W8A8 layer runs
    lowbit_cpu::w8a8_dynamic_linear, with eager's values bit for bit."""
    if getattr(_ext.load("int8_act"), "w8a8_dynamic_linear", None) is None:
        pytest.skip(f"no one-call W8A8 entry in this build ({_ext.status()})")
    monkeypatch.setenv(host.INT8_ENV, "float32")  # what an AVX2 host reports; the entry is taken only there
    eager, out, ops = compiled_vs_eager(_w8a8_layer(), torch.randn(3, 256, dtype=torch.bfloat16))
    assert "lowbit_cpu::w8a8_dynamic_linear" in ops
    assert torch.equal(out, eager)


def test_body_rejects_a_scale_that_does_not_divide_k(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda name="int8_gemv": None)
    w = _int8_layer(None).weight
    with pytest.raises(ValueError, match=r"int8_weight_only_mm: scale \(96, 3\) must be \(N, groups\)"):
        _cpu_ops._int8_weight_only_mm(torch.randn(1, 256), w.qdata, torch.ones(96, 3))


def test_loaded_extension_serves_the_ops_bit_for_bit(monkeypatch):
    e8, e4 = _ext.load("int8_gemv"), _ext.load("int4_cpu")
    if e8 is None or e4 is None:
        pytest.skip(f"C++ kernels not available here ({_ext.status()})")
    w8, l4 = _int8_layer(PerGroup(32)).weight, _int4_layer(False)
    w4 = l4.weight
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    s8 = w8.scale.expand(96, -1)
    want8, want4 = e8.int8_weight_only_mm(x, w8.qdata, s8), e4.gemv_bf16(x, w4.qdata, w4.scale, w4.zero_point, l4.bias)
    # the body, reached before the extension's CPU kernel is registered, calls the same C++ function
    assert torch.equal(_cpu_ops._int8_weight_only_mm(x, w8.qdata, s8), want8)
    assert torch.equal(_cpu_ops._int4_gemv_bf16(x, w4.qdata, w4.scale, w4.zero_point, l4.bias), want4)

    def no_body(name="int8_gemv"):
        raise AssertionError("the PyTorch body ran although the extension's CPU kernel is registered")

    e84, ef8 = _ext.load("int8_int4"), _ext.load("fp8_cpu")
    l84 = _8da4w_layer()
    w84, a = l84.weight, l84.weight.act_spec
    xn = x.clone()
    xn[0, 3] = float("inf")  # a row the fused entry declines: the op's kernel gives it NaN, the other row as eager
    with torch.no_grad():
        want84, want84n = l84(x), l84(xn)
    f8 = quantize_(nn.Linear(256, 96).to(torch.bfloat16), Float8DynamicActivationFloat8WeightConfig(PerRow())).weight
    f8_args = (f8.qdata, f8.scale, None, 4, 32, 256)
    f8_act = (True, f8.act_spec.eps, False, spec_key(f8.spec), spec_key(f8.act_spec))
    if ef8 is not None:
        want_f8 = ef8.fp8_linear(x, *f8_args, True)
        want_f8a = ef8.fp8_linear_act(x, *f8_args, *f8_act[:3], True)
        assert torch.equal(_cpu_ops._fp8_small_linear(x, *f8_args, spec_key(f8.spec)), want_f8)  # the body
        assert torch.equal(_cpu_ops._fp8_small_act_linear(x, *f8_args, *f8_act), want_f8a)

    monkeypatch.setattr(_ext, "load", no_body)  # the dispatcher must go straight to the C++ kernel
    assert torch.equal(_cpu_ops.int8_weight_only_mm(x, w8.qdata, s8), want8)
    assert torch.equal(_cpu_ops.int4_gemv_bf16(x, w4.qdata, w4.scale, w4.zero_point, l4.bias), want4)
    if e84 is not None:
        args = (w84.qdata, w84.scale, l84.bias, a.qmin, a.qmax, a.eps, spec_key(a))
        assert torch.equal(_cpu_ops.int8_int4_dynamic_linear(x, *args), want84)
        got = _cpu_ops.int8_int4_dynamic_linear(xn, *args)
        assert got[0].isnan().all() and want84n[0].isnan().all() and torch.equal(got[1], want84n[1])
    if ef8 is not None:
        assert torch.equal(_cpu_ops.fp8_small_linear(x, *f8_args, spec_key(f8.spec)), want_f8)
        assert torch.equal(_cpu_ops.fp8_small_act_linear(x, *f8_args, *f8_act), want_f8a)


# --- a graph compiled (and cached) with the extension, run by a process without it ----------------

_CHILD = r"""
import json, torch
from torch import nn
from torch._dynamo.utils import counters
from lowbit import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from lowbit.eval.metrics import sqnr
from lowbit.kernels import _ext
from lowbit.kernels.int4 import int4_weight_only_linear
from lowbit.kernels.int8 import int8_weight_only_linear
from lowbit.spec import spec_key

out = {"status": {k: _ext.status()[k] for k in ("int8_gemv", "int4_cpu")}, "sqnr": {}, "ops": []}
layers = {}
for name, cfg, ref_op in [("int8", Int8WeightOnlyConfig(), int8_weight_only_linear),
                          ("int4", Int4WeightOnlyConfig(group_size=64), int4_weight_only_linear)]:
    torch.manual_seed(0)
    layer = quantize_(nn.Linear(256, 96).to(torch.bfloat16), cfg)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    w = layer.weight
    with torch.no_grad():
        ref = ref_op(x, w.qdata, w.scale, w.zero_point, layer.bias, spec_key(w.spec), "reference")
        compiled = torch.compile(layer, fullgraph=True)
        compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = compiled(x)
    out["sqnr"][name] = sqnr(ref.float(), y.float())
    out["ops"] += sorted({e.name for e in prof.events() if e.name.startswith("lowbit_cpu::")})
out["fxgraph_cache_hit"] = counters["inductor"]["fxgraph_cache_hit"]
print("RESULT " + json.dumps(out))
"""


def _run_child(env: dict, code: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code or _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def test_graph_cached_with_the_extension_runs_without_it(tmp_path):
    if _ext.load("int8_gemv") is None or _ext.load("int4_cpu") is None:
        pytest.skip(f"C++ kernels not available here ({_ext.status()})")
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_NO_EXT"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    with_ext = _run_child(env)
    without = _run_child({**env, "LOWBIT_NO_EXT": "1"})
    assert all(s.startswith("ok") for s in with_ext["status"].values()), with_ext["status"]
    assert all(s == _ext.DISABLED for s in without["status"].values()), without["status"]
    # the first process's graphs call the C++ ops (int8 at M = 2 only where its GEMV takes M = 2: AVX2)
    assert "lowbit_cpu::int4_gemv_bf16" in with_ext["ops"], with_ext["ops"]
    assert without["fxgraph_cache_hit"] >= 2, without  # the second reused both graphs: the ops, no extension
    assert without["ops"] == with_ext["ops"]
    for run in (with_ext, without):
        assert run["sqnr"]["int8"] >= INT8_VS_REF_DB and run["sqnr"]["int4"] >= INT4_VS_REF_DB, run["sqnr"]


def test_graph_compiled_without_the_extension_holds_the_same_ops(tmp_path):
    """Int4's and int8 weight-only's routes in a graph are chosen from the build this CPU runs, not from whether the
    extension loaded: a graph traced under LOWBIT_NO_EXT=1 (its own inductor cache) calls the same C++-kernel ops as
    one traced with it, so either can be served to the other by torch.compile's caches (README design note)."""
    if _ext.load("int8_gemv") is None or _ext.load("int4_cpu") is None:
        pytest.skip(f"C++ kernels not available here ({_ext.status()})")
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_NO_EXT"}
    with_ext = _run_child({**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "with")})
    without = _run_child({**env, "LOWBIT_NO_EXT": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "without")})
    assert all(s == _ext.DISABLED for s in without["status"].values()), without["status"]
    assert with_ext["ops"] == ["lowbit_cpu::int8_weight_only_mm", "lowbit_cpu::int4_gemv_bf16"], with_ext["ops"]
    assert without["ops"] == with_ext["ops"], without["ops"]
    for run in (with_ext, without):
        assert run["sqnr"]["int8"] >= INT8_VS_REF_DB and run["sqnr"]["int4"] >= INT4_VS_REF_DB, run["sqnr"]


_FIRST_CALL = r"""
import torch
from lowbit.kernels import _cpu_ops, _ext
assert not {"int8_gemv", "int4_cpu"} & set(_ext._LOADED)
torch.manual_seed(0)
x, w, s = torch.randn(2, 256, dtype=torch.bfloat16), torch.randint(-127, 128, (96, 256), dtype=torch.int8), torch.rand(96, 4)
q, zp = torch.randint(0, 256, (96, 128), dtype=torch.uint8), torch.randint(0, 16, (96, 4), dtype=torch.int8)
first8, first4 = _cpu_ops.int8_weight_only_mm(x, w, s), _cpu_ops.int4_gemv_bf16(x, q, s, zp, None)  # bodies: load
want8, want4 = _ext.load("int8_gemv").int8_weight_only_mm(x, w, s), _ext.load("int4_cpu").gemv_bf16(x, q, s, zp, None)
assert torch.equal(first8, want8) and torch.equal(first4, want4)
assert torch.equal(_cpu_ops.int8_weight_only_mm(x, w, s), want8) and torch.equal(_cpu_ops.int4_gemv_bf16(x, q, s, zp, None), want4)
print("RESULT {}")
"""


def test_first_call_in_a_fresh_process_loads_the_extension():
    """What a process that finds a cached graph does first: the op's body loads the extension (which
    registers the CPU kernel while the op is being dispatched) and answers with the C++ kernel's values."""
    if _ext.load("int8_gemv") is None or _ext.load("int4_cpu") is None:
        pytest.skip(f"C++ kernels not available here ({_ext.status()})")
    _run_child({k: v for k, v in os.environ.items() if k != "LOWBIT_NO_EXT"}, _FIRST_CALL)
