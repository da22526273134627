"""Small quantized models and their lowbit files as editable parts, for the serialization tests
(the ``ser`` fixture), and the count of malformed files the fuzz suite tried (printed at the end)."""

from __future__ import annotations

import json
import types
from collections import Counter
from pathlib import Path

import pytest

import torch
from safetensors import safe_open
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
from lowbit.serialization import save

# every tensor variant a config makes (the fuzz suite mutates each)
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
IN, OUT = 64, 8


def build(n: int = len(CONFIGS), device=None) -> nn.Sequential:
    """``n`` independent linears (64 -> 8) in a Sequential (run them one by one, not chained)."""
    with torch.device(device or "cpu"):
        return nn.Sequential(*[nn.Linear(IN, OUT) for _ in range(n)])


def quantized(seed: int = 0) -> nn.Sequential:
    """``build()`` with layer i quantized by ``CONFIGS[i]``."""
    torch.manual_seed(seed)
    model = build()
    quantize_(model, {str(i): c for i, c in enumerate(CONFIGS)})
    return model


def outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m(x) for m in model]


def read_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A lowbit file as ``(tensors, header)``: edit them and ``write`` the result."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["lowbit"])
    return tensors, header


def write(path: Path, tensors: dict[str, torch.Tensor], header, raw: str | None = None) -> Path:
    """A safetensors file with ``header`` (or the ``raw`` string) as its lowbit metadata."""
    meta = {"lowbit": raw if raw is not None else json.dumps(header)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def saved(model: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    save(model, path)
    return read_parts(path)


# malformed files tried per fuzz category (each one had to raise CheckpointError)
MALFORMED: Counter = Counter()


@pytest.fixture(scope="session")
def ser():
    """The helpers above, and ``MALFORMED``."""
    return types.SimpleNamespace(CONFIGS=CONFIGS, IN=IN, OUT=OUT, build=build, quantized=quantized, outputs=outputs,
                                 read_parts=read_parts, write=write, saved=saved, MALFORMED=MALFORMED)


def pytest_terminal_summary(terminalreporter):
    if MALFORMED:
        per = ", ".join(f"{k} {v}" for k, v in sorted(MALFORMED.items()))
        terminalreporter.write_line(f"lowbit serialization fuzz: {sum(MALFORMED.values())} malformed files, each "
                                    f"rejected with CheckpointError ({per})")
