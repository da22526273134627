"""Every PTQ config quantized and run under ``torch.inference_mode()`` gives what it gives outside it,
bit for bit: on the fast paths, with ``KernelPreference.REFERENCE``, and with the C++ kernels
disabled (the paths a CPU without AVX-512 runs). Inference tensors have no version counter, so
anything a kernel caches per weight must cope with them."""

import dataclasses

import pytest
import torch
from torch import nn

from lowbit import configs as C
from lowbit.configs.base import registered_configs
from lowbit.granularity import PerGroup
from lowbit.kernels import _ext
from lowbit.kernels.preference import KernelPreference
from lowbit.quantize import quantize_

# every registered PTQ config at least once, plus the variants that take other kernel routes
CONFIGS = [
    C.Int8WeightOnlyConfig(),
    C.Int8WeightOnlyConfig(granularity=PerGroup(32)),
    C.Int8DynamicActivationInt8WeightConfig(),
    C.Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
    C.Int8StaticActivationInt8WeightConfig(act_scale=0.05),
    C.Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=3),
    C.Int4WeightOnlyConfig(group_size=32),
    C.Int4WeightOnlyConfig(group_size=32, symmetric=True),
    C.Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
    C.Int8DynamicActivationInt4WeightConfig(group_size=32),
    C.Float8WeightOnlyConfig(),
    C.Float8DynamicActivationFloat8WeightConfig(),
    C.Float8StaticActivationFloat8WeightConfig(act_scale=0.01),
    C.Float8DynamicActivationInt4WeightConfig(group_size=32),
]
IDS = [repr(c) for c in CONFIGS]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_every_registered_ptq_config_is_covered():
    ptq = {n for n in registered_configs() if n != "QATConfig"}
    assert ptq <= {type(c).__name__ for c in CONFIGS}, ptq - {type(c).__name__ for c in CONFIGS}


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(dtype)


def _run(config, dtype):
    """Outputs at M = 1 and M = 5, twice each (a second call would hit anything cached)."""
    model = quantize_(_model(dtype), config)
    xs = [torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(dtype) for m in (1, 5)]
    return model, [model(x) for x in xs for _ in range(2)]


@pytest.fixture(params=["auto", "reference", "no-ext"])
def route(request, monkeypatch):
    if request.param == "no-ext":
        monkeypatch.setattr(_ext, "load", lambda name="": None)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_quantized_and_run_under_inference_mode(config, dtype, route):
    if route == "reference":
        config = dataclasses.replace(config, kernel=KernelPreference.REFERENCE)
    model, want = _run(config, dtype)
    with torch.inference_mode():
        _, got = _run(config, dtype)
        outside_in = [model(x) for x in (torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(dtype) for m in (1, 5))]
    for w, g in zip(want, got):
        assert g.dtype == dtype and torch.equal(w, g)
    assert torch.equal(outside_in[0], want[0]) and torch.equal(outside_in[1], want[2])
