"""Float8 linear: weight-only (custom op ``lowbit::float8_weight_only_linear``) and float8
weights x dynamic float8 activations.

Weight: ``qdata`` float8_e4m3fn or float8_e5m2 (N, K) with a float32 ``scale`` (N, 1) per row or
(1, 1) per tensor; it stands for ``qdata.float() * scale``.

One reference per op: dequantize with the primitives (activations fake-quantized with the
primitives when they are quantized), then ``F.linear``. Fast paths:

* weight-only, CPU: our AVX-512 C++ kernels (``csrc/fp8_cpu.cpp`` via
  ``_fp8_cpu.float8_weight_only_linear_cpu``); otherwise the reference (other devices too:
  float8 weight-only is for memory, the dequantized matmul is what a GPU runs anyway);
* float8 activations, CUDA with compute capability >= 8.9 (Ada, Hopper and later):
  ``torch._scaled_mm`` on the float8 activation and weight with float32 scales (per tensor, or
  per token x per row); below 8.9 and on CPU, the documented fallback: the activation is
  fake-quantized with the same primitives and the weight-only op runs (same numbers as the
  reference, no float8 tensor cores). Gradients (training through the op) take that route too.
  On CPU with no gradient wanted, that fake quantization is one C++ pass (``_fake_quantize_cpu``:
  ``csrc/fp8_act.h`` in the ``int8_act`` kernel, the primitives' float32 ops and torch's own
  float8 / bf16 conversions, bit for bit) instead of about eight aten ops; for dynamic scales at
  M <= ``_fp8_cpu.tiled_max_m()`` it runs inside the weight-only kernel's own widening of x
  (``_fp8_cpu.float8_act_linear_cpu``: one call, the same values bit for bit).
* under torch.compile on CPU with no gradient wanted, the graph calls eager's route as one op: at a
  static M <= ``_fp8_cpu.tiled_max_m()`` in a case the C++ kernel takes (``_fp8_cpu.small_m_case``),
  ``lowbit_cpu::fp8_small_linear`` / ``fp8_small_act_linear`` (dynamic scales), whose C++ kernels make
  eager's one call (the weight's NaN / inf count kept by the extension); otherwise the plain ops
  ``lowbit::float8_linear_cpu`` / ``lowbit::float8_act_linear_cpu``, which run the eager route above
  whole in Python. Either way compiled equals eager bit for bit.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from lowbit.granularity import PerTensor, PerToken
from lowbit.kernels import _ext
from lowbit.kernels._cpu_ops import fp8_small_act_linear, fp8_small_linear
from lowbit.kernels._fp8_cpu import (CHUNK_ROWS, GEMV_MAX_M, float8_act_linear_cpu, float8_weight_only_linear_cpu,
                                     small_m_case, tiled_max_m)
from lowbit.kernels.preference import check_kernel, check_static_act_scale, wants_grad
from lowbit.primitives.float8 import choose_qparams_float8, dequantize_float8, fake_quantize_float8, quantize_float8
from lowbit.spec import QuantSpec, spec_from_key, spec_key

__all__ = [
    "float8_weight_only_linear",
    "float8_weight_only_linear_any",
    "float8_activation_linear",
    "scaled_mm_supported",
]

_log = logging.getLogger(__name__)
_FLOAT8 = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
SCALED_MM_MIN_CAPABILITY = (8, 9)


def _check(input, qdata, scale):
    if input.dim() != 2 or qdata.dim() != 2 or input.shape[1] != qdata.shape[1]:
        raise ValueError(f"input {tuple(input.shape)} and weight {tuple(qdata.shape)} must be (M, K) and (N, K)")
    if qdata.dtype not in _FLOAT8 or scale.dtype != torch.float32:
        raise TypeError(f"qdata must be float8_e4m3fn/float8_e5m2 and scale float32, got {qdata.dtype}, {scale.dtype}")
    if scale.shape not in ((qdata.shape[0], 1), (1, 1)):
        raise ValueError(f"scale must be (N, 1) or (1, 1) for weight {tuple(qdata.shape)}, got {tuple(scale.shape)}")


def _reference(input, qdata, scale, bias, spec):
    return F.linear(input, dequantize_float8(qdata, scale, spec, input.dtype), bias)


def _check_spec(qdata, spec: QuantSpec) -> None:
    if not spec.dtype.is_float or spec.dtype.storage != qdata.dtype:
        raise ValueError(f"weight spec dtype {spec.dtype.name} does not match qdata dtype {qdata.dtype}")


@torch.library.custom_op("lowbit::float8_weight_only_linear", mutates_args=())
def float8_weight_only_linear(
    input: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, spec: str, kernel: str
) -> torch.Tensor:
    """``input @ (qdata * scale).T + bias`` in ``input.dtype``.

    Args:
        input: (M, K) float activations.
        qdata: (N, K) float8_e4m3fn or float8_e5m2.
        scale: (N, 1) or (1, 1) float32.
        bias: (N,) in input.dtype or None.
        spec: ``spec_key`` of the weight's float8 ``QuantSpec`` (the one the tensor stores).
        kernel: "auto" or "reference".
    """
    _check(input, qdata, scale)
    spec = spec_from_key(spec)
    _check_spec(qdata, spec)
    if check_kernel(kernel) == "reference":
        return _reference(input, qdata, scale, bias, spec)
    out = None
    if input.device.type == "cpu":
        out = float8_weight_only_linear_cpu(input, qdata, scale, bias)
    return _reference(input, qdata, scale, bias, spec) if out is None else out


@float8_weight_only_linear.register_fake
def _(input, qdata, scale, bias, spec, kernel):
    return input.new_empty(input.shape[0], qdata.shape[0])


def float8_weight_only_linear_any(input, qdata, scale, bias, spec: QuantSpec, kernel: str) -> torch.Tensor:
    """``float8_weight_only_linear``, except that a CPU call wanting no gradient runs the op's own CPU body
    (``float8_weight_only_linear_cpu``) directly, skipping the custom op's Python layers (tens of us a call:
    more than the kernel on a small decode layer); under torch.compile, as the plain op
    ``lowbit::float8_linear_cpu`` (below). Same values bit for bit."""
    if kernel == "auto" and input.device.type == "cpu" and not wants_grad(input, bias):
        if torch.compiler.is_compiling():
            _check(input, qdata, scale)  # what the custom op checks, here at trace time
            _check_spec(qdata, spec)
            if small_m_case(input, qdata, scale, bias):
                return fp8_small_linear(input, qdata, scale, bias, GEMV_MAX_M, tiled_max_m(), CHUNK_ROWS, spec_key(spec))
            return _float8_linear_cpu(input, qdata, scale, bias, spec_key(spec))
        out = float8_weight_only_linear_cpu(input, qdata, scale, bias)
        if out is not None:
            return out
    return float8_weight_only_linear(input, qdata, scale, bias, spec_key(spec), kernel)


def _setup(ctx, inputs, output):
    input, qdata, scale, bias, spec, _ = inputs
    ctx.save_for_backward(qdata, scale)
    ctx.has_bias = bias is not None
    ctx.spec = spec_from_key(spec)


def _backward(ctx, grad):
    """Gradients flow to the input and the bias; the float8 weight is frozen."""
    qdata, scale = ctx.saved_tensors
    grad_bias = grad.sum(0) if ctx.has_bias else None
    return grad @ dequantize_float8(qdata, scale, ctx.spec, grad.dtype), None, None, grad_bias, None, None


float8_weight_only_linear.register_autograd(_backward, setup_context=_setup)


# --- what a compiled CPU graph calls: plain ops (a Python kernel, no autograd: callers route here only when no
# gradient is wanted), not custom_ops, whose layers cost ~30 us a call (a compiled decode step calls one per
# linear: a float8 weight-only linear of 256 x 256 at M = 1 took 86 us compiled against 27 eager on a Zen 2).
# Each runs the eager CPU route whole (the same bits as eager) and, where that does not apply at run time (a
# graph cached with the extension, run without it), the reference.


def _float8_linear_cpu_body(input, qdata, scale, bias, spec: str) -> torch.Tensor:
    out = float8_weight_only_linear_cpu(input, qdata, scale, bias)
    return _reference(input, qdata, scale, bias, spec_from_key(spec)) if out is None else out


def _float8_act_linear_cpu_body(input, qdata, scale, bias, spec: str, act_spec: str) -> torch.Tensor:
    act = spec_from_key(act_spec)
    rule = _act_rule(act)
    out = None if rule is None else float8_act_linear_cpu(input, qdata, scale, bias, *rule)
    if out is not None:
        return out
    return _float8_linear_cpu_body(_fake_quantized(input, act, None, "auto"), qdata, scale, bias, spec)


def _linear_fake(input, qdata, *args):
    return input.new_empty(input.shape[0], qdata.shape[0])


_LIB = torch.library.Library("lowbit", "FRAGMENT")
_LIB.define("float8_linear_cpu(Tensor input, Tensor qdata, Tensor scale, Tensor? bias, str spec) -> Tensor")
_LIB.define("float8_act_linear_cpu(Tensor input, Tensor qdata, Tensor scale, Tensor? bias, str spec, str act_spec) "
            "-> Tensor")
for _name, _body in (("float8_linear_cpu", _float8_linear_cpu_body), ("float8_act_linear_cpu", _float8_act_linear_cpu_body)):
    _LIB.impl(_name, _body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lowbit::{_name}", _linear_fake, lib=_LIB)
_float8_linear_cpu = torch.ops.lowbit.float8_linear_cpu.default
_float8_act_linear_cpu = torch.ops.lowbit.float8_act_linear_cpu.default


# --- float8 activations ----------------------------------------------------------------------------


@functools.cache
def scaled_mm_supported(device_index: int) -> bool:
    """Whether ``torch._scaled_mm`` runs float8 on this CUDA device (compute capability >= 8.9)."""
    ok = torch.cuda.get_device_capability(device_index) >= SCALED_MM_MIN_CAPABILITY
    if not ok:
        _log.warning(
            "CUDA device %d has compute capability %s < 8.9: no float8 tensor cores; lowbit float8 "
            "activations fall back to fake quantization + the dequantized-weight matmul (same numbers, slower)",
            device_index, torch.cuda.get_device_capability(device_index),
        )
    return ok


def _scaled_mm_path(input, qdata, scale, bias, act_spec, act_scale) -> torch.Tensor | None:
    m, k = input.shape
    n = qdata.shape[0]
    per_row = scale.shape[0] != 1  # row-wise _scaled_mm: per-token (or broadcast static) x per-row scales
    if k % 16 or n % 16 or (isinstance(act_spec.granularity, PerToken) and not per_row):
        return None
    if per_row and input.dtype != torch.bfloat16:
        return None  # row-wise _scaled_mm writes bf16 only
    if act_spec.dtype.storage != torch.float8_e4m3fn and qdata.dtype != torch.float8_e4m3fn:
        return None  # e5m2 x e5m2 is not a _scaled_mm combination
    s_x = choose_qparams_float8(input, act_spec, check_finite=False) if act_scale is None else act_scale.reshape(1, 1)
    xq = quantize_float8(input, s_x, act_spec)
    s_w = scale.reshape(1, n) if per_row else scale.reshape(())
    s_x = s_x.expand(m, 1).contiguous() if per_row else s_x.reshape(())
    return torch._scaled_mm(xq, qdata.t(), scale_a=s_x, scale_b=s_w, bias=bias, out_dtype=input.dtype)


def float8_activation_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    spec: QuantSpec,
    act_spec: QuantSpec,
    kernel: str,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float8 activations x float8 weight: the activation scale is chosen at run time (per token
    or per tensor) or, for static quantization, given as ``act_scale`` (one element, per tensor).

    Result: ``fake_quantize_float8(input) @ (qdata * scale).T + bias`` in ``input.dtype``
    (see the module docstring for which device runs which route).
    """
    _check(input, qdata, scale)
    if not act_spec.dtype.is_float or not isinstance(act_spec.granularity, (PerToken, PerTensor)):
        raise ValueError(f"act_spec must be float8 PerToken() or PerTensor(), got {act_spec!r}")
    if act_scale is not None and (act_scale.numel() != 1 or not isinstance(act_spec.granularity, PerTensor)):
        raise ValueError(f"a static act_scale must have one element and a PerTensor() act_spec, got {act_spec!r}")
    kernel = check_kernel(kernel)
    if (
        kernel == "auto"
        and input.device.type == "cuda"
        and not wants_grad(input)
        and scaled_mm_supported(input.device.index or 0)
    ):
        out = _scaled_mm_path(input, qdata, scale, bias, act_spec, act_scale)
        if out is not None:
            return out
    rule = _act_rule(act_spec) if kernel == "auto" and act_scale is None and input.device.type == "cpu" else None
    if rule is not None:
        if not torch.compiler.is_compiling():  # small M: the fake quantization inside the GEMV
            out = float8_act_linear_cpu(input, qdata, scale, bias, *rule)
            if out is not None:
                return out
        elif not wants_grad(input, bias):  # compiled: eager's route as one op
            if input.is_contiguous() and small_m_case(input, qdata, scale, bias):
                return fp8_small_act_linear(input, qdata, scale, bias, GEMV_MAX_M, tiled_max_m(), CHUNK_ROWS, *rule,
                                            spec_key(spec), spec_key(act_spec))
            return _float8_act_linear_cpu(input, qdata, scale, bias, spec_key(spec), spec_key(act_spec))
    x = _fake_quantized(input, act_spec, act_scale, kernel)
    return float8_weight_only_linear_any(x, qdata, scale, bias, spec, kernel)


