"""Int4Tensor and Float8Tensor: fields, every op of the shared op set, errors."""

import io

import pytest
import torch
import torch.nn.functional as F

from lowbit.configs import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.packing import unpack_int4
from lowbit.spec import QuantSpec
from lowbit.tensors.float8_tensor import Float8Tensor
from lowbit.tensors.int4_tensor import Int4Tensor

# weight SQNR vs float for N(0, 1) weights (measured: int4 g32 asym 20.3, sym 19.6; e4m3 per row 31.3, e5m2 25.1)
INT4_WEIGHT_DB = 19.0
E4M3_WEIGHT_DB = 30.0
E5M2_WEIGHT_DB = 24.0
FAST_VS_DEQUANT_LINEAR_DB = 60.0  # float32 input: the fast kernels against F.linear of the dequantized weight

def _int4(g=32, **fields):
    """The int4 weight spec of ``Int4WeightOnlyConfig(group_size=g, **fields)`` (the one statement of it)."""
    return Int4WeightOnlyConfig(group_size=g, **fields).weight_spec()


MAKERS = {
    "int4-asym": lambda w: Int4Tensor.from_float(w, _int4()),
    "int4-sym": lambda w: Int4Tensor.from_float(w, _int4(symmetric=True)),
    "int4-floatzp": lambda w: Int4Tensor.from_float(w, _int4(zero_point_domain="float")),
    "int4-fp8rule": lambda w: Int4Tensor.from_float(
        w, Float8DynamicActivationInt4WeightConfig(group_size=32).weight_spec(), scale_rule="float8_then_int4"),
    "fp8-row": lambda w: Float8Tensor.from_float(w, QuantSpec("float8_e4m3fn", PerRow())),
    "fp8-tensor": lambda w: Float8Tensor.from_float(w, QuantSpec("float8_e5m2", PerTensor())),
}


def _w(shape=(64, 128), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape).to(dtype)


def test_int4_fields_and_packing():
    w = _w()
    t = Int4Tensor.from_float(w, _int4())
    assert t.shape == (64, 128) and t.dtype == torch.float32 and t.group_size == 32
    assert t.qdata.shape == (64, 64) and t.qdata.dtype == torch.uint8
    assert t.scale.shape == (64, 4) and t.scale.dtype == torch.float32
    assert t.zero_point.dtype == torch.int8 and int(t.zero_point.min()) >= 0 and int(t.zero_point.max()) <= 15
    assert t.block_size == (1, 32)
    q = unpack_int4(t.qdata, signed=False)
    assert int(q.max()) <= 15
    assert sqnr(w, t.dequantize()) >= INT4_WEIGHT_DB
    s = Int4Tensor.from_float(w, _int4(symmetric=True))
    assert s.zero_point is None and int(unpack_int4(s.qdata, signed=True).min()) >= -8
    assert sqnr(w, s.dequantize()) >= INT4_WEIGHT_DB
    bf = Int4Tensor.from_float(w.bfloat16(), _int4(64))
    assert bf.dtype == torch.bfloat16 and bf.scale.dtype == torch.float32 and bf.dequantize().dtype == torch.bfloat16


def test_float8_fields():
    w = _w()
    t = MAKERS["fp8-row"](w)
    assert t.qdata.dtype == torch.float8_e4m3fn and t.scale.shape == (64, 1) and t.scale.dtype == torch.float32
    assert sqnr(w, t.dequantize()) >= E4M3_WEIGHT_DB
    u = MAKERS["fp8-tensor"](w)
    assert u.qdata.dtype == torch.float8_e5m2 and u.scale.shape == (1, 1)
    assert sqnr(w, u.dequantize()) >= E5M2_WEIGHT_DB


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("dim,start,length", [(0, 8, 32), (0, 48, 16), (1, 32, 64), (1, 0, 64)])
def test_narrow_matches_dequantize_then_narrow(name, dim, start, length):
    t = MAKERS[name](_w())
    got = t.narrow(dim, start, length)
    assert type(got) is type(t) and got.shape == t.dequantize().narrow(dim, start, length).shape
    assert torch.equal(got.dequantize(), t.dequantize().narrow(dim, start, length))
    assert torch.equal(t[8:40].dequantize(), t.dequantize()[8:40])
    assert torch.equal(t[-16:].dequantize(), t.dequantize()[-16:])


