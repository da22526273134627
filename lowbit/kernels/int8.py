"""Int8 linear ops (torch.library custom ops): weight-only and int8-activation (W8A8).

Each op has one reference implementation (dequantize with the primitives, then ``F.linear``)
and fast implementations chosen here by device and shape:

* weight-only, CPU, M <= ``_EXT_MAX_M``: our AVX-512 C++ kernel (``csrc/int8_gemv.cpp``, built
  on first use; any group size that is a multiple of 16); per-row scale and
  M <= ``_INT8PACK_MAX_M``: ``torch._weight_int8pack_mm``; otherwise the weight is dequantized
  in row chunks of ``_CHUNK_ROWS`` (each chunk stays in cache) and each chunk is multiplied with
  ``torch.mm`` into its slice of the output;
* W8A8, CPU and CUDA: activations quantized with the primitives (per token, or the static scale
  given), ``torch._int_mm`` in int32, an exact integer zero-point correction for asymmetric
  activations (``zp_x * rowsum(W)``), one float32 rescale and one cast.

Inputs are 2-D (the tensor layer folds leading dims). Weights are symmetric int8 with a float32
scale of shape ``(N, K // group)``; an asymmetric weight (with a zero point) runs the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from lowbit.granularity import PerTensor, PerToken
from lowbit.kernels import _ext
from lowbit.kernels.preference import check_kernel
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from lowbit.spec import QuantSpec

__all__ = ["int8_weight_only_linear", "int8_activation_linear", "weight_spec", "activation_spec"]

_EXT_MAX_M = 4  # our GEMV streams the weight once per call; above this its per-row dots lose
_INT8PACK_MAX_M = 16  # _weight_int8pack_mm wins at decode sizes, loses to a bf16 GEMM above
_CHUNK_ROWS = 512  # 512 x 4096 bf16 = 4 MiB: the dequantized chunk stays in L2/L3


def weight_spec(has_zero_point: bool) -> QuantSpec:
    """The int8 weight spec (blocks come from the scale's shape)."""
    return QuantSpec("int8", symmetric=not has_zero_point)


def activation_spec(symmetric: bool, static: bool) -> QuantSpec:
    """Per-token (dynamic) or per-tensor (static) int8 activation spec."""
    return QuantSpec("int8", PerTensor() if static else PerToken(), symmetric=symmetric)


def _check_2d(input, qdata, scale):
    if input.dim() != 2 or qdata.dim() != 2 or input.shape[1] != qdata.shape[1]:
        raise ValueError(f"input {tuple(input.shape)} and weight {tuple(qdata.shape)} must be (M, K) and (N, K)")
    if qdata.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(f"qdata must be int8 and scale float32, got {qdata.dtype} and {scale.dtype}")


# --- weight-only ------------------------------------------------------------------------------


def _weight_only_reference(input, qdata, scale, zero_point, bias):
    w = dequantize_affine(qdata, scale, zero_point, weight_spec(zero_point is not None), input.dtype)
    return F.linear(input, w, bias)


def _weight_only_chunked(input, qdata, scale, bias):
    n = qdata.shape[0]
    out = torch.empty(input.shape[0], n, dtype=input.dtype, device=input.device)
    spec = weight_spec(False)
    for i in range(0, n, _CHUNK_ROWS):
        j = min(i + _CHUNK_ROWS, n)
        w = dequantize_affine(qdata[i:j], scale[i:j], None, spec, input.dtype)
        torch.mm(input, w.t(), out=out[:, i:j])
    return out if bias is None else out.add_(bias)


@torch.library.custom_op("lowbit::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """``input @ dequantize(qdata, scale, zero_point).T + bias`` in ``input.dtype``.

    Args:
        input: (M, K) float activations.
        qdata: (N, K) int8 weight.
        scale: (N, K // group) float32.
        zero_point: same shape as scale (int32) or None for a symmetric weight.
        bias: (N,) in input.dtype or None.
        kernel: "auto" or "reference" (``KernelPreference``).
    """
    _check_2d(input, qdata, scale)
    if check_kernel(kernel) == "reference" or zero_point is not None:
        return _weight_only_reference(input, qdata, scale, zero_point, bias)
    m, k = input.shape
    if input.device.type == "cpu" and m <= _EXT_MAX_M and (k // scale.shape[1]) % 16 == 0 and qdata.is_contiguous():
        ext = _ext.load()
        if ext is not None:
            out = ext.int8_weight_only_mm(input, qdata, scale.expand(qdata.shape[0], -1))
            return out if bias is None else out + bias
    if input.device.type == "cpu" and m <= _INT8PACK_MAX_M and scale.shape[1] == 1:
        s = scale.expand(qdata.shape[0], 1).reshape(-1).to(input.dtype).contiguous()  # the kernel takes scales in x's dtype
        out = torch._weight_int8pack_mm(input, qdata, s)
        return out if bias is None else out + bias
    if input.device.type == "cpu":
        return _weight_only_chunked(input, qdata, scale, bias)
    return _weight_only_reference(input, qdata, scale, zero_point, bias)


@int8_weight_only_linear.register_fake
def _(input, qdata, scale, zero_point, bias, kernel):
    return input.new_empty(input.shape[0], qdata.shape[0])


# --- int8 activations x int8 weights ----------------------------------------------------------

# rowsum(W) for the asymmetric-activation correction, computed once per weight (weakly keyed on
# the qdata tensor, recomputed when it is modified in place, e.g. by load_state_dict).
_ROWSUMS = WeakTensorKeyDictionary()


def _rowsum(qdata: torch.Tensor) -> torch.Tensor:
    hit = _ROWSUMS.get(qdata)
    if hit is not None and hit[0] == qdata._version:
        return hit[1]
    rs = qdata.sum(dim=1, dtype=torch.int32)
    _ROWSUMS[qdata] = (qdata._version, rs)
    return rs


def _quantize_activation(input, act_scale, act_zero_point, act_symmetric):
    static = act_scale is not None
    spec = activation_spec(act_symmetric, static)
    if static:
        s, zp = act_scale.reshape(1, 1), None if act_zero_point is None else act_zero_point.reshape(1, 1)
    else:
        s, zp = choose_qparams_affine(input, spec, check_finite=False)
    return quantize_affine(input, s, zp, spec), s, zp, spec


def _int_mm(xq: torch.Tensor, qdata: torch.Tensor) -> torch.Tensor:
    m = xq.shape[0]
    if xq.device.type == "cuda" and m <= 16:  # cuBLAS int8 GEMM needs M > 16
        return torch._int_mm(F.pad(xq, (0, 0, 0, 17 - m)), qdata.t())[:m]
    return torch._int_mm(xq, qdata.t())


@torch.library.custom_op("lowbit::int8_activation_linear", mutates_args=())
def int8_activation_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    act_symmetric: bool,
    kernel: str,
) -> torch.Tensor:
    """Int8 activations x int8 weights: the activation is quantized here, per token with qparams
    chosen by the primitives (``act_scale`` None) or with the static per-tensor ``act_scale`` /
    ``act_zero_point``; the result is ``dequant(x_q) @ dequant(W).T + bias`` in ``input.dtype``.

    Args:
        input: (M, K) float activations.
        qdata: (N, K) int8 symmetric weight; scale: (N, 1) or (1, 1) float32.
        bias: (N,) or None.
        act_scale, act_zero_point: static activation qparams (one element each) or None.
        act_symmetric: symmetric (no zero point) or asymmetric activation quantization.
        kernel: "auto" or "reference".
    """
    _check_2d(input, qdata, scale)
    if scale.shape[1] != 1:
        raise ValueError(f"int8 activations need a per-row or per-tensor weight scale, got scale {tuple(scale.shape)}")
    xq, s_x, zp_x, spec = _quantize_activation(input, act_scale, act_zero_point, act_symmetric)
    if check_kernel(kernel) == "reference":
        x = dequantize_affine(xq, s_x, zp_x, spec)
        w = dequantize_affine(qdata, scale, None, weight_spec(False))
        return F.linear(x, w, None if bias is None else bias.float()).to(input.dtype)
    acc = _int_mm(xq, qdata)
    if zp_x is not None:
        acc = acc - zp_x.to(torch.int32) * _rowsum(qdata)
    out = acc.float() * s_x.float() * scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(input.dtype)


@int8_activation_linear.register_fake
def _(input, qdata, scale, bias, act_scale, act_zero_point, act_symmetric, kernel):
    return input.new_empty(input.shape[0], qdata.shape[0])


# --- autograd: gradients flow to the input (straight through any activation rounding) and the
# bias; the int8 weight is frozen. This lets a float bias or a LoRA adapter train on top.


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.input_dtype = inputs[0].dtype
    ctx.has_bias = inputs[3] is not None


def _backward_common(ctx, grad):
    qdata, scale = ctx.saved_tensors
    w = dequantize_affine(qdata, scale, None, weight_spec(False), grad.dtype)
    grad_input = (grad @ w).to(ctx.input_dtype)
    grad_bias = grad.sum(0) if ctx.has_bias else None
    return grad_input, grad_bias


def _weight_only_setup(ctx, inputs, output):
    input, qdata, scale, zero_point, bias, _ = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.has_bias = bias is not None


def _weight_only_backward(ctx, grad):
    qdata, scale, zero_point = ctx.saved_tensors
    w = dequantize_affine(qdata, scale, zero_point, weight_spec(zero_point is not None), grad.dtype)
    return grad @ w, None, None, None, (grad.sum(0) if ctx.has_bias else None), None


def _activation_backward(ctx, grad):
    grad_input, grad_bias = _backward_common(ctx, grad)
    return grad_input, None, None, grad_bias, None, None, None, None


int8_weight_only_linear.register_autograd(_weight_only_backward, setup_context=_weight_only_setup)
int8_activation_linear.register_autograd(_activation_backward, setup_context=_setup_context)
