"""Every weight config on a CUDA device (skipped without one): the auto kernels (cuBLAS ``_int_mm``,
tinygemm, ``_scaled_mm``, or the reference where no CUDA kernel takes the shape) against the
reference kernel and against the CPU, quantize-on-CPU-then-move against quantize-on-CUDA,
``torch.compile`` and a save / load round trip on the device.

The model and seed are those of tests/configs (two linears, ReLU between), built on the CPU and then
moved, so the float weights are the same bits as the CPU tests'.
"""

import pytest
import torch
from torch import nn

from lowbit import configs as C
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.kernels.preference import KernelPreference
from lowbit.quantize import quantize_
from lowbit.serialization import load, save

pytestmark = pytest.mark.cuda

DEV = "cuda"


def _configs(kernel=KernelPreference.AUTO):
    return {
        "int8-wo": C.Int8WeightOnlyConfig(kernel=kernel),
        "int8-wo-g32": C.Int8WeightOnlyConfig(PerGroup(32), kernel=kernel),
        "w8a8": C.Int8DynamicActivationInt8WeightConfig(kernel=kernel),
        "w8a8-asym": C.Int8DynamicActivationInt8WeightConfig(act_symmetric=False, kernel=kernel),
        "w8a8-static": C.Int8StaticActivationInt8WeightConfig(act_scale=0.06, kernel=kernel),
        "int4-g128": C.Int4WeightOnlyConfig(kernel=kernel),
        "int4-g64-sym": C.Int4WeightOnlyConfig(group_size=64, symmetric=True, kernel=kernel),
        "int4-g64-floatzp": C.Int4WeightOnlyConfig(group_size=64, zero_point_domain="float", kernel=kernel),
        "8da4w": C.Int8DynamicActivationInt4WeightConfig(kernel=kernel),
        "fp8-wo-row": C.Float8WeightOnlyConfig(kernel=kernel),
        "fp8-wo-tensor-e5m2": C.Float8WeightOnlyConfig(PerTensor(), dtype=torch.float8_e5m2, kernel=kernel),
        "fp8-dyn-tensor": C.Float8DynamicActivationFloat8WeightConfig(kernel=kernel),
        "fp8-dyn-row": C.Float8DynamicActivationFloat8WeightConfig(PerRow(), kernel=kernel),
        "fp8-int4": C.Float8DynamicActivationInt4WeightConfig(kernel=kernel),
    }


NAMES = list(_configs())
# the auto kernel against the reference kernel, bf16 output: the kernels' bf16 bound
# (tests/kernels/test_int4.py, test_float8.py: 40 dB; the int8 paths are tighter on the CPU)
AUTO_VS_REFERENCE_DB = 40.0
# compiled against eager with activation quantization (tests/configs: a fused intermediate may round
# differently and move a few activations to the neighbouring level)
COMPILED_VS_EAGER_ACT_DB = 40.0
# M = 1 (decode), 17 (just past cuBLAS int8's M > 16), 64
ROWS = [1, 17, 64]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    k = 64 if name.startswith(("int8", "w8a8")) else 256
    return nn.Sequential(nn.Linear(k, 128), nn.ReLU(), nn.Linear(128, 32)).bfloat16()


def _input(model: nn.Module, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    return (torch.randn(m, model[0].in_features, generator=g) * 2).bfloat16().to(DEV)


def _has_act(model) -> bool:
    return getattr(model[0].weight, "act_spec", None) is not None


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("name", NAMES)
def test_auto_matches_reference_and_the_cpu(name, m):
    """One linear against the reference kernel on the device, and against the same linear quantized
    and run on the CPU (whose accuracy against the float model tests/configs bounds). One layer: in
    a stack, a last-bit difference before a layer with float8 activations can move an activation by
    a whole float8 level (33.5 dB measured on the CPU, auto against reference, for this model)."""
    x = _input(_model(name), m)
    with torch.no_grad():
        auto = quantize_(_model(name)[0].to(DEV), _configs()[name])
        ref = quantize_(_model(name)[0].to(DEV), _configs(KernelPreference.REFERENCE)[name])
        on_cpu = quantize_(_model(name)[0], _configs()[name])
        assert auto.weight.device.type == DEV
        out, out_ref, out_cpu = auto(x), ref(x), on_cpu(x.cpu())
    assert out.device.type == DEV and out.dtype == torch.bfloat16 and out.shape == out_cpu.shape
    assert torch.isfinite(out).all()
    assert sqnr(out_ref.float(), out.float()) >= AUTO_VS_REFERENCE_DB
    assert sqnr(out_cpu.float(), out.cpu().float()) >= AUTO_VS_REFERENCE_DB


@pytest.mark.parametrize("name", NAMES)
def test_quantized_on_cpu_then_moved_equals_quantized_on_cuda(name):
    """The same weight bits whichever device quantized them, and the moved model runs on CUDA."""
    on_cpu = quantize_(_model(name), _configs()[name]).to(DEV)
    on_cuda = quantize_(_model(name).to(DEV), _configs()[name])
    for a, b in zip(on_cpu.state_dict().values(), on_cuda.state_dict().values()):
        assert a.device.type == DEV
        if hasattr(a, "qdata"):
            assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
        else:
            assert torch.equal(a, b)
    x = _input(on_cuda, 17)
    with torch.no_grad():
        assert torch.equal(on_cpu(x), on_cuda(x))


@pytest.mark.parametrize("name", NAMES)
def test_compiled_on_cuda(name):
    model = quantize_(_model(name).to(DEV), _configs()[name])
    x = _input(model, 17)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        with torch._inductor.config.patch(emulate_precision_casts=True):
            out = torch.compile(model, fullgraph=True)(x)
    assert out.device.type == DEV
    if _has_act(model):
        assert sqnr(eager.float(), out.float()) >= COMPILED_VS_EAGER_ACT_DB
    else:
        assert torch.equal(out, eager)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_onto_cuda(name, tmp_path):
    model = quantize_(_model(name).to(DEV), _configs()[name])
    path = tmp_path / "model.safetensors"
    save(model, path)
    loaded = load(_model(name), path, device=DEV)
    assert loaded[0].weight.device.type == DEV
    x = _input(model, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
