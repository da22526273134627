"""Int4 linear: weight-only (custom op ``lowbit::int4_weight_only_linear``), and the same weight
behind int8 per-token activations ("8da4w") or float8 per-row activations.

Canonical weight (what ``Int4Tensor`` stores and saves): ``qdata`` uint8 (N, K // 2) packed by
``pack_int4`` (low nibble = even k), either uint4 in [0, 15] with an int8 ``zero_point``
(N, K // g), or two's complement int4 in [-8, 7] and no zero point; a float32 ``scale``
(N, K // g). The weight stands for ``(q - zero_point) * scale``.

One reference: ``dequantize_affine`` to the input dtype, then ``F.linear``. Fast paths, chosen
here by device and shape, each tested against it:

* CPU: our C++ kernels (``csrc/int4_cpu.cpp``, AVX-512, or ``csrc/int4_cpu_avx2.cpp``, via
  ``_int4_cpu.int4_linear_cpu``) read the canonical layout directly, an int8 or a float32 zero
  point alike (a float one is subtracted in float32 where the reference subtracts it, or removed
  once per group with the integer one's arithmetic in the bf16 GEMV and small-M GEMM); when they can't
  be built or don't take a case (group sizes below 32 or not a power of two), ``_chunked_cpu``:
  rows of W dequantized exactly by the reference's ``dequantize_int4``, a chunk at a time, each
  chunk multiplied (float32) into its slice of the output (no converted copy is kept);
* CUDA: tinygemm ``torch._weight_int4pack_mm`` (bf16 activations) on a layout converted for the
  call only; otherwise the reference.

Nothing the kernels derive from a weight outlives the call.

Activation quantization (8da4w, fp8 x int4) is fake quantization with the primitives followed
by the weight-only op: the activation values are exactly the reference's, so the only
difference from the reference is the kernel's. Except 8da4w on CPU at any M (AVX-512 VNNI build) or
M <= 64 (AVX2 build) where the ``int8_int4`` kernel builds (``_int8_int4_cpu``): the activation is really quantized (the same
primitives), the group sums are exact int32 and each is scaled once in float32; the reference
rounds the fake-quantized activation to the input dtype, so the two differ by that rounding
(>= 40 dB bf16, tests/kernels/test_int8_int4_cpu.py). fp8 x int4 with bf16 x at M <= ``_int4_cpu.gemv_max_m()`` on CPU:
the fake quantization runs inside the GEMV's own copy of x (``_int4_cpu.direct_gemv_fp8_act``, one
C++ call, the same values bit for bit).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lowbit.kernels._int4_cpu import direct_gemv, direct_gemv_fp8_act, int4_linear_cpu
from lowbit.kernels._int8_int4_cpu import int8_int4_linear
from lowbit.kernels.float8 import _act_rule as _fp8_act_rule
from lowbit.kernels.float8 import _fake_quantize_cpu as _fake_quantize_fp8_cpu
from lowbit.kernels.preference import check_kernel, wants_grad
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, fake_quantize_affine
from lowbit.primitives.float8 import choose_qparams_float8, fake_quantize_float8
from lowbit.primitives.packing import unpack_int4
from lowbit.spec import QuantSpec, spec_from_key, spec_key

__all__ = [
    "int4_weight_only_linear",
    "int4_linear",
    "dequantize_int4",
    "fake_quantize_activation",
]

_log = logging.getLogger(__name__)


def _group_size(qdata: torch.Tensor, scale: torch.Tensor) -> int:
    return qdata.shape[-1] * 2 // scale.shape[-1]


def dequantize_int4(
    qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
    output_dtype: torch.dtype,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` from the packed canonical layout under the weight's ``spec``
    (int4 or uint4 values), float32 math, one cast."""
    q = unpack_int4(qdata, signed=spec.dtype.is_signed)
    return dequantize_affine(q, scale, zero_point, spec, output_dtype)


def _check_spec(spec: QuantSpec, zero_point) -> None:
    if spec.dtype.name not in ("int4", "uint4"):
        raise ValueError(f"an int4 weight needs an int4 or uint4 spec, got spec.dtype={spec.dtype.name}")
    if spec.has_zero_point != (zero_point is not None):
        want = "needs a zero point" if spec.has_zero_point else "takes no zero point"
        raise ValueError(f"zero_point is {'None' if zero_point is None else 'given'}, but the weight spec "
                         f"({spec.dtype.name}, symmetric={spec.symmetric}) {want}")
    if zero_point is not None and zero_point.dtype != spec.zero_point_dtype:
        raise ValueError(f"zero_point dtype {zero_point.dtype} != spec.zero_point_dtype {spec.zero_point_dtype}")