def _fake_quantized(input, act_spec: QuantSpec, act_scale, kernel: str) -> torch.Tensor:
    """``input`` fake-quantized under ``act_spec`` (the static ``act_scale``, or a scale chosen here): one C++
    pass where ``_fake_quantize_cpu`` takes it (kernel "auto"), else the primitives; the same values."""
    x = _fake_quantize_cpu(input, act_spec, act_scale) if kernel == "auto" else None
    if x is None:
        if act_scale is not None:
            check_static_act_scale(act_scale)
            s_x = act_scale.reshape(1, 1)
        else:
            s_x = choose_qparams_float8(input.detach(), act_spec, check_finite=False)
        x = fake_quantize_float8(input, act_spec, s_x)
    return x


_F8_NAMES = {"float8_e4m3fn": False, "float8_e5m2": True}  # name -> e5m2


def _act_rule(act_spec: QuantSpec) -> tuple[bool, float, bool] | None:
    """``(per_token, eps, e5m2)`` of a dynamic float8 activation spec the C++ fake quantization takes
    (float8_e4m3fn / float8_e5m2, per token or per tensor, float32 scales), or None."""
    if (act_spec.scale_dtype != torch.float32 or act_spec.dtype.name not in _F8_NAMES
            or not isinstance(act_spec.granularity, (PerToken, PerTensor))):
        return None
    return isinstance(act_spec.granularity, PerToken), act_spec.eps, _F8_NAMES[act_spec.dtype.name]


def _fake_quantize_cpu(input, act_spec: QuantSpec, act_scale) -> torch.Tensor | None:
    """``fake_quantize_float8(input, act_spec, scale)`` (scale chosen per token / per tensor, or the
    static ``act_scale``) in one C++ pass, bit for bit; None where it does not apply (not CPU, a
    gradient wanted, under compile, not a contiguous 2-D float32/bf16/fp16 input, a non-float32
    scale dtype, a static scale that is not a positive finite number, the kernel not built)."""
    if (input.device.type != "cpu" or torch.compiler.is_compiling() or input.dim() != 2 or input.numel() == 0
            or not input.is_contiguous() or input.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or act_spec.scale_dtype != torch.float32 or act_spec.dtype.name not in _F8_NAMES
            or wants_grad(input)):
        return None
    static = -1.0
    if act_scale is not None:
        static = float(act_scale.reshape(-1)[0])
        if not (0.0 < static < float("inf")):
            return None
    fn = getattr(_ext.load("int8_act"), "fake_quant_fp8", None)
    if fn is None:
        return None
    out, _ = fn(input, static, isinstance(act_spec.granularity, PerToken), act_spec.eps,
                _F8_NAMES[act_spec.dtype.name])
    return out
