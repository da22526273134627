"""Writes state_dict_v1.pt: ``torch.save(model.state_dict())`` of a model quantized by lowbit 0.1.0 at
commit caa1d65 (checkpoint format version 1, before the tensors carried their weight spec and while they
still held a KernelPreference), and state_dict_v1_io.safetensors (input, output, every quantized weight
dequantized). Kept so later versions prove such a file still loads with ``torch.load(weights_only=True)``.
Run once from the repo root of that commit: python tests/data/make_state_dict_v1.py"""

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.quantize import quantize_

# one linear per tensor variant; every layer is 64 -> 64 so that the model is a plain chain
CONFIGS = [
    Int8WeightOnlyConfig(),
    Int8WeightOnlyConfig(PerGroup(16)),
    Int8WeightOnlyConfig(PerTensor()),
    Int8DynamicActivationInt8WeightConfig(),
    Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
    Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=4),
    Int8StaticActivationInt8WeightConfig(act_scale=0.05),
    Int4WeightOnlyConfig(group_size=32),
    Int4WeightOnlyConfig(group_size=64, symmetric=True),
    Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
    Int8DynamicActivationInt4WeightConfig(),
    Float8WeightOnlyConfig(),
    Float8WeightOnlyConfig(PerTensor(), dtype=torch.float8_e5m2),
    Float8DynamicActivationFloat8WeightConfig(),
    Float8DynamicActivationFloat8WeightConfig(PerRow()),
    Float8StaticActivationFloat8WeightConfig(act_scale=0.02),
    Float8DynamicActivationInt4WeightConfig(group_size=32),
]


def build() -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(64, 64) for _ in CONFIGS])


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for m in model:
            m.weight.normal_(0.0, 0.1)
    quantize_(model, {str(i): c for i, c in enumerate(CONFIGS)})
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = model(x)
    torch.save(model.state_dict(), "tests/data/state_dict_v1.pt")
    dequant = {f"dequant:{i}": m.weight.dequantize() for i, m in enumerate(model)}
    save_file({"input": x, "output": y, **dequant}, "tests/data/state_dict_v1_io.safetensors")