@pytest.mark.parametrize("name", ["int4-asym", "int4-sym"])
def test_int4_slice_errors(name):
    t = MAKERS[name](_w())
    with pytest.raises(ValueError, match="cuts through a quantization block of 32"):
        t[:, 16:48]
    with pytest.raises(NotImplementedError, match="select on the packed last dim"):
        t.select(1, 3)


@pytest.mark.parametrize("name", list(MAKERS))
def test_select_index_index_select_embedding(name):
    t = MAKERS[name](_w())
    ref = t.dequantize()
    assert torch.equal(t[5].dequantize(), ref[5])
    idx = torch.tensor([3, 0, 63])
    assert torch.equal(t[idx].dequantize(), ref[idx])
    assert torch.equal(t.index_select(0, idx).dequantize(), ref[idx])
    assert torch.equal(t[idx.reshape(3, 1)].dequantize(), ref[idx.reshape(3, 1)])
    tokens = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(F.embedding(tokens, t), ref[tokens])


@pytest.mark.parametrize("name", list(MAKERS))
def test_view_reshape(name):
    t = MAKERS[name](_w())
    v = t.view(2, 32, 128)
    assert v.shape == (2, 32, 128) and torch.equal(v.dequantize(), t.dequantize().view(2, 32, 128))
    assert torch.equal(v.reshape(64, 128).dequantize(), t.dequantize())


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_linear_any_input_rank(name, rank):
    t = MAKERS[name](_w())
    x = torch.randn(*([2] * (rank - 1)), 128)
    ref = F.linear(x, t.dequantize())
    out = F.linear(x, t)
    assert out.shape == ref.shape
    assert sqnr(ref, out) >= FAST_VS_DEQUANT_LINEAR_DB


def test_float8_t_mm_addmm_and_int4_t_raises():
    t = MAKERS["fp8-row"](_w())
    x = torch.randn(3, 128)
    b = torch.randn(64)
    ref = x @ t.dequantize().t()
    assert sqnr(ref, torch.mm(x, t.t())) > 60
    assert sqnr(ref + b, torch.addmm(b, x, t.t())) > 60
    with pytest.raises(NotImplementedError, match="packed along in_features"):
        MAKERS["int4-asym"](_w()).t()


@pytest.mark.parametrize("name", list(MAKERS))
def test_detach_clone_to_copy_and_torch_save(name):
    t = MAKERS[name](_w())
    for u in (t.detach(), t.clone(), t.to("cpu"), t.contiguous()):
        assert type(u) is type(t) and torch.equal(u.dequantize(), t.dequantize())
    b = t.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b.qdata, t.qdata)
    other = MAKERS[name](_w(seed=1))
    other.copy_(t)
    assert torch.equal(other.dequantize(), t.dequantize())
    with pytest.raises(ValueError, match="same class and layout"):
        MAKERS[name](_w((32, 128))).copy_(t)
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["w"]
    assert type(back) is type(t) and torch.equal(back.dequantize(), t.dequantize())


@pytest.mark.parametrize("name", list(MAKERS))
def test_compile_fullgraph(name):
    t = MAKERS[name](_w(dtype=torch.bfloat16))
    lin = torch.nn.Linear(128, 64, dtype=torch.bfloat16)
    lin.weight = torch.nn.Parameter(t, requires_grad=False)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    eager = lin(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(lin, fullgraph=True)(x), eager)


