"""Decode plans: a weight's eager CPU route for small M, with its per-weight checks done once.

At decode (M = 1) a small layer's C++ kernel takes ~10-40 us, and the routing in front of it
(``int8_weight_only_linear_any``, ``int8_activation_linear``, ``int4_linear``,
``float8_weight_only_linear_any``, ``float8_activation_linear``) re-checked on every call what
never changes for a weight: its dtypes, layout, group size, kernel preference, and which
extension runs. A plan is made once per weight (the tensor layer caches it, see
``QuantizedTensor._linear_plan``) from those checks, and holds the weight-side arguments the kernel
takes (views of the weight's own tensors: in-place edits such as ``copy_`` are seen). Calling it
checks only what depends on the call (M, the input's device, layout and dtype, the bias, whether
a gradient is wanted) and runs the same functions the routing would have chosen, so the values are
the routing's bit for bit; it returns None for any call it does not take, and the caller then runs
the routing as before.

A plan is made only in eager mode with kernel "auto" and a CPU weight; ``make_*_plan`` return None
when no fast path applies to the weight (then the routing runs every call). Making a plan also puts the
weight's large buffers on huge pages (``lowbit.kernels.hugepages``: a loaded checkpoint's weights get
them at their first eager call, ``quantize_``'s when it makes them).
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.granularity import PerToken
from lowbit.kernels import _ext, _fp8_cpu, _int4_cpu, _int8_int4_cpu, hugepages
from lowbit.kernels import float8 as _float8
from lowbit.kernels import int8 as _int8
from lowbit.kernels import w8a8 as _w8a8
from lowbit.kernels.preference import wants_grad
from lowbit.spec import QuantSpec

__all__ = ["make_int8_plan", "make_int4_plan", "make_float8_plan"]

Plan = Callable[[torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]

_INF = float("inf")


def _plain_cpu(x: torch.Tensor) -> bool:
    """An eager, plain CPU tensor (not a FakeTensor, functional tensor or other subclass)."""
    return type(x) is torch.Tensor and x.is_cpu


def _weight_ok(*tensors) -> bool:
    return all(t is None or (type(t) is torch.Tensor and t.is_cpu) for t in tensors)


# --- int8 ------------------------------------------------------------------------------------------


def _int8_weight_only(qdata, scale) -> Plan | None:
    """``int8_weight_only_linear_any``'s direct GEMV (M <= ``_ext_max_m(x.dtype, K, groups)``, groups of a multiple of 16)."""
    n, k = qdata.shape
    if scale.dim() != 2 or scale.shape[1] == 0 or k % scale.shape[1] or (k // scale.shape[1]) % 16:
        return None
    if not qdata.is_contiguous():
        return None
    # the C++ function through its pybind entry: the dispatcher op (_int8._direct_gemv_op, for compiled graphs)
    # adds ~3 us a call, and a plan runs only eagerly
    op = getattr(_ext.load("int8_gemv"), "int8_weight_only_mm", None)
    if op is None:
        return None
    max_bf16, max_float = _int8._ext_max_m(torch.bfloat16, k, scale.shape[1]), _int8._ext_max_m(torch.float32)
    s = scale.expand(n, -1)  # a view: in-place edits of the scale are seen

    def run(x, bias):
        if x.shape[0] > (max_bf16 if x.dtype == torch.bfloat16 else max_float) or not _plain_cpu(x) or wants_grad(x, bias):
            return None
        out = op(x, qdata, s)
        return out if bias is None else out + bias

    return run


def _int8_dynamic(qdata, scale, act_spec: QuantSpec, dtype) -> Plan | None:
    """``int8_activation_linear``'s eager CPU route (``_fused_cpu``) for dynamic symmetric per-token
    activations and a per-row weight scale: one C++ pass to quantize, ``_int8_mm_impl``, one epilogue."""
    n = qdata.shape[0]
    if (not isinstance(act_spec.granularity, PerToken) or not act_spec.symmetric or dtype not in _w8a8._FUSED_DTYPES
            or tuple(scale.shape) != (n, 1) or not scale.is_contiguous()):
        return None
    ext = _ext.load("int8_act")
    if ext is None:
        return None
    s_w = scale.reshape(-1)  # what _fused_cpu passes (expand + reshape + contiguous), as a view
    eps = act_spec.eps
    quantize, epilogue, mm, w8a8_gemm = ext.quantize_i8, ext.w8a8_epilogue, _w8a8._int8_mm_impl, _w8a8._w8a8_gemm
    # the three calls as one (where _int8_mm_impl would run mm_i8): same values, ~20 us less a call
    fused = _w8a8._dynamic_linear_op(ext) if qdata.is_contiguous() else None
    fused_max_m, dtypes = _w8a8._MM_I8_MAX_M, _w8a8._FUSED_DTYPES

    def run(x, bias):
        if (not _plain_cpu(x) or not x.is_contiguous() or x.dtype not in dtypes or wants_grad(x, bias)
                or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()))):
            return None
        if fused is not None and x.shape[0] <= fused_max_m:
            return fused(x, qdata, s_w, bias, eps)
        xq, s_x = quantize(x, -1.0, 0, eps)
        gemm = w8a8_gemm(x.shape[0], qdata)
        if gemm is not None:  # gemm_i8 with the epilogue per tile: the same values as the two calls
            return gemm(xq, qdata, s_x.contiguous(), s_w, bias, None, x)
        return epilogue(mm(xq, qdata), s_x.contiguous(), s_w, bias, None, x)

    return run


