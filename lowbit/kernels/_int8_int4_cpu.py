"""8da4w on CPU with integer arithmetic for small M: int8 per-token activations (quantized here as
the primitives do: in C++ for an asymmetric spec, equal bit for bit) times the canonical symmetric int4 weight, exact int32 group sums, float32 scaling
(``csrc/int8_int4.cpp`` with AVX-512 VNNI, else ``csrc/int8_int4_avx2.cpp``: AVX2 + FMA + F16C).

``int8_int4_linear`` computes, with ``xq, s_x, zp_x`` the activation's int8 values, scale and zero
point from ``choose_qparams_affine`` + ``quantize_affine`` under ``act_spec``::

    out[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} (xq[m, k] - zp_x[m]) * w[n, k]  (+ bias[n])

The inner sums are exact integers; each group's sum is scaled once in float32. The reference (fake
quantization, then the float linear) computes the same products from the same ``xq``, but rounds the
dequantized activation and weight to the input dtype first; in float32 the two differ by float32
rounding only.

On a CPU with AMX tiles, a bfloat16 input from M = 32 with a power-of-two group size runs on bf16 tiles
instead (``csrc/int8_int4.cpp``, run_amx): ``xq - zp_x`` (exact in bf16) times the weight's reference bf16
values ``bf16(w * s_w)``, float32 sums over all of K, then ``s_x``: the reference's weight rounding, not the
exact group sums (an int8 tile's sums would leave the tiles once per group to be scaled; slower than the
VNNI panels at g32). ``set_amx(False)`` on the extension switches the tiles off.

When a gradient is wanted, the same forward runs inside an autograd function whose backward is the
fake-quantized path's (straight-through activation quantization, dequantized weight), so outputs do
not depend on whether autograd records.

It returns None (the caller then runs its other paths) when it does not apply: not CPU, input not
bfloat16 / float32 or not (M, K), M = 0 or M > ``max_m()`` (64 for the AVX2 build, no limit for the AVX-512 one), a weight zero point
(asymmetric uint4), a group size not a multiple of 32 or above 256, an activation spec that is not
int8 per token with an integer zero point, the extension not loadable. Under ``torch.compile`` (no
gradient, an asymmetric spec with float32 scales) it returns the dispatcher op
``lowbit_cpu::int8_int4_dynamic_linear`` (``_cpu_ops``), which runs the same forward in the compiled
graph; otherwise None there.
"""

from __future__ import annotations

import sys

import torch

from lowbit.granularity import PerToken
from lowbit.kernels import _cpu_ops, _ext
from lowbit.kernels.preference import wants_grad
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, fake_quantize_affine, quantize_affine
from lowbit.primitives.packing import unpack_int4
from lowbit.spec import QuantSpec, spec_key

__all__ = ["int8_int4_linear", "available", "max_m", "MAX_M", "MAX_GROUP"]

# Largest M taken, per build (``max_m()``). AVX2 build, measured (8 x 4096^2, bf16, an AVX2 EPYC, 2
# threads, load ~1, medians of 7; the path includes the primitives' activation quantization) against
# int4_linear (fake quantization + the int4 float kernels): g32 1.11x / 1.43x / 1.63x / 1.61x / 2.10x at
# M = 1 / 4 / 16 / 32 / 64, g128 1.18x / 1.42x / 2.05x / 2.16x / 2.63x; at M = 128 still 1.3x / 1.9x but
# narrowing (the rows of x one block of groups reads no longer fit L1). 64 keeps a clear margin.
# AVX-512 VNNI build: the same comparison on an AVX-512 Zen 4 (2 threads, interleaved, medians of 5),
# per-lane path: g32 1.87x / 1.31x / 1.26x / 0.89x at M = 1 / 16 / 32 / 64; from M = 9 (16 until session 23, then 12) its GEMM on 64-row
# weight panels packed per call (csrc/int8_int4.cpp; against bf16 F.linear, benchmarks/results/avx512_zen4/
# scratch/int8_int4_gemm_vs_old.py: g32 1.26x at M = 32, 1.39x at M = 256; g128 1.52x / 1.65x): no limit
# (x is taken 256 rows at a time).
_MAX_M_BY_ISA = {"avx2": 64, "avx512": sys.maxsize}
MAX_M = 64  # the largest M every build takes
MAX_GROUP = 256  # the AVX2 build's int16 partial sums hold 8 blocks of 32 (2 * 15 * 128 * 8 < 2^15)

