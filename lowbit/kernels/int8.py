"""Int8 weight-only linear (custom op ``lowbit::int8_weight_only_linear``); int8 activations (W8A8) are
``lowbit.kernels.w8a8``, which shares this module's argument checks and input gradient.

One reference implementation (dequantize with the primitives, then ``F.linear``) and fast
implementations chosen here by device and shape:

* CPU, M <= ``_ext_max_m(dtype, K, groups)`` (by the build that runs, x's dtype and, for bf16 x, the weight's K
  and scales per row): our C++ kernel (``csrc/int8_gemv.cpp``, AVX-512, or
  ``csrc/int8_gemv_avx2.cpp`` on CPUs without it, built on first use; any group size that is a
  multiple of 16); bfloat16, per-row scale and
  M <= ``_INT8PACK_MAX_M``: ``torch._weight_int8pack_mm`` (see ``_int8pack_takes``); bf16 x at larger M on a
  CPU with AVX-512 BF16: ``int8_weight_only_gemm`` (``csrc/gemm_bf16.h``), a bf16 GEMM that makes the
  weight's bf16 values (the reference's, bit for bit) one L2-resident panel at a time inside the GEMM;
  otherwise the weight is converted
  in row chunks of ``_CHUNK_BYTES`` (each chunk stays in cache) and each chunk is multiplied with
  ``torch.mm`` into its slice of the output, in float32 for bf16/fp16 input where the CPU has no
  native half matmul (``host.matmul_dtype``); other devices: the reference.

Inputs are 2-D (the tensor layer folds leading dims). Weights are symmetric int8 with a float32
scale of shape ``(N, K // group)``; an asymmetric weight (with a zero point) runs the reference.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from lowbit.kernels import _cpu_ops, _ext, host
from lowbit.kernels.preference import check_kernel, wants_grad
from lowbit.primitives.affine import dequantize_affine, dequantize_blocks
from lowbit.spec import QuantSpec, spec_from_key, spec_key

__all__ = ["int8_weight_only_linear", "int8_weight_only_linear_any"]

# AVX-512 build: the AVX2 build's register tiles at 16 lanes (until 2026-12-04 it made a pass over the
# weight per row of x and took M = 1 only). 8 x 4096^2, bf16 x, 2 threads, AMD Zen 4, ms ours /
# _weight_int8pack_mm / bf16: M = 1: 4.68 / 6.59 / 15.22, M = 2: 5.27 / 7.79 / 13.85, M = 4: 8.02 / 9.71 /
# 14.98, M = 8: 13.99 / 18.19 / 17.92, M = 16: 25.43 / 33.89 / 21.89, where the chunked bf16 path (the
# route above 8) was level with ours (36.6 / 37.1 in a slower moment) and ahead at M = 32.
# Session 24 (Zen 4, 2 threads, through quantize_ + nn.Linear, ms, limit 8 / the GEMV at every M;
# benchmarks/results/avx512_zen4/scratch/int8wo_gemv_max_m_session24.txt): above 8 the route ran gemm_bf16 for bf16
# x and the chunked path for float32 / float16 x. bf16 x, 8 x 4096^2: M = 9 20.2 / 13.2, M = 16 23.0 / 22.7, M = 32
# 36.5 / 37.9, M = 64 57.1 / 79.0; SmolLM2's three other shapes (30 layers each) 1.18-1.89x at M = 9-16, 0.84-1.09x
# at 32. So bf16 x takes the GEMV up to 16. Float32 and float16 x: 1.19-3.87x at M = 9-64 on every shape (8 x 4096^2
# float32 M = 64 161.6 / 109.7), float32 1.15-1.86x at M = 128 and 0.98-1.48x at 256 (8 x 4096^2 M = 128 371.6 /
# 199.9), so up to 128 (float16 x, measured at 16 and 64 only, is widened to float32 and reaches the same paths).
_EXT_MAX_M = 16  # bf16 x
# Session 27 (Zen 4, 2 threads): bf16 x with one scale per row from M = 9 converts each block of 4 weight rows to bf16
# once for every row of x (csrc/int8_gemv.cpp, run_scratch). ms GEMV / gemm_bf16 / bf16 F.linear
# (benchmarks/results/avx512_zen4/scratch/int8wo_scratch_tiles_session27.txt, _large_m.txt): 8 x 4096^2 M = 16 15.15 /
# 22.08 / 21.90, M = 32 25.55 / 29.74 / 29.54, M = 48 36.05 / 41.07 / 42.35, M = 64 47.81 / 49.00 / 49.70, M = 96
# 83.13 / 66.51 / 69.26; SmolLM2's layers (K = 576, 1536) M = 16 1.25 / 1.19 / 1.83, M = 24 1.79 / 1.55 / 2.28. So
# per-row weights with K >= LARGE_K take the GEMV up to _EXT_MAX_M_LARGE_K; smaller K and grouped scales (whose
# scratch tiles lost to btile: int8wo_scratch_tiles_session27_groups_not_kept.txt) keep _EXT_MAX_M.
_EXT_MAX_M_LARGE_K = 48
LARGE_K = 2048
_EXT_MAX_M_FLOAT = 128  # float32 and float16 x
# On a CPU with AMX (csrc/amx.h), gemm_bf16 runs bf16 x on the tiles (int4's runs ahead of its small-M path from
# M = 5, _int4_cpu.SMALL_MAX_M_AMX): bf16 x keeps the limit it had (not measured there). The CPU's flag decides,
# not whether the tiles loaded, so that eager and compiled graphs route alike.
_EXT_MAX_M_AMX = 8  # the limit every dtype had until session 24 (the comment above)
# AVX2 build: register tiles of up to 4 rows of x, the weight read once per call. Ahead of
# _weight_int8pack_mm (optimum-quanto's path) and of bf16 at every M = 1..16 on 8 x 4096^2 and on
# SmolLM2's 211 decode linears (benchmarks/results/int8_small_m_2t.json: 2 threads, quiet; ms for
# 8 x 4096^2 bf16 x, ours as routed here / _weight_int8pack_mm; int8_small_m_1t.json: 1 thread, loaded,
# same order): M = 1: 8.5 / 13.4, M = 4: 16.2 / 24.9, M = 16: 32.2 / 65.1. Above 16 the tiles (4 rows of x a
# pass, the 3 weight rows in L1) also beat the chunked path (float32 at::mm on converted chunks: this CPU has no
# native bf16 matmul), ms chunked / tiles, 2 threads, Zen 2 (benchmarks/results/avx2_zen2/scratch/
# int8wo_tiles_vs_chunked.py): 4 x 4096^2 M = 24: 77.1 / 26.1, M = 32: 77.9 / 35.4, M = 64: 107.2 / 69.3,
# M = 128: 169.0 / 138.8, M = 192: 239.0 / 210.8, M = 256: 297.5 / 282.2; 75 x (1536, 576) M = 32: 96.5 / 44.4,
# M = 128: 208.6 / 171.5, M = 192: 272.5 / 253.9, M = 256: 344.1 / 345.2.
_EXT_MAX_M_AVX2 = 192
_INT8PACK_MAX_M = 8  # _weight_int8pack_mm beats bf16 up to M=8 (1.2x), loses from M=16 (0.7x)
_CHUNK_BYTES = 2 << 20  # a converted chunk of rows: 256 x 4096 bf16 = 2 MiB stays in cache (measured best at 4096)


def _max_m_of(isa: str | None, dtype: torch.dtype = torch.bfloat16, k: int | None = None, groups: int | None = None) -> int:
    """The largest M the C++ GEMV of build ``isa`` takes for x of ``dtype`` against a weight of ``k`` columns and
    ``groups`` scales per row (None: the largest over every weight)."""
    if isa == "avx2":
        return _EXT_MAX_M_AVX2
    if dtype != torch.bfloat16:
        return _EXT_MAX_M_FLOAT
    if "amx_bf16" in host.cpu_flags():
        return _EXT_MAX_M_AMX
    if (k is None or k >= LARGE_K) and groups in (None, 1) and "avx512_bf16" in host.cpu_flags():
        return _EXT_MAX_M_LARGE_K
    return _EXT_MAX_M


def _ext_max_m(dtype: torch.dtype = torch.bfloat16, k: int | None = None, groups: int | None = None) -> int:
    """The largest M our C++ GEMV takes for x of ``dtype`` (and a weight of ``k`` columns, ``groups`` scales per row;
    None: the largest over every weight): it depends on the build that runs (``_ext.active_isa``)."""
    return _max_m_of(_ext.active_isa("int8_gemv"), dtype, k, groups)


def _grad_input(grad, qdata, scale, zero_point, spec: QuantSpec):
    """``grad @ dequantize(W)``: the input gradient of both linears (the weight is frozen)."""
    return grad @ dequantize_affine(qdata, scale, zero_point, spec, grad.dtype)


def _check_2d(input, qdata, scale):
    if input.dim() != 2 or qdata.dim() != 2 or input.shape[1] != qdata.shape[1]:
        raise ValueError(f"input {tuple(input.shape)} and weight {tuple(qdata.shape)} must be (M, K) and (N, K)")
    if qdata.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(f"qdata must be int8 and scale float32, got {qdata.dtype} and {scale.dtype}")


# --- weight-only ------------------------------------------------------------------------------


def _weight_only_reference(input, qdata, scale, zero_point, bias, spec):
    w = dequantize_affine(qdata, scale, zero_point, spec, input.dtype)
    return F.linear(input, w, bias)


def _chunk_rows(n: int, k: int, dtype: torch.dtype) -> int:
    """Rows of the weight per converted chunk: 256, or as many as fit ``_CHUNK_BYTES`` in ``dtype`` when
    that is more, so a small layer's weight is converted and multiplied whole (SmolLM2's 576-wide layers:
    one chunk; a column slice of the output per chunk made oneDNN's matmul slower there)."""
    return min(n, max(256, _CHUNK_BYTES // (k * torch.finfo(dtype).bits // 8)))


_BUFFERS = threading.local()
_KEEP_BYTES = 8 << 20


def _chunk_buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, k) CPU buffer kept per thread for the chunked path, grown as needed (never shrunk; at most
    ``_KEEP_BYTES`` per dtype: a larger chunk gets a fresh buffer). A fresh buffer per call cost more than the conversion it
    holds: glibc hands blocks over ~128 KiB out as new pages, and their page faults took ~130 us a call
    on a 192 x 576 layer at M = 256 (a 150 us matmul)."""
    need = rows * k
    if need * torch.finfo(dtype).bits // 8 > _KEEP_BYTES:  # a wide weight's chunk: not worth keeping
        return torch.empty(rows, k, dtype=dtype)
    kept = getattr(_BUFFERS, "by_dtype", None)
    if kept is None:
        kept = _BUFFERS.by_dtype = {}
    buf = kept.get(dtype)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):  # a normal tensor, writable by later calls in or out of inference mode
            buf = kept[dtype] = torch.empty(need, dtype=dtype)
    return buf[:need].view(rows, k)


def _weight_only_chunked(input, qdata, scale, bias):
    """CPU, M above the GEMV: the weight converted a chunk of rows at a time, each chunk multiplied
    into its slice of the output. Computes in ``host.matmul_dtype(input.dtype)``: float32 for bf16 /
    fp16 input on CPUs without native half matmul (several times faster there), one rounding of
    the result to the input dtype at the end."""
    m, k = input.shape
    n = qdata.shape[0]
    dtype = host.matmul_dtype(input.dtype)
    x = input.to(dtype)
    out = torch.empty(m, n, dtype=dtype, device=input.device)
    # Per-row scale: W = diag(s) Q, so x @ W.T = (x @ Q.T) * s. Q converts to the compute dtype
    # exactly (|q| <= 128) into one reused chunk buffer that stays in cache; the scale is applied
    # to the (M, N) output once. fp16 is excluded: x @ Q.T can overflow it before scaling.
    per_row = scale.shape[1] == 1 and dtype in (torch.bfloat16, torch.float32)
    rows = _chunk_rows(n, k, dtype)
    buf = _chunk_buffer(rows, k, dtype) if per_row or dtype != input.dtype else None
    for i in range(0, n, rows):
        j = min(i + rows, n)
        if per_row:
            w = buf[: j - i].copy_(qdata[i:j])
        else:  # the reference's dequantized values (in the input dtype; dequantize_affine's bits), widened exactly if need be
            w = dequantize_blocks(qdata[i:j], scale[i:j], None, input.dtype)
            if buf is not None:
                w = buf[: j - i].copy_(w)
        torch.mm(x, w.t(), out=out[:, i:j])
    if per_row:
        ext = _ext.load("int8_gemv")
        if ext is not None and out.is_contiguous():
            ext.scale_columns_(out, scale.expand(n, 1).reshape(-1))  # mul_'s values, without its float32 temporary
        else:
            out.mul_(scale.reshape(1, -1))
    if bias is not None:
        out.add_(bias)
    return out if dtype == input.dtype else out.to(input.dtype)


def _int8pack_takes(input, qdata) -> bool:
    """Whether ``torch._weight_int8pack_mm`` is the path: bfloat16 only (its float32 and float16
    kernels are scalar loops, 3-35x slower than the chunked path at M = 1-8 here, and a float16
    scale below 6.1e-5 is subnormal there: 0.3% off at 6e-6), and only shapes its vectorized bf16
    kernels read correctly: they step K by 8 (AVX2) or 16 (AVX-512) with aligned loads of the
    input and no tail loop (other K read out of bounds: garbage outputs or a crash, K = 1..7, 9, 17).
    The weight too must start on 64 bytes: a tensor read from a safetensors file at offset 8 crashed
    it (segmentation fault, tests/kernels/test_int8.py::test_weight_only_misaligned_weight)."""
    return (input.dtype == torch.bfloat16 and input.shape[1] % 16 == 0 and input.data_ptr() % 64 == 0
            and qdata.data_ptr() % 64 == 0 and input.is_contiguous() and qdata.is_contiguous())


def _gemm_bf16():
    """The AVX-512 build's ``int8_weight_only_gemm(x, w, scale, bias)`` where it can run (the build loaded, a
    CPU with AVX-512 BF16, native bf16 matmul not switched off by ``LOWBIT_HALF_MATMUL``), else None.
    bf16 x at M = 9 .. 256 (scratch/int8wo_gemm_bf16_vs_chunked.py, 2 threads, ms, ours / the chunked
    path / bf16 F.linear): 4096^2 M = 16: 2.61 / 4.45 / 2.96, M = 256: 19.8 / 21.6 / 19.9; SmolLM2's seven
    linears M = 128: 2.43 / 3.20 / 2.54."""
    ext = _ext.load("int8_gemv")
    fn = getattr(ext, "int8_weight_only_gemm", None)
    if fn is None or "avx512_bf16" not in host.cpu_flags() or not host.half_matmul_native(torch.bfloat16):
        return None
    return fn


def _direct_max_m(dtype: torch.dtype, k: int, groups: int) -> int:
    """The largest M :func:`int8_weight_only_linear_any` sends to the direct op for x of ``dtype``: ``_ext_max_m``,
    except while torch.compile traces, where it is taken from the build this CPU runs (``_ext.fitting_isa``), loaded
    or not."""
    if torch.compiler.is_compiling():
        return _max_m_of(_ext.fitting_isa("int8_gemv"), dtype, k, groups)
    return _ext_max_m(dtype, k, groups)


def _direct_gemv_op():
    """``lowbit_cpu::int8_weight_only_mm`` (the C++ GEMV as a dispatcher op, defined in ``_cpu_ops``), or None:
    while torch.compile traces, where no build of the kernel fits this CPU (``_ext.fitting_isa``: a graph must not
    depend on whether the extension loaded, README design note); in eager, where the extension is not loaded (the
    op's body then runs :func:`_weight_only_cpu_torch` behind the dispatcher's extra layers)."""
    if torch.compiler.is_compiling():
        return None if _ext.fitting_isa("int8_gemv") is None else _cpu_ops.int8_weight_only_mm
    return None if _ext.load("int8_gemv") is None else _cpu_ops.int8_weight_only_mm


def int8_weight_only_linear_any(input, qdata, scale, zero_point, bias, spec: QuantSpec, kernel: str) -> torch.Tensor:
    """``int8_weight_only_linear``, except that a decode-sized CPU call wanting no gradient (M <= ``_direct_max_m``, a
    symmetric weight, groups of a multiple of 16) calls the same C++ GEMV as a dispatcher op directly,
    skipping the custom op's Python layers (~15 us a call), and any other eager CPU call wanting no gradient (a
    symmetric weight) runs the custom op's CPU body (:func:`_weight_only_cpu`) without its dispatch. Same values
    bit for bit, with or without the extension (the op's body then runs the custom op's PyTorch CPU paths)."""
    if (kernel == "auto" and zero_point is None and input.dim() == 2 and input.device.type == "cpu"
            and qdata.dim() == 2 and qdata.dtype == torch.int8 and qdata.is_contiguous()
            and scale.dtype == torch.float32 and scale.dim() == 2 and input.shape[1] == qdata.shape[1]
            and scale.shape[1] > 0 and input.shape[1] % scale.shape[1] == 0 and (input.shape[1] // scale.shape[1]) % 16 == 0
            and input.shape[0] <= _direct_max_m(input.dtype, input.shape[1], scale.shape[1])
            and not wants_grad(input, bias)):
        op = _direct_gemv_op()
        if op is not None:
            return op(input, qdata, scale.expand(qdata.shape[0], -1), bias)
    if (kernel == "auto" and zero_point is None and input.device.type == "cpu" and not torch.compiler.is_compiling()
            and not wants_grad(input, bias)):  # eager, any other M: the custom op's CPU body without its dispatch (11-16 us)
        _check_2d(input, qdata, scale)
        return _weight_only_cpu(input, qdata, scale, bias)
    return int8_weight_only_linear(input, qdata, scale, zero_point, bias, spec_key(spec), kernel)


def _weight_only_cpu_torch(input, qdata, scale, bias):
    """The weight-only CPU paths that need no extension of ours (symmetric ``qdata``, float32 ``scale`` (N or 1,
    groups)): ``torch._weight_int8pack_mm`` where it takes the case, else :func:`_weight_only_chunked`. What the
    custom op runs without the extension, and the body of ``lowbit_cpu::int8_weight_only_mm`` there too."""
    m, k = input.shape
    if m <= _INT8PACK_MAX_M and scale.shape[1] == 1 and _int8pack_takes(input, qdata):
        s = scale.expand(qdata.shape[0], 1).reshape(-1).to(input.dtype).contiguous()  # the kernel takes scales in x's dtype
        out = torch._weight_int8pack_mm(input, qdata, s)
        return out if bias is None else out + bias
    return _weight_only_chunked(input, qdata, scale, bias)


@torch.library.custom_op("lowbit::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: str,
    kernel: str,
) -> torch.Tensor:
    """``input @ dequantize(qdata, scale, zero_point).T + bias`` in ``input.dtype``.

    Args:
        input: (M, K) float activations.
        qdata: (N, K) int8 weight.
        scale: (N, K // group) float32.
        zero_point: same shape as scale (int32) or None for a symmetric weight.
        bias: (N,) in input.dtype or None.
        spec: ``spec_key`` of the weight's ``QuantSpec`` (the spec the tensor stores).
        kernel: "auto" or "reference" (``KernelPreference``).
    """
    _check_2d(input, qdata, scale)
    spec = spec_from_key(spec)
    if check_kernel(kernel) == "reference" or zero_point is not None:
        return _weight_only_reference(input, qdata, scale, zero_point, bias, spec)
    if input.device.type == "cpu":
        return _weight_only_cpu(input, qdata, scale, bias)
    return _weight_only_reference(input, qdata, scale, zero_point, bias, spec)


def _weight_only_cpu(input, qdata, scale, bias):
    """The custom op's CPU paths for a symmetric weight (arguments checked): the C++ GEMV, ``gemm_bf16``, or
    :func:`_weight_only_cpu_torch`."""
    m, k = input.shape
    if m <= _ext_max_m(input.dtype, k, scale.shape[1]) and (k // scale.shape[1]) % 16 == 0 and qdata.is_contiguous():
        ext = _ext.load("int8_gemv")
        if ext is not None:
            out = ext.int8_weight_only_mm(input, qdata, scale.expand(qdata.shape[0], -1))
            return out if bias is None else out + bias
    if (input.dtype == torch.bfloat16 and input.stride(1) == 1 and qdata.is_contiguous()
            and (k // scale.shape[1]) % 16 == 0 and (gemm := _gemm_bf16()) is not None):
        return gemm(input, qdata, scale.expand(qdata.shape[0], -1), bias)
    return _weight_only_cpu_torch(input, qdata, scale, bias)


@int8_weight_only_linear.register_fake
def _(input, qdata, scale, zero_point, bias, spec, kernel):
    return input.new_empty(input.shape[0], qdata.shape[0])


# --- autograd for the weight-only op: gradients flow to the input and the bias; the int8 weight
# is frozen. This lets a float bias or a LoRA adapter train on top.


def _weight_only_setup(ctx, inputs, output):
    input, qdata, scale, zero_point, bias, spec, _ = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.has_bias = bias is not None
    ctx.spec = spec_from_key(spec)


def _weight_only_backward(ctx, grad):
    qdata, scale, zero_point = ctx.saved_tensors
    grad_bias = grad.sum(0) if ctx.has_bias else None
    return _grad_input(grad, qdata, scale, zero_point, ctx.spec), None, None, None, grad_bias, None, None


int8_weight_only_linear.register_autograd(_weight_only_backward, setup_context=_weight_only_setup)
