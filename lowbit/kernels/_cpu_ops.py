"""The C++ decode GEMVs as dispatcher ops, ``lowbit_cpu::int8_weight_only_mm``,
``lowbit_cpu::int4_gemv_bf16``, ``lowbit_cpu::int8_int4_dynamic_linear`` (8da4w: the activation
quantized and multiplied in integers in one call), ``lowbit_cpu::w8a8_dynamic_linear`` (W8A8 with
dynamic per-token activations in one call; a C++ kernel in the AVX2 build only, whose CPUs lack the int8
dot products ``torch._int_mm`` uses) and ``lowbit_cpu::fp8_small_linear`` / ``fp8_small_act_linear``
(float8 weights at M <= ``tiled_max_m``, without or with dynamic float8 activations: eager's one C++ call,
the weight's NaN / inf count included): defined here, in every process that imports ``lowbit.kernels``,
whether or not the C++ extension can be built.

Why not in the extension: torch.compile chooses these ops while AOTAutograd runs a quantized
tensor's dispatch, after inductor's FX-graph and AOTAutograd cache keys are taken. A graph cached
by a process with the extension is then reused by one without it (``LOWBIT_NO_EXT=1``, a failed
build, a non-x86 host sharing the cache), which must still find the ops. So each op's schema, fake
kernel (for torch.compile) and a PyTorch body (``CompositeExplicitAutograd``) live here, and the
extension adds only its CPU kernel (``TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m)`` in ``csrc/``), which
the dispatcher takes over the body for CPU tensors once the extension is loaded.
``int8_int4_dynamic_linear``'s C++ kernel (``csrc/int8_int4_entry.h``) also takes an input holding NaN /
inf, which the one-call pybind entry declines: such a row gets NaN, as eager's primitives path gives it;
its body runs eager 8da4w's forward (``_int8_int4_cpu._forward``). Either way the op equals eager bit for bit.

The body runs where no CPU kernel is registered yet: it loads the extension and, when that
succeeds, calls the same C++ function (same values bit for bit; later calls dispatch to the C++
kernel directly); otherwise, and for tensors on other devices, it computes the reference: the
weight dequantized to ``x.dtype`` by ``dequantize_blocks`` (``dequantize_affine``'s arithmetic with
the blocks read from the scale's shape: the op carries no spec, and kernels state none), then
``F.linear`` (bit-equal to the reference paths of ``int8.py`` and ``int4.py``; for 8da4w, the
activation fake-quantized by the primitives first, as ``int4.int4_linear`` does without the kernel).
Int8 weight-only's body on CPU runs what eager runs there without the extension instead
(``int8._weight_only_cpu_torch``: ``torch._weight_int8pack_mm`` or converted chunks, the bias where they add
it), so a graph traced with the extension and served to a process without it computes eager's values.

Neither op has an autograd kernel: callers route here only when no gradient is wanted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels import _ext
from lowbit.primitives.affine import dequantize_blocks
from lowbit.primitives.packing import unpack_int4

__all__ = ["int8_weight_only_mm", "int4_gemv_bf16", "int8_int4_dynamic_linear", "w8a8_dynamic_linear", "fp8_small_linear",
           "fp8_small_act_linear"]

_LIB = torch.library.Library("lowbit_cpu", "FRAGMENT")


def _group_size(k: int, scale: torch.Tensor, what: str) -> int:
    if scale.dim() != 2 or scale.shape[1] == 0 or k % scale.shape[1]:
        raise ValueError(f"{what}: scale {tuple(scale.shape)} must be (N, groups) with groups dividing K = {k}")
    return k // scale.shape[1]


def _int8_weight_only_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(w, scale).T + bias`` in ``x.dtype`` for int8 ``w`` (N, K) with float32 ``scale``
    (N, K // group), symmetric: on CPU the extension's GEMV, ``bias`` added to its output, else the custom op's
    PyTorch CPU paths (``int8._weight_only_cpu_torch``: what eager runs without the extension, bit for bit); the
    reference elsewhere. Raises ValueError on a scale whose groups don't divide K."""
    if x.device.type == "cpu":
        ext = _ext.load("int8_gemv")
        if ext is not None:
            out = ext.int8_weight_only_mm(x, w, scale)
            return out if bias is None else out + bias
    _group_size(w.shape[-1], scale, "int8_weight_only_mm")
    if x.device.type == "cpu":
        from lowbit.kernels.int8 import _weight_only_cpu_torch

        return _weight_only_cpu_torch(x, w, scale, bias)
    return F.linear(x, dequantize_blocks(w, scale, None, x.dtype), bias)


