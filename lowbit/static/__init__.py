"""Static quantization: observers in, calibration data through, static scales out; quantized
softmax; SmoothQuant."""

from lowbit.static.config import SmoothQuantConfig, StaticQuantConfig
from lowbit.static.flow import ObservedLinear, convert, prepare, smoothing_factors
from lowbit.static.softmax import QuantizedSoftmax, quantize_softmax_module, softmax_spec

__all__ = [
    "StaticQuantConfig",
    "SmoothQuantConfig",
    "ObservedLinear",
    "prepare",
    "convert",
    "smoothing_factors",
    "QuantizedSoftmax",
    "quantize_softmax_module",
    "softmax_spec",
]
