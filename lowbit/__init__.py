"""lowbit: PyTorch-native quantization (int8, int4, float8) with exact numerics."""

from lowbit.dtypes import QDTYPES, QDType, get_qdtype
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken, block_size
from lowbit.spec import QuantSpec

__version__ = "0.1.0"

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
]