def _check(input, qdata, scale, zero_point):
    if input.dim() != 2 or qdata.dim() != 2 or input.shape[1] != qdata.shape[1] * 2:
        raise ValueError(
            f"input {tuple(input.shape)} and packed weight {tuple(qdata.shape)} must be (M, K) and (N, K // 2)"
        )
    if qdata.dtype != torch.uint8 or scale.dtype != torch.float32:
        raise TypeError(f"qdata must be uint8 (packed int4) and scale float32, got {qdata.dtype} and {scale.dtype}")
    if scale.dim() != 2 or scale.shape[0] != qdata.shape[0] or scale.shape[1] == 0 or input.shape[1] % scale.shape[1]:
        raise ValueError(f"scale {tuple(scale.shape)} must be (N, K // group_size) for weight {tuple(qdata.shape)}")
    if zero_point is not None and (zero_point.shape != scale.shape or zero_point.dtype not in (torch.int8, torch.float32)):
        raise ValueError(f"zero_point must be int8 (integer domain) or float32 (float domain) shaped like scale "
                         f"{tuple(scale.shape)}, got {zero_point.dtype} {tuple(zero_point.shape)}")


def _reference(input, qdata, scale, zero_point, bias, spec):
    return F.linear(input, dequantize_int4(qdata, scale, zero_point, spec, input.dtype), bias)


# --- fallbacks off our C++ kernels: nothing converted outlives the call ------------------------------

_CHUNK_ELEMENTS = 1 << 20  # weight elements dequantized at a time (4 MiB of float32 temporaries)


