"""Accurate low-bit weights: GPTQ and AWQ (calibration data, one decoder block at a time) and HQQ
(calibration-free qparams), all writing the very tensors ``quantize_`` makes for a config."""

from lowbit.algorithms.awq import AWQGroup, AWQReport, awq
from lowbit.algorithms.calibration import BUILTIN_TEXTS, DEFAULT_CALIBRATION, calibration_batches, calibration_text
from lowbit.algorithms.gptq import GPTQResult, Hessian, gptq_quantize, output_sqnr
from lowbit.algorithms.gptq_model import GPTQLayer, GPTQReport, gptq
from lowbit.algorithms.smooth import smooth_
from lowbit.algorithms.hqq import HQQResult, hqq_optimize, hqq_qparams, quantize_hqq_

__all__ = [
    "awq",
    "AWQReport",
    "AWQGroup",
    "calibration_batches",
    "calibration_text",
    "BUILTIN_TEXTS",
    "DEFAULT_CALIBRATION",
    "gptq",
    "GPTQReport",
    "GPTQLayer",
    "gptq_quantize",
    "GPTQResult",
    "Hessian",
    "output_sqnr",
    "hqq_qparams",
    "hqq_optimize",
    "HQQResult",
    "quantize_hqq_",
    "smooth_",
]
