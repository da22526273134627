"""lowbit: PyTorch-native quantization (int8, int4, float8) with exact numerics."""

from lowbit.dtypes import QDTYPES, QDType, get_qdtype
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken, block_size
from lowbit.spec import QuantSpec
from lowbit.kernels import KernelPreference
from lowbit.tensors import Float8Tensor, Int4Tensor, Int8Tensor, QuantizedTensor
from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from lowbit.quantize import quantize_
from lowbit.static import SmoothQuantConfig, StaticQuantConfig
from lowbit.qat import QATConfig
from lowbit.serialization import load, save
from lowbit.pretrained import quantize_pretrained, save_pretrained
from lowbit.formats import export, from_pretrained
from lowbit.eval.autoquant import autoquant

from lowbit.version import __version__

__all__ = [
    "QDType",
    "QDTYPES",
    "get_qdtype",
    "PerTensor",
    "PerAxis",
    "PerRow",
    "PerToken",
    "PerGroup",
    "PerBlock",
    "block_size",
    "QuantSpec",
    "sqnr",
    "KernelPreference",
    "QuantizedTensor",
    "Int8Tensor",
    "Int4Tensor",
    "Float8Tensor",
    "QuantConfig",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8StaticActivationInt8WeightConfig",
    "Int4WeightOnlyConfig",
    "Int8DynamicActivationInt4WeightConfig",
    "Float8WeightOnlyConfig",
    "Float8DynamicActivationFloat8WeightConfig",
    "Float8StaticActivationFloat8WeightConfig",
    "Float8DynamicActivationInt4WeightConfig",
    "quantize_",
    "StaticQuantConfig",
    "SmoothQuantConfig",
    "QATConfig",
    "save",
    "load",
    "save_pretrained",
    "from_pretrained",
    "quantize_pretrained",
    "export",
    "autoquant",
]
