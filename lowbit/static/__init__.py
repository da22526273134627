"""Static quantization: observers in, calibration data through, static scales out; quantized
softmax; SmoothQuant, with its scales folded into the preceding norm or linear (``fold``); ranges
merged across ranks (``sync_observers``)."""

from lowbit.static.config import SmoothQuantConfig, StaticQuantConfig
from lowbit.static.distributed import sync_observers
from lowbit.static.flow import UNDERFLOW_STEPS, ObservedLinear, convert, prepare, smoothing_factors
from lowbit.static.fold import FoldGroup, FoldReport, find_fold_groups, fold_scales
from lowbit.static.softmax import QuantizedSoftmax, quantize_softmax_module, softmax_spec

__all__ = [
    "StaticQuantConfig",
    "SmoothQuantConfig",
    "ObservedLinear",
    "prepare",
    "convert",
    "smoothing_factors",
    "UNDERFLOW_STEPS",
    "sync_observers",
    "FoldGroup",
    "FoldReport",
    "find_fold_groups",
    "fold_scales",
    "QuantizedSoftmax",
    "quantize_softmax_module",
    "softmax_spec",
]
