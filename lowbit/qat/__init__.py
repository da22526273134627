"""Quantization-aware training: fake-quantized modules that match the converted model bit for bit."""

from lowbit.qat.config import QATConfig
from lowbit.qat.fake_quant import FakeQuant, fake_quant_for, qat_configs, register_fake_quant
from lowbit.qat.modules import FakeQuantizedEmbedding, FakeQuantizedLinear

__all__ = [
    "QATConfig",
    "FakeQuant",
    "fake_quant_for",
    "qat_configs",
    "register_fake_quant",
    "FakeQuantizedLinear",
    "FakeQuantizedEmbedding",
]