_DTYPES = (torch.bfloat16, torch.float32)


def max_m() -> int:
    """The largest M the build loaded here takes (0 when none loads)."""
    if _ext.load("int8_int4") is None:
        return 0
    return _MAX_M_BY_ISA[_ext.active_isa("int8_int4")]


def available() -> bool:
    """Whether the C++ extension could be built and loaded here."""
    return _ext.load("int8_int4") is not None


def _check(input, qdata, scale, bias) -> None:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {getattr(input, 'dtype', type(input).__name__)}")
    if not isinstance(qdata, torch.Tensor) or qdata.dtype != torch.uint8 or qdata.dim() != 2:
        raise TypeError(f"qdata must be a uint8 (N, K // 2) tensor of packed int4, got "
                        f"{getattr(qdata, 'dtype', type(qdata).__name__)} {tuple(getattr(qdata, 'shape', ()))}")
    if input.dim() != 2 or input.shape[1] != 2 * qdata.shape[1]:
        raise ValueError(f"input {tuple(input.shape)} and qdata {tuple(qdata.shape)} must be (M, K) and (N, K // 2)")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 2:
        raise TypeError(f"scale must be a float32 (N, K // group_size) tensor, got "
                        f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    k = input.shape[1]
    if scale.shape[0] != qdata.shape[0] or scale.shape[1] == 0 or k % scale.shape[1]:
        raise ValueError(f"scale {tuple(scale.shape)} must be (N, K // group_size) for qdata {tuple(qdata.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (qdata.shape[0],)
                             or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating-point ({qdata.shape[0]},) tensor or None, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")


def _takes_act_spec(act_spec: QuantSpec) -> bool:
    return (act_spec.dtype.name == "int8" and isinstance(act_spec.granularity, PerToken)
            and act_spec.zero_point_domain == "int")


def int8_int4_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_spec: QuantSpec,
    spec: QuantSpec,
) -> torch.Tensor | None:
    """8da4w linear with integer arithmetic (see the module docstring), or None when it does not apply.

    Args:
        input: (M, K) bfloat16 or float32 activations (float, quantized here under ``act_spec``).
        qdata: (N, K // 2) uint8, canonical packed int4 (two's complement, low nibble = even k).
        scale: (N, K // g) float32 weight scales.
        zero_point: the weight's zero point; only None (symmetric int4) is taken.
        bias: (N,) floating or None.
        act_spec: the activation ``QuantSpec`` (int8, ``PerToken``, integer zero point).
        spec: the weight's ``QuantSpec`` (the one the tensor stores); only symmetric int4 is taken.
          The backward dequantizes the weight with it.

    Returns:
        (M, N) in ``input.dtype``, or None.

    Raises:
        TypeError: ``input``, ``qdata``, ``scale``, ``act_spec`` or ``spec`` of the wrong type or dtype.
        ValueError: shapes that do not make an (M, K) x (N, K // 2) linear, or a malformed ``bias``.
    """
    for name, sp in (("act_spec", act_spec), ("spec", spec)):
        if not isinstance(sp, QuantSpec):
            raise TypeError(f"{name} must be a QuantSpec, got {type(sp).__name__}")
    _check(input, qdata, scale, bias)
    if zero_point is not None or not _takes_act_spec(act_spec):
        return None
    if spec.dtype.name != "int4" or not spec.symmetric or spec.qmin != -8 or spec.qmax != 7:
        return None
    if input.dtype not in _DTYPES or any(t is not None and t.device.type != "cpu" for t in (input, qdata, scale, bias)):
        return None
    m, k = input.shape
    if m == 0 or m > max_m():
        return None
    gs = k // scale.shape[1]
    if gs % 32 or gs > MAX_GROUP:
        return None
    ext = _ext.load("int8_int4")
    if ext is None:
        return None
    grad = wants_grad(input, bias)
    if torch.compiler.is_compiling():
        # a graph calls the dispatcher op (lowbit_cpu::int8_int4_dynamic_linear, _cpu_ops), whose body runs
        # _forward: the same values as eager; inference only, and only the spec the fused entry takes
        if grad or _dynamic_linear_op(ext, act_spec) is None:
            return None
        return _cpu_ops.int8_int4_dynamic_linear(input, qdata, scale, bias, act_spec.qmin, act_spec.qmax, act_spec.eps,
                                                 spec_key(act_spec))
    if grad:
        return _Int8Int4Linear.apply(input, bias, qdata, scale, act_spec, spec, ext)
    return _forward(ext, input, qdata, scale, bias, act_spec)


def _quantize_input(ext, x: torch.Tensor, act_spec: QuantSpec):
    """``choose_qparams_affine`` + ``quantize_affine`` of ``x`` under ``act_spec``: for an asymmetric
    spec with float32 scales and no NaN/inf in ``x``, the extension's one C++ pass (the same float32
    operations; equal bit for bit), else the primitives (~10 small ops, tens of us per call at decode)."""
    fn = getattr(ext, "quantize_act_asym", None)
    if fn is not None and not act_spec.symmetric and act_spec.scale_dtype == torch.float32 and x.is_contiguous():
        xq, s, zp, ok = fn(x, act_spec.qmin, act_spec.qmax, act_spec.eps)
        if ok:
            return xq, s, zp
    s, zp = choose_qparams_affine(x, act_spec, check_finite=False)
    return quantize_affine(x, s, zp, act_spec), s, zp


def _dynamic_linear_op(ext, act_spec: QuantSpec):
    """``(x, qdata, scale, bias) -> out or None``: the extension's ``int8_int4_dynamic_linear`` under
    ``act_spec``'s qmin, qmax and eps, i.e. ``quantize_act_asym`` and ``int8_int4_linear`` in one C++
    call (the activation's int8 values in thread-local buffers, the output allocated once), equal bit
    for bit to ``_forward_unfused``; None from a call whose input holds NaN or inf (the primitives
    then quantize it). None where ``_quantize_input`` would not use ``quantize_act_asym`` (a symmetric
    spec, non-float32 scales) or the build lacks the entry. Takes contiguous tensors only."""
    fn = getattr(ext, "int8_int4_dynamic_linear", None)
    if fn is None or act_spec.symmetric or act_spec.scale_dtype != torch.float32:
        return None
    qmin, qmax, eps = act_spec.qmin, act_spec.qmax, act_spec.eps
    return lambda x, qdata, scale, bias: fn(x, qdata, scale, bias, qmin, qmax, eps)


def _forward(ext, input, qdata, scale, bias, act_spec):
    fused = _dynamic_linear_op(ext, act_spec)
    if fused is not None and input.is_contiguous():
        out = fused(input.detach(), qdata.contiguous(), scale.contiguous(),
                    None if bias is None else bias.detach().contiguous())
        if out is not None:
            return out
    return _forward_unfused(ext, input, qdata, scale, bias, act_spec)


def _forward_unfused(ext, input, qdata, scale, bias, act_spec):
    """The activation quantized (``_quantize_input``), then the extension's ``int8_int4_linear``."""
    xq, s, zp = _quantize_input(ext, input.detach(), act_spec)
    m = input.shape[0]
    zp = torch.zeros(m, dtype=torch.int32) if zp is None else zp.to(torch.int32)
    out = torch.empty(m, qdata.shape[0], dtype=input.dtype)
    return ext.int8_int4_linear(xq, s.float().contiguous(), zp.contiguous(), qdata.contiguous(), scale.contiguous(),
                                None if bias is None else bias.detach().contiguous(), out)


class _Int8Int4Linear(torch.autograd.Function):
    """The integer forward with the fake-quantized path's gradients (so a forward gives the same
    values with or without autograd): to the input through ``fake_quantize_affine``'s straight-through
    estimator times the dequantized weight, to the bias ``grad.sum(0)``; the int4 weight is frozen."""

    @staticmethod
    def forward(ctx, input, bias, qdata, scale, act_spec, spec, ext):
        ctx.save_for_backward(input, qdata, scale)
        ctx.act_spec, ctx.spec, ctx.has_bias = act_spec, spec, bias is not None
        return _forward(ext, input, qdata, scale, bias, act_spec)

    @staticmethod
    def backward(ctx, grad):
        input, qdata, scale = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_affine(unpack_int4(qdata, signed=True), scale, None, ctx.spec, grad.dtype)
            with torch.enable_grad():
                x = input.detach().requires_grad_()
                s, zp = choose_qparams_affine(x.detach(), ctx.act_spec, check_finite=False)
                (grad_input,) = torch.autograd.grad(fake_quantize_affine(x, ctx.act_spec, s, zp), x, grad @ w)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.sum(0)
        return grad_input, grad_bias, None, None, None, None, None