@pytest.mark.parametrize("name", list(MAKERS))
def test_unsupported_op_names_class_and_op(name):
    t = MAKERS[name](_w())
    with pytest.raises(NotImplementedError, match=f"{type(t).__name__} does not support aten.add"):
        t + 1


def test_from_float_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by group_size=128"):
        Int4Tensor.from_float(torch.randn(8, 96), _int4(128))
    with pytest.raises(ValueError, match="last dim must be even"):
        Int4Tensor.from_float(torch.randn(8, 33), _int4())
    with pytest.raises(ValueError, match=r"spec.granularity=PerGroup\(group_size=48\); allowed"):
        Int4Tensor.from_float(torch.randn(8, 96), QuantSpec("int4", PerGroup(48)))
    with pytest.raises(ValueError, match=r"scale_rule='maxabs' needs spec=int4_maxabs_spec\(32\)"):
        Int4Tensor.from_float(torch.randn(8, 64), _int4(), scale_rule="maxabs")
    with pytest.raises(ValueError, match="stores asymmetric weights as uint4"):
        Int4Tensor.from_float(torch.randn(8, 64), QuantSpec("int4", PerGroup(32), symmetric=False))
    with pytest.raises(ValueError, match="symmetric int4 or asymmetric uint4, got spec.dtype=int8"):
        Int4Tensor.from_float(torch.randn(8, 64), QuantSpec("int8", PerGroup(32)))
    with pytest.raises(ValueError, match="does not match zero_point_domain='float'"):
        Int4Tensor.from_float(torch.randn(8, 64), QuantSpec("uint4", PerGroup(32), symmetric=False,
                                                            zero_point_domain="float", zero_point_dtype=torch.int8))
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        Int4Tensor.from_float(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="scale_rule='minmaxx'"):
        Int4Tensor.from_float(torch.randn(8, 64), _int4(), scale_rule="minmaxx")
    with pytest.raises(ValueError, match="per-token activations only"):
        Int4Tensor.from_float(torch.randn(8, 64), _int4(), act_spec=QuantSpec("int8"))
    with pytest.raises(ValueError, match="needs a float8 spec"):
        Float8Tensor.from_float(torch.randn(8, 64), QuantSpec("int8"))
    with pytest.raises(ValueError, match="allowed: PerRow"):
        Float8Tensor.from_float(torch.randn(8, 64), QuantSpec("float8_e4m3fn", PerToken()))
    with pytest.raises(ValueError, match="takes float8 PerToken"):
        Float8Tensor.from_float(torch.randn(8, 64), QuantSpec("float8_e4m3fn", PerRow()),
                                act_spec=QuantSpec("float8_e4m3fn", PerTensor()))


def test_linear_input_errors():
    t = MAKERS["int4-asym"](_w())
    with pytest.raises(ValueError, match="does not end in in_features=128"):
        F.linear(torch.randn(2, 64), t)
    with pytest.raises(TypeError, match="cast one"):
        F.linear(torch.randn(2, 128, dtype=torch.bfloat16), t)


@pytest.mark.parametrize("name", list(MAKERS))
def test_kernel_preference_reference_is_dequantize_then_linear(name):
    t = MAKERS[name](_w(dtype=torch.bfloat16))
    ref = t._replace(kernel=KernelPreference.REFERENCE)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    if t.act_spec is None:
        assert torch.equal(F.linear(x, ref), F.linear(x, t.dequantize()))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_bias_of_another_dtype_is_refused(kind):
    """F.linear refuses a bias whose dtype is not the input's; the kernels would promote the output (and a compiled
    graph's fake kernels say the input's dtype), so every layout refuses it, naming both dtypes."""
    t = MAKERS[kind](_w(dtype=torch.bfloat16))
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bias dtype torch.float32 != input dtype torch.bfloat16"):
        F.linear(x, t, torch.zeros(64))
    assert F.linear(x, t, torch.zeros(64, dtype=torch.bfloat16)).dtype == torch.bfloat16