def _int8_static(qdata, scale, act_scale, act_zero_point, act_spec: QuantSpec, dtype) -> Plan | None:
    """``int8_activation_linear``'s eager CPU route (``_fused_cpu``) for a static per-tensor activation scale
    (and zero point) and a per-row weight scale: the same calls as the routing, without its per-call checks.
    The activation's scale and zero point are read from their tensors on every call (as the routing does),
    so an in-place edit, such as a re-calibration, is seen."""
    n = qdata.shape[0]
    if (dtype not in _w8a8._FUSED_DTYPES or tuple(scale.shape) != (n, 1) or not scale.is_contiguous()
            or not _weight_ok(act_scale, act_zero_point) or act_scale.numel() != 1 or act_scale.dtype != torch.float32
            or (act_zero_point is not None and act_zero_point.numel() != 1)):
        return None
    ext = _ext.load("int8_act")
    if ext is None:
        return None
    s_w, s_x = scale.reshape(-1), act_scale.reshape(1)  # what _fused_cpu passes, as views
    eps = act_spec.eps
    quantize, epilogue, mm, w8a8_gemm = ext.quantize_i8, ext.w8a8_epilogue, _w8a8._int8_mm_impl, _w8a8._w8a8_gemm
    mm_and_rowsum, dtypes = _w8a8._mm_and_rowsum, _w8a8._FUSED_DTYPES
    # the calls below as one where _int8_mm_impl would run mm_i8 and the zero point is 0: the same values
    fused = _w8a8._static_linear_op(ext) if qdata.is_contiguous() else None
    fused_max_m = _w8a8._MM_I8_MAX_M

    def run(x, bias):
        if (not _plain_cpu(x) or not x.is_contiguous() or x.dtype not in dtypes or wants_grad(x, bias)
                or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()))):
            return None
        zp = 0 if act_zero_point is None else int(act_zero_point)
        a = float(act_scale)
        if not 0.0 < a < _INF:  # the routing raises, naming act_scale
            return None
        if fused is not None and zp == 0 and x.shape[0] <= fused_max_m:
            return fused(x, qdata, s_w, bias, a, eps)
        xq, _ = quantize(x, a, zp, eps)
        if zp != 0:  # exact in int32: minus zp * rowsum(W_q)
            acc, rs = mm_and_rowsum(xq, qdata)
            return epilogue(acc, s_x, s_w, bias, (zp * rs).to(torch.int32), x)
        gemm = w8a8_gemm(x.shape[0], qdata)
        if gemm is not None:
            return gemm(xq, qdata, s_x, s_w, bias, None, x)
        return epilogue(mm(xq, qdata), s_x, s_w, bias, None, x)

    return run


def make_int8_plan(qdata, scale, zero_point, act_scale, act_zero_point, act_pre_scale, act_spec, kernel: str,
                   dtype: torch.dtype) -> Plan | None:
    """The decode plan of an ``Int8Tensor``'s fields, or None (see the module docstring): weight-only
    (the direct GEMV), dynamic symmetric per-token W8A8 or static per-tensor W8A8 (the fused CPU route)."""
    if (kernel != "auto" or zero_point is not None or act_pre_scale is not None
            or not _weight_ok(qdata, scale) or qdata.dtype != torch.int8 or qdata.dim() != 2
            or scale.dtype != torch.float32):
        return None
    hugepages.advise_all((qdata, scale))
    if act_spec is None:
        return None if act_scale is not None else _int8_weight_only(qdata, scale)
    if act_scale is not None:
        return _int8_static(qdata, scale, act_scale, act_zero_point, act_spec, dtype)
    return _int8_dynamic(qdata, scale, act_spec, dtype)


# --- int4 ------------------------------------------------------------------------------------------


