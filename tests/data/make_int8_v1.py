"""Writes int8_v1.safetensors: a checkpoint of lowbit format version 1, kept so later versions
prove they still load it. Run once from the repo root: python tests/data/make_int8_v1.py"""

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.configs import (
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.granularity import PerGroup
from lowbit.quantize import quantize_
from lowbit.serialization import save


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 8))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build()
    quantize_(
        model,
        {
            "0": Int8WeightOnlyConfig(),
            "2": Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
            "4": Int8StaticActivationInt8WeightConfig(act_scale=0.02, act_zero_point=-5),
            "5": Int8WeightOnlyConfig(PerGroup(8)),
        },
    )
    x = torch.randn(4, 32)
    with torch.no_grad():
        y = model(x)
    save(model, "tests/data/int8_v1.safetensors")
    save_file({"input": x, "output": y}, "tests/data/int8_v1_io.safetensors")
