import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.kernels.preference import KernelPreference
from lowbit.spec import QuantSpec
from lowbit.tensors.int8_tensor import Int8Tensor

# a 4096 x 4096 bf16 linear against its bf16 output (issue targets; measured 40.7 and 37.8 dB)
WEIGHT_ONLY_4096_MIN_DB = 40.0
W8A8_4096_MIN_DB = 30.0


def _w(shape=(64, 128), seed=0, granularity=PerRow(), **kw):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return w, Int8Tensor.from_float(w, QuantSpec("int8", granularity), **kw)


@pytest.mark.parametrize("act", [False, True], ids=["weight-only", "w8a8"])
def test_4096_linear_sqnr(act):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, 4096, generator=g) * 0.02).bfloat16()
    x = torch.randn(8, 4096, generator=g).bfloat16()
    t = Int8Tensor.from_float(w, QuantSpec("int8", PerRow()), act_spec=QuantSpec("int8", PerToken()) if act else None)
    ref = F.linear(x, w)
    assert sqnr(ref.float(), F.linear(x, t).float()) >= (W8A8_4096_MIN_DB if act else WEIGHT_ONLY_4096_MIN_DB)


def test_fields_and_dequantize():
    w, t = _w(granularity=PerGroup(32))
    assert t.qdata.dtype == torch.int8 and t.scale.dtype == torch.float32 and t.scale.shape == (64, 4)
    assert t.block_size == (1, 32) and t.zero_point is None and t.dtype == torch.float32
    assert sqnr(w, t.dequantize()) > 40
    assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert "Int8Tensor(shape=(64, 128)" in repr(t)


def test_bf16_weight_keeps_float32_scale():
    _, t = _w()
    tb = Int8Tensor.from_float(torch.randn(8, 16).bfloat16(), QuantSpec("int8", PerRow()))
    assert tb.scale.dtype == torch.float32 and tb.dtype == torch.bfloat16 and t.scale.dtype == torch.float32


@pytest.mark.parametrize("granularity", [PerRow(), PerGroup(32), PerTensor()], ids=repr)
@pytest.mark.parametrize(
    "dim,start,end", [(0, 8, 24), (1, 32, 96), (0, 0, 64), (1, -64, None)], ids=["rows", "cols", "all", "neg"]
)
def test_slice_matches_dequantize_then_slice(granularity, dim, start, end):
    _, t = _w(granularity=granularity)
    idx = [slice(None)] * 2
    idx[dim] = slice(start, end)
    s = t[tuple(idx)]
    assert isinstance(s, Int8Tensor)
    assert torch.equal(s.dequantize(), t.dequantize()[tuple(idx)])
    n = torch.narrow(t, dim, 32, 32)
    assert torch.equal(n.dequantize(), torch.narrow(t.dequantize(), dim, 32, 32))


def test_embedding_of_an_activation_quantized_tensor_reads_the_weight():
    """A lookup has no activation: a W8A8 tensor (a head tied to an embedding) gives the rows of the weight it
    stands for, SmoothQuant's act_pre_scale included (as dequantize() has it)."""
    _, t = _w(act_spec=QuantSpec("int8", PerToken()))
    ids = torch.tensor([[1, 2], [3, 63]])
    assert torch.equal(F.embedding(ids, t), t.dequantize()[ids])
    pre = t._replace(act_pre_scale=torch.rand(1, 128, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert not torch.equal(pre.dequantize(), t.dequantize())
    assert torch.equal(F.embedding(ids, pre), pre.dequantize()[ids])


def test_slice_through_a_block_raises():
    _, t = _w(granularity=PerGroup(32))
    with pytest.raises(ValueError, match="cuts through a quantization block of 32"):
        t[:, 10:40]
    with pytest.raises(NotImplementedError, match="step=2"):
        t[::2]


def test_select_index_index_select_embedding():
    _, t = _w(granularity=PerGroup(32))
    d = t.dequantize()
    assert torch.equal(t[3].dequantize(), d[3])
    assert torch.equal(t[-1].dequantize(), d[-1])
    idx = torch.tensor([5, 0, 63])
    assert torch.equal(t[idx].dequantize(), d[idx])
    assert torch.equal(t.index_select(0, idx).dequantize(), d.index_select(0, idx))
    ids = torch.tensor([[1, 2], [3, 63]])
    assert torch.equal(F.embedding(ids, t), F.embedding(ids, d))
    with pytest.raises(NotImplementedError, match="dim 0"):
        t.index_select(1, idx)


def test_view_reshape():
    _, t = _w(shape=(4, 16, 32))  # per-row over the last dim: leading dims may fold
    v = t.reshape(64, 32)
    assert torch.equal(v.dequantize(), t.dequantize().reshape(64, 32))
    assert torch.equal(v.view(4, 16, 32).dequantize(), t.dequantize())
    _, p = _w(granularity=PerTensor())
    assert torch.equal(p.reshape(-1).dequantize(), p.dequantize().reshape(-1))
    with pytest.raises(ValueError, match="cannot view Int8Tensor"):
        t.reshape(4, 512)


def test_t_mm_addmm():
    w, t = _w()
    x = torch.randn(5, 128)
    b = torch.randn(64)
    ref = F.linear(x, t.dequantize(), b)
    assert torch.allclose(x @ t.t(), ref - b, atol=1e-4)
    assert torch.allclose(torch.addmm(b, x, t.t()), ref, atol=1e-4)
    assert torch.equal(t.t().t().dequantize(), t.dequantize())


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_linear_any_input_rank(rank):
    _, t = _w()
    x = torch.randn(*([2] * (rank - 1)), 128)
    out = F.linear(x, t)
    assert out.shape == (*x.shape[:-1], 64)
    assert sqnr(F.linear(x, t.dequantize()), out) > 100


def test_detach_clone_to_copy():
    _, t = _w()
    c = t.clone()
    assert torch.equal(c.qdata, t.qdata) and c.qdata.data_ptr() != t.qdata.data_ptr()
    assert t.detach().qdata.data_ptr() == t.qdata.data_ptr()
    b = t.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b.qdata, t.qdata) and b.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="only a floating dtype"):
        t.to(torch.int8)
    _, other = _w(seed=1)
    t2 = t.clone()
    t2.copy_(other)
    assert torch.equal(t2.qdata, other.qdata)
    _, group = _w(granularity=PerGroup(32))
    with pytest.raises(ValueError, match="same class and layout"):
        t2.copy_(group)