def _int4_gemv(qdata, scale, zero_point, dtype) -> Callable | None:
    """``direct_gemv``'s op and M bound for this weight (bf16 only), or None."""
    if dtype != torch.bfloat16 or (zero_point is not None and not zero_point.is_contiguous()):
        return None
    if not scale.is_contiguous():
        return None
    probe = torch.empty(1, 2 * qdata.shape[1], dtype=dtype)
    if not _int4_cpu._supported(probe, qdata, scale, zero_point, None):
        return None
    return getattr(_ext.load("int4_cpu"), "gemv_bf16", None)  # pybind: the dispatcher op adds ~3 us a call


def make_int4_plan(qdata, scale, zero_point, spec: QuantSpec, act_spec, kernel: str, dtype: torch.dtype) -> Plan | None:
    """The decode plan of an ``Int4Tensor``'s fields, or None: weight-only bf16 (``direct_gemv``),
    8da4w (``int8_int4_linear``'s forward) or float8 per-token activations (the fake quantization
    inside the GEMV's call: ``direct_gemv_fp8_act``), each as ``int4_linear`` routes it."""
    if kernel != "auto" or not _weight_ok(qdata, scale, zero_point) or qdata.dtype != torch.uint8 or qdata.dim() != 2:
        return None
    hugepages.advise_all((qdata, scale, zero_point))
    n = qdata.shape[0]
    if act_spec is not None and not act_spec.dtype.is_float:  # 8da4w: int8_int4_linear takes symmetric int4 only
        if spec.dtype.name != "int4" or not spec.symmetric or spec.qmin != -8 or spec.qmax != 7:
            return None
        return _int8_int4(qdata, scale, zero_point, act_spec, dtype)
    op = _int4_gemv(qdata, scale, zero_point, dtype)
    if op is None:
        return None
    max_m = _int4_cpu.gemv_max_m(qdata.shape[1] * 2)

    def bias_ok(bias):
        return bias is None or (bias.dim() == 1 and bias.shape[0] == n and bias.is_floating_point()
                                and bias.device.type == "cpu")

    if act_spec is None:
        def run(x, bias):
            if (x.shape[0] > max_m or x.shape[0] == 0 or not _plain_cpu(x) or x.stride(-1) != 1
                    or wants_grad(x, bias) or not bias_ok(bias)):
                return None
            return op(x, qdata, scale, zero_point, bias)
        return run

    rule, fused = _fp8_act_rule(act_spec, dtype), _int4_cpu.direct_gemv_fp8_act_fn()
    if rule is None or fused is None:
        return None
    per_token, eps, e5m2 = rule

    def run_fp8(x, bias):  # the fake quantization inside the GEMV: int4_linear's direct_gemv_fp8_act
        if (x.shape[0] > max_m or x.shape[0] == 0 or not _plain_cpu(x) or not x.is_contiguous()
                or wants_grad(x, bias) or not bias_ok(bias)):
            return None
        return fused(x, qdata, scale, zero_point, bias, per_token, eps, e5m2)

    return run_fp8