def _chunked_cpu(input, qdata, scale, zero_point, bias, spec):
    """Rows of W dequantized exactly (the reference's own ``dequantize_int4`` on a slice of rows, in
    the input dtype) a chunk at a time, each chunk multiplied into its column slice of the output;
    the only weight copy is one chunk. The matmul runs in float32 on those exact values, with one
    rounding of the result to the input dtype, as the reference's bf16/fp16 matmul accumulates:
    equal to the reference up to accumulation order. (CPUs that reach this path lack our AVX-512
    kernels, and mostly native bf16 matmul too: there float32 runs several times faster.)"""
    m, k = input.shape
    n = qdata.shape[0]
    x = input.float()
    out = torch.empty(m, n, dtype=torch.float32)
    rows = max(1, min(n, _CHUNK_ELEMENTS // max(k, 1)))
    buf = torch.empty(rows, k) if input.dtype != torch.float32 else None
    b = None if bias is None else bias.float()
    for i in range(0, n, rows):
        j = min(i + rows, n)
        zp = None if zero_point is None else zero_point[i:j]
        w = dequantize_int4(qdata[i:j], scale[i:j], zp, spec, input.dtype)
        if buf is not None:
            w = buf[: j - i].copy_(w)
        if b is None:
            torch.mm(x, w.t(), out=out[:, i:j])
        else:
            torch.addmm(b[i:j], x, w.t(), out=out[:, i:j])
    return out.to(input.dtype)


def _unsigned_nibbles(qdata, zero_point) -> torch.Tensor:
    """The 4-bit values as uint8 in [0, 15]: asymmetric q as is, symmetric q + 8."""
    return unpack_int4(qdata, signed=False) if zero_point is not None else unpack_int4(qdata, signed=False) ^ 8


def _scales_and_zeros(scale, zero_point, dtype) -> torch.Tensor:
    """tinygemm's (K // g, N, 2) scales and float zeros: w = (u - 8) * s + z, so z = (8 - zp) * s."""
    zp = 8.0 if zero_point is None else zero_point.float()
    z = (8.0 - zp) * scale if zero_point is not None else torch.zeros_like(scale)
    return torch.stack([scale, z], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _tinygemm_cuda(input, qdata, scale, zero_point, bias):
    """tinygemm on a layout converted for this call only (a copy kept for the model's lifetime
    would be about 1 byte per parameter next to the canonical 0.5)."""
    g = _group_size(qdata, scale)
    n, k = qdata.shape[0], input.shape[1]
    if input.dtype != torch.bfloat16 or g not in (32, 64, 128, 256) or n % 8 or k % 128:
        return None
    inner_k_tiles = 8 if k % 256 == 0 else 4
    u = _unsigned_nibbles(qdata, zero_point)
    tinygemm_bytes = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()  # tinygemm: even k in the HIGH nibble
    packed = torch._convert_weight_to_int4pack(tinygemm_bytes, inner_k_tiles)
    del u, tinygemm_bytes
    out = torch._weight_int4pack_mm(input.contiguous(), packed, g, _scales_and_zeros(scale, zero_point, torch.bfloat16))
    return out if bias is None else out + bias


@torch.library.custom_op("lowbit::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: str,
    kernel: str,
) -> torch.Tensor:
    """``input @ dequantize(W).T + bias`` in ``input.dtype`` for a packed int4 weight.

    Args:
        input: (M, K) float activations.
        qdata: (N, K // 2) uint8, packed canonical layout (see the module docstring).
        scale: (N, K // g) float32.
        zero_point: (N, K // g) int8 in [0, 15] or float32 (uint4 weight, integer or float zero-point
            domain), or None (int4 two's complement).
        bias: (N,) in input.dtype or None.
        spec: ``spec_key`` of the weight's ``QuantSpec`` (int4 symmetric, or uint4 with an int8 or
            float32 zero point), the one the tensor stores.
        kernel: "auto" or "reference".
    """
    _check(input, qdata, scale, zero_point)
    spec = spec_from_key(spec)
    _check_spec(spec, zero_point)
    if check_kernel(kernel) == "reference":
        return _reference(input, qdata, scale, zero_point, bias, spec)
    out = None
    if input.device.type == "cpu":
        out = int4_linear_cpu(input, qdata, scale, zero_point, bias)
        if out is None:
            out = _chunked_cpu(input, qdata, scale, zero_point, bias, spec)
    elif input.device.type == "cuda":
        out = _tinygemm_cuda(input, qdata, scale, zero_point, bias)
    return _reference(input, qdata, scale, zero_point, bias, spec) if out is None else out


@int4_weight_only_linear.register_fake
def _(input, qdata, scale, zero_point, bias, spec, kernel):
    return input.new_empty(input.shape[0], qdata.shape[0])


def _setup(ctx, inputs, output):
    input, qdata, scale, zero_point, bias, spec, _ = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.has_bias = bias is not None
    ctx.spec = spec_from_key(spec)


def _backward(ctx, grad):
    """Gradients flow to the input and the bias; the int4 weight is frozen."""
    qdata, scale, zero_point = ctx.saved_tensors
    grad_bias = grad.sum(0) if ctx.has_bias else None
    w = dequantize_int4(qdata, scale, zero_point, ctx.spec, grad.dtype)
    return grad @ w, None, None, None, grad_bias, None, None


int4_weight_only_linear.register_autograd(_backward, setup_context=_setup)


# --- activations -------------------------------------------------------------------------------------


def fake_quantize_activation(input: torch.Tensor, act_spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize ``input`` (M, K) with ``act_spec`` (int8 per token, or float8 per token /
    per tensor), scales from the primitives, result in ``input.dtype``, straight-through gradient."""
    if act_spec.dtype.is_float:
        s = choose_qparams_float8(input.detach(), act_spec, check_finite=False)
        return fake_quantize_float8(input, act_spec, s)
    s, zp = choose_qparams_affine(input.detach(), act_spec, check_finite=False)
    return fake_quantize_affine(input, act_spec, s, zp)


def int4_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: QuantSpec,
    act_spec: QuantSpec | None,
    kernel: str,
) -> torch.Tensor:
    """Int4 weight (stored under ``spec``) with float activations (``act_spec`` None) or with
    activations fake-quantized by ``act_spec`` first (8da4w: int8 per-token asymmetric; fp8 x int4:
    float8 per token)."""
    if act_spec is not None and not act_spec.dtype.is_float and kernel == "auto":  # 8da4w: integer kernel, small M
        if (out := int8_int4_linear(input, qdata, scale, zero_point, bias, act_spec, spec)) is not None:
            return out
    rule = _fp8_act_rule(act_spec) if act_spec is not None and kernel == "auto" else None
    if rule is not None and not torch.compiler.is_compiling():  # fp8 x int4 at decode: quantized inside the GEMV
        if (out := direct_gemv_fp8_act(input, qdata, scale, zero_point, bias, *rule)) is not None:
            return out
    if act_spec is not None:
        x = _fake_quantize_fp8_cpu(input, act_spec, None) if act_spec.dtype.is_float and kernel == "auto" else None
        input = fake_quantize_activation(input, act_spec) if x is None else x  # x: one C++ pass, same bits
    if kernel == "auto":  # decode-sized bf16 on CPU: the same C++ GEMV without the custom op's Python layers
        out = direct_gemv(input, qdata, scale, zero_point, bias)
        if out is not None:
            return out
        # eager CPU calls that want no gradient, above the GEMV: the custom op's CPU body (int4_linear_cpu, the same
        # kernels, the same values) without its dispatch, 11-16 us a call (SmolLM2's 576-wide layers run 80-400 us:
        # benchmarks/results/avx512_zen4/scratch/custom_op_skip_ab_session27.txt)
        if (input.device.type == "cpu" and input.dim() == 2 and not torch.compiler.is_compiling()
                and not wants_grad(input, bias)):
            _check_spec(spec, zero_point)
            out = int4_linear_cpu(input, qdata, scale, zero_point, bias)
            if out is not None:
                return out
    return int4_weight_only_linear(input, qdata, scale, zero_point, bias, spec_key(spec), kernel)