def test_module_to_dtype_and_parameter():
    m = nn.Linear(128, 64)
    _, t = _w()
    m.weight = nn.Parameter(t, requires_grad=False)
    m.to(torch.bfloat16)
    assert isinstance(m.weight, Int8Tensor) and m.weight.dtype == torch.bfloat16
    assert m(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_unsupported_op_names_class_and_op():
    _, t = _w()
    with pytest.raises(NotImplementedError, match=r"Int8Tensor does not support aten\.add\.Tensor"):
        t + 1
    with pytest.raises(NotImplementedError, match=r"aten\.mul"):
        t * 2


def test_input_dtype_mismatch_and_bad_shapes():
    _, t = _w()
    with pytest.raises(TypeError, match="input dtype torch.bfloat16 != weight dtype torch.float32"):
        F.linear(torch.randn(2, 128, dtype=torch.bfloat16), t)
    with pytest.raises(ValueError, match="in_features=128"):
        F.linear(torch.randn(2, 100), t)
    # a bias of another dtype: F.linear refuses it on float tensors; the kernels would promote the output silently
    # (and a compiled graph's fake kernels say x's dtype)
    with pytest.raises(TypeError, match="bias dtype torch.bfloat16 != input dtype torch.float32"):
        F.linear(torch.randn(2, 128), t, torch.zeros(t.shape[0], dtype=torch.bfloat16))


def test_from_float_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="int8 spec"):
        Int8Tensor.from_float(w, QuantSpec("int4"))
    with pytest.raises(ValueError, match="symmetric weight"):
        Int8Tensor.from_float(w, QuantSpec("int8", symmetric=False), act_spec=QuantSpec("int8", PerToken()))
    with pytest.raises(ValueError, match="needs act_scale"):
        Int8Tensor.from_float(w, QuantSpec("int8"), act_spec=QuantSpec("int8", PerTensor()))
    with pytest.raises(ValueError, match="granularity"):
        Int8Tensor.from_float(w, QuantSpec("int8"), act_spec=QuantSpec("int8", PerGroup(4)))
    with pytest.raises(TypeError, match="floating-point"):
        Int8Tensor.from_float(torch.ones(8, 16, dtype=torch.int32), QuantSpec("int8"))


def test_asymmetric_weight_runs_reference():
    w = torch.randn(64, 128) + 0.5
    t = Int8Tensor.from_float(w, QuantSpec("int8", PerRow(), symmetric=False))
    x = torch.randn(3, 128)
    assert sqnr(F.linear(x, w), F.linear(x, t)) > 38


def test_kernel_preference_reference():
    w, _ = _w()
    t = Int8Tensor.from_float(w, QuantSpec("int8", PerRow()), kernel=KernelPreference.REFERENCE)
    x = torch.randn(3, 128)
    assert torch.equal(F.linear(x, t), F.linear(x, t.dequantize()))


@pytest.mark.cuda
@pytest.mark.parametrize("act", [False, True])
def test_cuda_linear_matches_cpu_reference(act):
    w, t = _w(shape=(256, 512), act_spec=QuantSpec("int8", PerToken()) if act else None)
    x = torch.randn(32, 512)
    ref = F.linear(x, t.dequantize())
    out = F.linear(x.cuda(), t.to("cuda")).cpu()
    assert sqnr(ref, out) > (35 if act else 60)