def _int8_int4(qdata, scale, zero_point, act_spec, dtype) -> Plan | None:
    """``int8_int4_linear``'s no-gradient forward, with its weight and spec checks done once."""
    if (zero_point is not None or not _int8_int4_cpu._takes_act_spec(act_spec) or dtype not in _int8_int4_cpu._DTYPES
            or scale.dim() != 2 or scale.shape[0] != qdata.shape[0] or scale.shape[1] == 0):
        return None
    k = 2 * qdata.shape[1]
    if k % scale.shape[1] or (k // scale.shape[1]) % 32 or k // scale.shape[1] > _int8_int4_cpu.MAX_GROUP:
        return None
    ext = _ext.load("int8_int4")
    if ext is None:
        return None
    n, max_m = qdata.shape[0], _int8_int4_cpu.max_m()
    # quantize_act_asym and the kernel as one call (None back from an input with NaN or inf)
    fused = (_int8_int4_cpu._dynamic_linear_op(ext, act_spec) if qdata.is_contiguous() and scale.is_contiguous()
             else None)

    def run(x, bias):
        m = x.shape[0]
        if (m == 0 or m > max_m or not _plain_cpu(x) or wants_grad(x, bias)
                or (bias is not None and (bias.shape != (n,) or not bias.is_floating_point() or not bias.is_cpu))):
            return None
        if fused is not None and x.is_contiguous() and (bias is None or bias.is_contiguous()):
            out = fused(x, qdata, scale, bias)
            if out is not None:
                return out
        return _int8_int4_cpu._forward(ext, x, qdata, scale, bias, act_spec)

    return run


# --- float8 ----------------------------------------------------------------------------------------

def _fp8_act_rule(act_spec: QuantSpec, dtype) -> tuple[bool, float, bool] | None:
    """``(per_token, eps, e5m2)`` of dynamic float8 activations (per token or per tensor) in x's
    ``dtype`` that the C++ fake quantization fused into the fp8 / int4 GEMVs takes (``csrc/fp8_act.h``,
    as ``float8._act_rule`` says for the routing), or None where it never applies."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return _float8._act_rule(act_spec)


def make_float8_plan(qdata, scale, act_scale, act_pre_scale, act_spec, kernel: str, dtype: torch.dtype) -> Plan | None:
    """The decode plan of a ``Float8Tensor``'s fields, or None: weight-only (the op's CPU body at
    M <= ``tiled_max_m()``), dynamic float8 activations (the fake quantization inside the same call) or a
    static activation scale (the routing's C++ fake quantization, then the weight-only call; the scale
    read from its tensor on every call, so an in-place edit is seen)."""
    if kernel != "auto" or act_pre_scale is not None or not _weight_ok(qdata, scale, act_scale):
        return None
    hugepages.advise_all((qdata, scale))
    probe = torch.empty(1, qdata.shape[-1] if qdata.dim() == 2 else 0, dtype=dtype)
    if qdata.dim() != 2 or not _fp8_cpu._supported(probe, qdata, scale, None):
        return None
    ext = _ext.load("fp8_cpu")
    if ext is None:
        return None
    n = qdata.shape[0]
    gemv, tiled, chunk = _fp8_cpu.GEMV_MAX_M, _fp8_cpu.tiled_max_m(), _fp8_cpu.CHUNK_ROWS

    if act_spec is None:
        def run(x, bias):
            if (x.shape[0] > tiled or x.shape[0] == 0 or not _plain_cpu(x) or wants_grad(x, bias)
                    or (bias is not None and (bias.dtype != x.dtype or bias.shape != (n,) or not bias.is_cpu))):
                return None
            return ext.fp8_linear(x, qdata, scale, bias, gemv, tiled, chunk,
                                  x.shape[0] <= gemv and _fp8_cpu.weight_finite(qdata))
        return run
    if act_scale is not None:
        return _float8_static(ext, qdata, scale, act_scale, act_spec, dtype)
    rule, fused = _fp8_act_rule(act_spec, dtype), _fp8_cpu.act_linear_fn()
    if rule is None or fused is None:
        return None
    per_token, eps, e5m2 = rule

    def run_act(x, bias):  # the fake quantization inside the GEMV: float8_act_linear_cpu's one call
        if (x.shape[0] > tiled or x.shape[0] == 0 or not _plain_cpu(x) or not x.is_contiguous()
                or wants_grad(x, bias)
                or (bias is not None and (bias.dtype != x.dtype or bias.shape != (n,) or not bias.is_cpu))):
            return None
        return fused(x, qdata, scale, bias, gemv, tiled, chunk, per_token, eps, e5m2,
                     x.shape[0] <= gemv and _fp8_cpu.weight_finite(qdata))

    return run_act


def _float8_static(ext, qdata, scale, act_scale, act_spec: QuantSpec, dtype) -> Plan | None:
    """``float8_activation_linear``'s CPU route for a static per-tensor activation scale at small M: the
    C++ fake quantization with that scale (``float8._fake_quantize_cpu``), then ``fp8_linear`` as the
    weight-only plan calls it; both in one call (``fp8_linear_act_static``, the same values) where the
    build has it."""
    rule, fq = _fp8_act_rule(act_spec, dtype), getattr(_ext.load("int8_act"), "fake_quant_fp8", None)
    if rule is None or fq is None or act_scale.numel() != 1 or rule[0]:
        return None
    one_call = _fp8_cpu.act_static_linear_fn()
    _, eps, e5m2 = rule
    n = qdata.shape[0]
    gemv, tiled, chunk = _fp8_cpu.GEMV_MAX_M, _fp8_cpu.tiled_max_m(), _fp8_cpu.CHUNK_ROWS
    s_x = act_scale.reshape(-1)  # a view

    def run(x, bias):
        if (x.shape[0] > tiled or x.shape[0] == 0 or not _plain_cpu(x) or not x.is_contiguous()
                or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or wants_grad(x, bias)
                or (bias is not None and (bias.dtype != x.dtype or bias.shape != (n,) or not bias.is_cpu))):
            return None
        a = s_x.item()  # 0.4 us where float(s_x[0]) (a view, then the value) took 2.6
        if not 0.0 < a < _INF:
            return None
        finite = x.shape[0] <= gemv and _fp8_cpu.weight_finite(qdata)
        if one_call is not None:
            return one_call(x, qdata, scale, bias, gemv, tiled, chunk, a, eps, e5m2, finite)
        xq, _ = fq(x, a, False, eps, e5m2)
        return ext.fp8_linear(xq, qdata, scale, bias, gemv, tiled, chunk, finite)

    return run