def _int4_gemv_bf16(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` in ``x.dtype`` for the canonical packed int4 ``qdata``
    (N, K // 2), float32 ``scale`` (N, K // group), an int8 ``zero_point`` in [0, 15] or a float32
    one (uint4, integer or float zero-point domain) or None (two's complement int4). Raises ValueError on a scale whose groups don't divide K."""
    if x.device.type == "cpu":
        ext = _ext.load("int4_cpu")
        if ext is not None:
            return ext.gemv_bf16(x, qdata, scale, zero_point, bias)
    _group_size(2 * qdata.shape[-1], scale, "int4_gemv_bf16")
    return F.linear(x, dequantize_blocks(unpack_int4(qdata, zero_point is None), scale, zero_point, x.dtype), bias)


def _int8_int4_dynamic_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                               qmin: int, qmax: int, eps: float, act_key: str) -> torch.Tensor:
    """8da4w: ``x`` (M, K) quantized to int8 per token under the activation spec ``act_key`` (``spec_key``'s form:
    asymmetric, float32 scales; ``qmin``, ``qmax`` and ``eps`` are its numbers, for the C++ kernel), times the
    symmetric int4 ``qdata`` (N, K // 2) with float32 ``scale`` (N, K // group), plus ``bias``, in ``x.dtype``.
    Raises ValueError on a scale whose groups don't divide K."""
    from lowbit.spec import spec_from_key

    act_spec = spec_from_key(act_key)
    if x.device.type == "cpu":
        ext = _ext.load("int8_int4")
        if ext is not None:
            from lowbit.kernels._int8_int4_cpu import _forward

            return _forward(ext, x.contiguous(), qdata, scale, bias, act_spec)
    from lowbit.primitives.affine import choose_qparams_affine, fake_quantize_affine

    _group_size(2 * qdata.shape[-1], scale, "int8_int4_dynamic_linear")
    s, zp = choose_qparams_affine(x, act_spec, check_finite=False)
    x = fake_quantize_affine(x, act_spec, s, zp)
    return F.linear(x, dequantize_blocks(unpack_int4(qdata, True), scale, None, x.dtype), bias)


def _w8a8_entry():
    """The loaded ``int8_act`` build's one-call W8A8 entry, or None (no extension, or the AVX-512 build)."""
    return getattr(_ext.load("int8_act"), "w8a8_dynamic_linear", None)


def _w8a8_dynamic_linear(x: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None,
                         eps: float, act_key: str, w_key: str) -> torch.Tensor:
    """W8A8: ``x`` (M, K) quantized to int8 per token, symmetric (the spec ``act_key``, ``spec_key``'s form;
    ``eps`` its scale floor, for the C++ kernel), times the int8 ``w`` (N, K) under ``w_key`` with one float32
    scale per row ``s_w`` (N,), plus ``bias``, in ``x.dtype``: the AVX2 build's ``w8a8_dynamic_linear`` where
    it loads, else ``w8a8.py``'s aten route (the same float32 operations in the same order: the same values)."""
    fn = _w8a8_entry() if x.device.type == "cpu" else None
    if fn is not None:
        return fn(x.contiguous(), w.contiguous(), s_w.contiguous(), bias, eps)
    from lowbit.kernels.w8a8 import _activation_forward_aten
    from lowbit.spec import spec_from_key

    return _activation_forward_aten(x, w, s_w.reshape(-1, 1), bias, None, None, spec_from_key(act_key),
                                    spec_from_key(w_key), "auto")


def _fp8_small_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      gemv_max_m: int, tiled_max_m: int, chunk_rows: int, spec: str) -> torch.Tensor:
    """``x`` (M, K) times the float8 ``qdata`` (N, K) with float32 ``scale`` ((N, 1) or (1, 1)) under the spec
    ``spec`` (``spec_key``'s form), plus ``bias``, in ``x.dtype``, for 1 <= M <= ``tiled_max_m`` (callers route
    here only where ``_fp8_cpu.float8_weight_only_linear_cpu`` takes the case): the extension's ``fp8_linear``,
    as eager calls it, else the reference (``float8``'s plain op body)."""
    fn = getattr(_ext.load("fp8_cpu"), "fp8_linear", None) if x.device.type == "cpu" else None
    if fn is not None:
        from lowbit.kernels._fp8_cpu import weight_finite

        return fn(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows,
                  x.shape[0] <= gemv_max_m and weight_finite(qdata))
    from lowbit.kernels.float8 import _float8_linear_cpu_body

    return _float8_linear_cpu_body(x, qdata, scale, bias, spec)


def _fp8_small_act_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          gemv_max_m: int, tiled_max_m: int, chunk_rows: int, act_per_token: bool, act_eps: float,
                          act_e5m2: bool, spec: str, act_spec: str) -> torch.Tensor:
    """:func:`_fp8_small_linear` of ``x`` fake-quantized to float8 under the dynamic activation spec ``act_spec``
    (``act_per_token``, ``act_eps`` and ``act_e5m2`` are its numbers, for the C++ kernel): the extension's
    ``fp8_linear_act``, as eager calls it, else the reference (``float8``'s plain op body)."""
    fn = getattr(_ext.load("fp8_cpu"), "fp8_linear_act", None) if x.device.type == "cpu" else None
    if fn is not None:
        from lowbit.kernels._fp8_cpu import weight_finite

        return fn(x.contiguous(), qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows, act_per_token, act_eps,
                  act_e5m2, x.shape[0] <= gemv_max_m and weight_finite(qdata))
    from lowbit.kernels.float8 import _float8_act_linear_cpu_body

    return _float8_act_linear_cpu_body(x, qdata, scale, bias, spec, act_spec)


def _int8_fake(x, w, scale, bias=None):
    return x.new_empty(x.shape[0], w.shape[0])


def _int4_fake(x, qdata, scale, zero_point, bias):
    return x.new_empty(x.shape[0], qdata.shape[0])


def _int8_int4_fake(x, qdata, scale, bias, qmin, qmax, eps, act_key):
    return x.new_empty(x.shape[0], qdata.shape[0])


def _w8a8_fake(x, w, s_w, bias, eps, act_key, w_key):
    return x.new_empty(x.shape[0], w.shape[0])


def _fp8_fake(x, qdata, *args):
    return x.new_empty(x.shape[0], qdata.shape[0])


_LIB.define("int8_weight_only_mm(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor")
_LIB.define("int4_gemv_bf16(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias) -> Tensor")
_LIB.define("int8_int4_dynamic_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? bias, int qmin, int qmax, float eps, "
            "str act_key) -> Tensor")
_LIB.define("w8a8_dynamic_linear(Tensor x, Tensor w, Tensor s_w, Tensor? bias, float eps, str act_key, str w_key) -> Tensor")
_LIB.define("fp8_small_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? bias, int gemv_max_m, int tiled_max_m, "
            "int chunk_rows, str spec) -> Tensor")
_LIB.define("fp8_small_act_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? bias, int gemv_max_m, int tiled_max_m, "
            "int chunk_rows, bool act_per_token, float act_eps, bool act_e5m2, str spec, str act_spec) -> Tensor")
for _name, _body, _fake in (("int8_weight_only_mm", _int8_weight_only_mm, _int8_fake),
                            ("int4_gemv_bf16", _int4_gemv_bf16, _int4_fake),
                            ("int8_int4_dynamic_linear", _int8_int4_dynamic_linear, _int8_int4_fake),
                            ("w8a8_dynamic_linear", _w8a8_dynamic_linear, _w8a8_fake),
                            ("fp8_small_linear", _fp8_small_linear, _fp8_fake),
                            ("fp8_small_act_linear", _fp8_small_act_linear, _fp8_fake)):
    _LIB.impl(_name, _body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lowbit_cpu::{_name}", _fake, lib=_LIB)

int8_weight_only_mm = torch.ops.lowbit_cpu.int8_weight_only_mm.default
int4_gemv_bf16 = torch.ops.lowbit_cpu.int4_gemv_bf16.default
int8_int4_dynamic_linear = torch.ops.lowbit_cpu.int8_int4_dynamic_linear.default
w8a8_dynamic_linear = torch.ops.lowbit_cpu.w8a8_dynamic_linear.default
fp8_small_linear = torch.ops.lowbit_cpu.fp8_small_linear.default
fp8_small_act_linear = torch.ops.lowbit_cpu.fp8_small_act_linear.default
