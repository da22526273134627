"""Int8 linear: weight-only (custom op ``lowbit::int8_weight_only_linear``) and int8 activations
(W8A8: traceable aten ops around the custom op ``lowbit::int8_mm``).

Each has one reference implementation (dequantize with the primitives, then ``F.linear``) and
fast implementations chosen here by device and shape:

* weight-only, CPU, M <= ``_ext_max_m()`` (by the build that runs): our C++ kernel (``csrc/int8_gemv.cpp``, AVX-512, or
  ``csrc/int8_gemv_avx2.cpp`` on CPUs without it, built on first use; any group size that is a
  multiple of 16); bfloat16, per-row scale and
  M <= ``_INT8PACK_MAX_M``: ``torch._weight_int8pack_mm`` (see ``_int8pack_takes``); bf16 x at larger M on a
  CPU with AVX-512 BF16: ``int8_weight_only_gemm`` (``csrc/gemm_bf16.h``), a bf16 GEMM that makes the
  weight's bf16 values (the reference's, bit for bit) one L2-resident panel at a time inside the GEMM;
  otherwise the weight is converted
  in row chunks of ``_CHUNK_BYTES`` (each chunk stays in cache) and each chunk is multiplied with
  ``torch.mm`` into its slice of the output, in float32 for bf16/fp16 input where the CPU has no
  native half matmul (``host.matmul_dtype``); other devices: the reference;
* W8A8, CPU and CUDA: activations quantized with the primitives (per token, or the static scale
  given), ``lowbit::int8_mm`` (exact int32: on CPUs with AVX-512 VNNI our ``mm_i8`` for M <= 4 and
  ``gemm_i8`` above, ``csrc/int8_act.cpp`` and ``csrc/gemm_i8.h``; elsewhere ``torch._int_mm``, or on CPUs
  without int8 dot products exact float32 GEMMs over K chunks, ``_int8_mm_float32``), an exact integer zero-point
  correction for asymmetric activations (``zp_x * rowsum(W)``), one float32 rescale, one cast.

Inputs are 2-D (the tensor layer folds leading dims). Weights are symmetric int8 with a float32
scale of shape ``(N, K // group)``; an asymmetric weight (with a zero point) runs the reference.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from lowbit.kernels import _cpu_ops, _ext, host
from lowbit.kernels.preference import check_kernel, check_static_act_scale, static_act_scale_value, wants_grad
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from lowbit.spec import QuantSpec, spec_from_key, spec_key

__all__ = [
    "int8_weight_only_linear",
    "int8_weight_only_linear_any",
    "int8_activation_linear",
    "int8_mm",
]

# AVX-512 build: the AVX2 build's register tiles at 16 lanes (until 2026-12-04 it made a pass over the
# weight per row of x and took M = 1 only). 8 x 4096^2, bf16 x, 2 threads, AMD Zen 4, ms ours /
# _weight_int8pack_mm / bf16: M = 1: 4.68 / 6.59 / 15.22, M = 2: 5.27 / 7.79 / 13.85, M = 4: 8.02 / 9.71 /
# 14.98, M = 8: 13.99 / 18.19 / 17.92, M = 16: 25.43 / 33.89 / 21.89, where the chunked bf16 path (the
# route above 8) was level with ours (36.6 / 37.1 in a slower moment) and ahead at M = 32.
_EXT_MAX_M = 8
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
# CPUs without int8 dot products (benchmarks/cpu_paths.py -> results/cpu_paths.json; quiet AVX2 EPYC, 2
# threads, ms for 4096^2; SmolLM2's 1536 x 576 and 576 x 1536 alike):
#   M          1     16     64    128    256
#   mm_i8      0.99   6.3   25.4   51.4   88.5
#   float32    7.5   18.0   32.8   53.9   74.9
#   _int_mm    8.5  128    497   1063   1653
_MM_I8_MAX_M = 64  # our AVX2 mm_i8 up to here, _int8_mm_float32 above
# CPUs with AVX-512 VNNI: the AVX-512 int8_act build's mm_i8 (vpdpbusd, 4 rows of x per pass over the
# weight) against torch._int_mm, 2 threads, ms for 8 x 4096^2 (AMD Zen 4, 2.6 GHz, loaded host):
#   M          1     2     4     8    16    32    64
#   mm_i8    5.37  5.11  5.71  12.0  19.3  42.8  85.2
#   _int_mm  6.09  25.5  26.7  27.4  29.3  37.5  45.7
_VNNI_MM_MAX_M = 4
# From M = 5 (CPUs with avx512_vnni): the same build's gemm_i8 (csrc/gemm_i8.h: a 6 x 64 vpdpbusd tile on
# weight panels packed per call). ms, 2 threads, AMD Zen 4, quiet (scripts in benchmarks/results/avx512_zen4/
# scratch, outputs in its README: w8a8_mm_i8_vs_gemm_i8_small_m.py, ab_head_csrc.py, gemm_i8_vs_int_mm.py):
#   8 x 4096^2, M    2     4     5     8    16    32
#   gemm_i8        5.84  6.02  6.27  7.14  9.81  14.1
#   mm_i8          4.66  5.45  7.08  9.79  18.4  36.7
#   _int_mm           -     -     -     -     -  32.2
#   one 4096^2 at M = 256: gemm_i8 10.0, _int_mm 12.4, bf16 F.linear 19.7 (1.96x bf16 against 1.58x)
_FLOAT_MM_MIN_M = 2  # without mm_i8: _int8_mm_float32 from here (at M=1 it and _int_mm are level)
_EXACT_K = 1024  # int8 x int8 sums of up to 1024 products stay <= 2^24: exact in float32
_FLOAT_MM_ROWS = 512  # weight rows converted to float32 at a time by _int8_mm_float32 (8 MiB at K=4096)


def _ext_max_m() -> int:
    """The largest M our C++ GEMV takes: it depends on the build that runs (``_ext.active_isa``)."""
    return _EXT_MAX_M_AVX2 if _ext.active_isa("int8_gemv") == "avx2" else _EXT_MAX_M


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


def _weight_only_chunked(input, qdata, scale, bias, spec):
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
        else:  # the reference's dequantized values (in the input dtype), widened exactly if need be
            w = dequantize_affine(qdata[i:j], scale[i:j], None, spec, input.dtype)
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


def _direct_gemv_op():
    """``lowbit_cpu::int8_weight_only_mm`` (the C++ GEMV as a dispatcher op, defined in ``_cpu_ops``),
    or None when the extension is not available (then the custom op's PyTorch paths are faster than
    the op's reference body)."""
    return None if _ext.load("int8_gemv") is None else _cpu_ops.int8_weight_only_mm


def int8_weight_only_linear_any(input, qdata, scale, zero_point, bias, spec: QuantSpec, kernel: str) -> torch.Tensor:
    """``int8_weight_only_linear``, except that a decode-sized CPU call wanting no gradient (M <= ``_ext_max_m()``, a
    symmetric weight, groups of a multiple of 16) calls the same C++ GEMV as a dispatcher op directly,
    skipping the custom op's Python layers (~15 us a call). Same values bit for bit."""
    if (kernel == "auto" and zero_point is None and input.dim() == 2 and input.device.type == "cpu"
            and input.shape[0] <= _ext_max_m() and qdata.dim() == 2 and qdata.dtype == torch.int8 and qdata.is_contiguous()
            and scale.dtype == torch.float32 and scale.dim() == 2 and input.shape[1] == qdata.shape[1]
            and scale.shape[1] > 0 and input.shape[1] % scale.shape[1] == 0 and (input.shape[1] // scale.shape[1]) % 16 == 0
            and not wants_grad(input, bias)):
        op = _direct_gemv_op()
        if op is not None:
            out = op(input, qdata, scale.expand(qdata.shape[0], -1))
            return out if bias is None else out + bias
    return int8_weight_only_linear(input, qdata, scale, zero_point, bias, spec_key(spec), kernel)


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
    m, k = input.shape
    if input.device.type == "cpu" and m <= _ext_max_m() and (k // scale.shape[1]) % 16 == 0 and qdata.is_contiguous():
        ext = _ext.load("int8_gemv")
        if ext is not None:
            out = ext.int8_weight_only_mm(input, qdata, scale.expand(qdata.shape[0], -1))
            return out if bias is None else out + bias
    if (input.device.type == "cpu" and input.dtype == torch.bfloat16 and input.stride(1) == 1 and qdata.is_contiguous()
            and (k // scale.shape[1]) % 16 == 0 and (gemm := _gemm_bf16()) is not None):
        return gemm(input, qdata, scale.expand(qdata.shape[0], -1), bias)
    if input.device.type == "cpu" and m <= _INT8PACK_MAX_M and scale.shape[1] == 1 and _int8pack_takes(input, qdata):
        s = scale.expand(qdata.shape[0], 1).reshape(-1).to(input.dtype).contiguous()  # the kernel takes scales in x's dtype
        out = torch._weight_int8pack_mm(input, qdata, s)
        return out if bias is None else out + bias
    if input.device.type == "cpu":
        return _weight_only_chunked(input, qdata, scale, bias, spec)
    return _weight_only_reference(input, qdata, scale, zero_point, bias, spec)


@int8_weight_only_linear.register_fake
def _(input, qdata, scale, zero_point, bias, spec, kernel):
    return input.new_empty(input.shape[0], qdata.shape[0])


# --- int8 activations x int8 weights ----------------------------------------------------------

def _mm_and_rowsum(xq: torch.Tensor, qdata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``int8_mm(xq, qdata)`` and ``rowsum(qdata)`` (int32, exact) from one GEMM: a row of ones
    appended to the activation gives the weight's row sums as the last output row. No per-weight
    cache to keep in step with in-place edits (or to fail on inference tensors), and no second
    pass over the weight."""
    ones = torch.ones(1, xq.shape[1], dtype=torch.int8, device=xq.device)
    acc = int8_mm(torch.cat([xq, ones]), qdata)
    return acc[:-1], acc[-1]


def _quantize_activation(input, act_scale, act_zero_point, spec):
    static = act_scale is not None
    if static:
        check_static_act_scale(act_scale)
        s, zp = act_scale.reshape(1, 1), None if act_zero_point is None else act_zero_point.reshape(1, 1)
    else:
        s, zp = choose_qparams_affine(input, spec, check_finite=False)
    return quantize_affine(input, s, zp, spec), s, zp, spec


def _int8_mm_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 ``a`` (M, K) and ``b`` (N, K), exact in int32 (sums wrap mod 2^32): on CPUs
    with AVX-512 VNNI the int8_act build's ``mm_i8`` (M <= ``_VNNI_MM_MAX_M``) or ``gemm_i8``, elsewhere
    ``torch._int_mm``, or on a CPU without int8 dot products ``_int8_mm_float32`` (same bits).

    The weight stays (N, K) row-major: a (K, N)-contiguous copy measured ~6% faster at M=256
    but 2.6x slower at M=1 here. An opaque op on purpose: with inductor freezing, a bare ``_int_mm`` followed by a scale is
    pattern-matched into a oneDNN qlinear with a prepacked copy of the weight, which doubles the
    weight memory and, for signed int8 activations, took minutes on its first call here (283 s
    for 8 layers of 4096 x 4096 at M=256, against 2.9 s to compile with this op).
    """
    m = a.shape[0]
    # b.t() of an (N, 1) weight has strides (1, 1), which torch 2.13's CPU _int_mm (VNNI hosts) reads
    # as the wrong layout: garbage for N > 1 (tests/kernels/test_int8_mm_k1.py); a (1, N) row-major view
    # is the same matrix without the ambiguity
    bt = b.reshape(1, -1) if b.shape[1] == 1 else b.t()
    if a.device.type == "cuda" and m <= 16:  # cuBLAS int8 GEMM needs M > 16
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - m)), bt)[:m]
    if a.device.type == "cpu" and host.has_int8_dot():
        if a.is_contiguous() and b.is_contiguous():
            vnni = _vnni_ext()
            if vnni is not None:
                return vnni.mm_i8(a, b) if m <= _VNNI_MM_MAX_M else vnni.gemm_i8(a, b)
    elif a.device.type == "cpu":
        if m <= _MM_I8_MAX_M and a.is_contiguous() and b.is_contiguous():
            ext = _ext.load("int8_act")
            # the AVX2 build's (vpmaddubsw); the AVX-512 build's mm_i8 and gemm_i8 are VNNI code (_vnni_ext)
            mm_i8 = getattr(ext, "mm_i8", None) if _ext.active_isa("int8_act") == "avx2" else None
            if mm_i8 is not None:
                return mm_i8(a, b)
        if m >= _FLOAT_MM_MIN_M and host.float32_matmul_exact():
            return _int8_mm_float32(a, b)
    return torch._int_mm(a, bt)


def _w8a8_gemm(m: int, qdata: torch.Tensor):
    """The VNNI build's ``w8a8_gemm`` (``gemm_i8`` with ``w8a8_epilogue`` applied per tile in L1, the same bits
    as the two calls) where ``_int8_mm_impl`` would run ``gemm_i8`` for ``m`` rows, else None."""
    if m <= _VNNI_MM_MAX_M or not host.has_int8_dot() or not qdata.is_contiguous():
        return None
    ext = _vnni_ext()
    return None if ext is None else getattr(ext, "w8a8_gemm", None)


def _vnni_ext():
    """The AVX-512 int8_act build, whose ``mm_i8`` and ``gemm_i8`` are VNNI code (only where the CPU has
    avx512_vnni), or None."""
    if "avx512_vnni" not in host.cpu_flags():
        return None
    ext = _ext.load("int8_act")
    if ext is None or _ext.active_isa("int8_act") != "avx512":
        return None
    return ext


# the op compile sees; eager decode (_fused_cpu) calls _int8_mm_impl itself: the custom op's Python
# layers cost more than the kernel on a small layer (SmolLM2: ~45 us of mm_i8 per call)
int8_mm = torch.library.custom_op("lowbit::int8_mm", mutates_args=())(_int8_mm_impl)


def _int8_mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in int32 by float32 GEMMs, bit-identical to ``torch._int_mm``: for CPUs without
    int8 dot products (no VNNI / AMX), where ``_int_mm`` runs at a few GOP/s and float32 FMAs are the
    fastest unit (~25x ``_int_mm`` at M=256 on this project's AVX2 host).

    Exact because every value stays an integer float32 represents: |a|, |b| <= 128, so a product is
    at most 2^14 and any partial sum over a K chunk of ``_EXACT_K`` = 1024 columns is at most 2^24,
    whatever order or blocking the GEMM sums in (no rounding happens below 2^24). Chunk results are
    added in int32. Needs float32 matmuls to stay float32 (``host.float32_matmul_exact``). Rows of
    ``b`` are converted a chunk at a time (exactly: int8 -> float32), so no float copy of the weight
    outlives the call."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.int32)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    af = a.to(torch.float32)
    rows = min(n, _FLOAT_MM_ROWS)
    buf = torch.empty(rows, k)
    part = torch.empty(m, rows)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        w = buf[: j - i].copy_(b[i:j])
        for c in range(0, k, _EXACT_K):
            d = min(c + _EXACT_K, k)
            p = part[:, : j - i]
            torch.mm(af[:, c:d], w[:, c:d].t(), out=p)
            if c == 0:
                out[:, i:j].copy_(p)
            else:
                out[:, i:j].add_(p.to(torch.int32))
    return out


@int8_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dynamic_linear_op(ext):
    """``ext.w8a8_dynamic_linear(x, w, s_w, bias, eps)``: ``quantize_i8`` (dynamic, symmetric per token),
    ``mm_i8`` and ``w8a8_epilogue`` as one C++ call with its temporaries in thread-local buffers, equal
    bit for bit to the three calls (tests/kernels/test_int8_act.py). For the M <= ``_MM_I8_MAX_M``
    calls ``_int8_mm_impl`` sends to ``mm_i8``; None where it would not (a CPU with int8 dot products,
    whose ``torch._int_mm`` is fast) or where the build has no such entry (the AVX-512 one, for those
    CPUs). At decode on SmolLM2's shapes the three calls cost ~20 us more than their kernels."""
    if ext is None or host.has_int8_dot():
        return None
    return getattr(ext, "w8a8_dynamic_linear", None)


def _static_linear_op(ext):
    """``ext.w8a8_static_linear(x, w, s_w, bias, act_scale, eps)``: ``quantize_i8`` with a static scale and a
    zero point of 0, ``mm_i8`` and ``w8a8_epilogue`` as one C++ call, equal bit for bit to the three calls
    (tests/kernels/test_int8_act.py); None where ``_dynamic_linear_op`` is None, or where the build lacks
    the entry."""
    if ext is None or host.has_int8_dot():
        return None
    return getattr(ext, "w8a8_static_linear", None)


def _fused_cpu_applies(input, bias, static: bool, symmetric: bool) -> bool:
    """Whether ``_fused_cpu`` takes these arguments (tensor properties only, so also at trace time)."""
    return (
        input.device.type == "cpu"
        and input.dtype in _FUSED_DTYPES
        and input.is_contiguous()
        and (bias is None or (bias.dtype == input.dtype and bias.is_contiguous()))
        and (static or symmetric)
        and _ext.load("int8_act") is not None
    )


def _fused_cpu(input, qdata, scale, bias, act_scale, act_zero_point, act_spec):
    """Eager CPU: activation quantization and the rescale each in one C++ pass (``csrc/int8_act.cpp``,
    the same float32 ops as the primitives, bit-identical), around ``int8_mm``. None when not applicable
    (and while compiling: ``_activation_forward`` calls ``lowbit::int8_act_linear_cpu`` there)."""
    if torch.compiler.is_compiling() or not _fused_cpu_applies(input, bias, act_scale is not None, act_spec.symmetric):
        return None
    return _fused_cpu_run(input, qdata, scale, bias, act_scale, act_zero_point, act_spec.eps)


def _fused_cpu_run(input, qdata, scale, bias, act_scale, act_zero_point, eps: float) -> torch.Tensor:
    """``_fused_cpu``'s work, its conditions already checked."""
    ext = _ext.load("int8_act")
    static = act_scale is not None
    if not static and input.shape[0] <= _MM_I8_MAX_M and qdata.is_contiguous():
        fused = _dynamic_linear_op(ext)
        if fused is not None:  # the three calls below in one, the same values
            return fused(input, qdata, scale.expand(qdata.shape[0], 1).reshape(-1).contiguous(), bias, eps)
    zp = 0 if act_zero_point is None else int(act_zero_point)
    a = static_act_scale_value(act_scale) if static else -1.0  # quantize_i8 reads a scale <= 0 as "dynamic": refused
    s_w = scale.expand(qdata.shape[0], 1).reshape(-1).contiguous()
    fused = _static_linear_op(ext) if static and zp == 0 and input.shape[0] <= _MM_I8_MAX_M else None
    if fused is not None and qdata.is_contiguous():  # the calls below in one, the same values
        return fused(input, qdata, s_w, bias, a, eps)
    xq, s_dyn = ext.quantize_i8(input, a, zp, eps)
    s_x = act_scale.reshape(1).float() if static else s_dyn
    if zp == 0:
        gemm = _w8a8_gemm(input.shape[0], qdata)
        if gemm is not None:  # the GEMM and the epilogue below in one call, the same values
            return gemm(xq, qdata, s_x.contiguous(), s_w, bias, None, input)
        acc, zcorr = _int8_mm_impl(xq, qdata), None
    else:
        acc, rs = _mm_and_rowsum(xq, qdata)
        zcorr = (zp * rs).to(torch.int32)
    return ext.w8a8_epilogue(acc, s_x.contiguous(), s_w, bias, zcorr, input)


def _int8_act_linear_cpu_body(input: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                              act_scale: torch.Tensor | None, act_zero_point: torch.Tensor | None, act_key: str,
                              w_key: str) -> torch.Tensor:
    """What torch.compile sees of CPU W8A8 where ``_fused_cpu`` applies: the eager route as one opaque op, so
    compiled runs the same C++ passes and gives the same bits as eager. Traced as aten ops instead (the
    activation quantization and the rescale each fused by inductor around ``lowbit::int8_mm``), one
    Linear(4096, 4096) at M = 256 took 11.8 ms against 10.7 eager: inductor's two kernels cost ~1.8 ms where
    ours cost ~0.2 (``benchmarks/results/avx512_zen4/scratch/w8a8_compiled_m256.py``).

    The choice is made while tracing, and a compiled graph can outlive it: torch's caches handed a graph traced
    with the extension to a process run with ``LOWBIT_NO_EXT=1``. So the op checks again and, where the C++
    route does not apply, runs the aten path eagerly (``act_key`` / ``w_key``: the specs, ``spec_key``'s form).

    A plain op (``torch.library.Library`` define + a CompositeExplicitAutograd Python kernel), not a
    ``custom_op``: that one's layers cost ~25 us a call (a compiled decode step calls it once per linear: 71
    against 46 us a linear of 256 x 256 at M = 1 on a Zen 2); callers route here only without a gradient to
    record (``int8_activation_linear``; with one, inside ``_Int8ActivationLinear``)."""
    act_spec = spec_from_key(act_key)
    if _fused_cpu_applies(input, bias, act_scale is not None, act_spec.symmetric):
        return _fused_cpu_run(input, qdata, scale, bias, act_scale, act_zero_point, act_spec.eps)
    return _activation_forward_aten(input, qdata, scale, bias, act_scale, act_zero_point, act_spec,
                                    spec_from_key(w_key), "auto")


def _int8_act_linear_cpu_fake(input, qdata, scale, bias, act_scale, act_zero_point, act_key, w_key):
    return input.new_empty(input.shape[0], qdata.shape[0])


_LIB = torch.library.Library("lowbit", "FRAGMENT")
_LIB.define("int8_act_linear_cpu(Tensor input, Tensor qdata, Tensor scale, Tensor? bias, Tensor? act_scale, "
            "Tensor? act_zero_point, str act_key, str w_key) -> Tensor")
_LIB.impl("int8_act_linear_cpu", _int8_act_linear_cpu_body, "CompositeExplicitAutograd")
torch.library.register_fake("lowbit::int8_act_linear_cpu", _int8_act_linear_cpu_fake, lib=_LIB)
_int8_act_linear_cpu = torch.ops.lowbit.int8_act_linear_cpu.default


def _activation_forward(input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel):
    if kernel != "reference":
        if torch.compiler.is_compiling():
            if _fused_cpu_applies(input, bias, act_scale is not None, act_spec.symmetric):
                if (act_scale is None and input.shape[0] <= _MM_I8_MAX_M and qdata.is_contiguous()
                        and _dynamic_linear_op(_ext.load("int8_act")) is not None):
                    # the one-call entry as a dispatcher op with a C++ kernel (_cpu_ops): what _fused_cpu_run
                    # calls eagerly, without the ~30 us of Python a call the op below costs
                    s_w = scale.expand(qdata.shape[0], 1).reshape(-1)
                    return _cpu_ops.w8a8_dynamic_linear(input, qdata, s_w, bias, act_spec.eps, spec_key(act_spec),
                                                        spec_key(spec))
                return _int8_act_linear_cpu(input, qdata, scale, bias, act_scale, act_zero_point, spec_key(act_spec),
                                            spec_key(spec))
        else:
            out = _fused_cpu(input, qdata, scale, bias, act_scale, act_zero_point, act_spec)
            if out is not None:
                return out
    return _activation_forward_aten(input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel)


def _activation_forward_aten(input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel):
    xq, s_x, zp_x, _ = _quantize_activation(input, act_scale, act_zero_point, act_spec)
    if kernel == "reference":
        x = dequantize_affine(xq, s_x, zp_x, act_spec)
        w = dequantize_affine(qdata, scale, None, spec)
        return F.linear(x, w, None if bias is None else bias.float()).to(input.dtype)
    if zp_x is None:
        acc = int8_mm(xq, qdata)
    else:
        # exact in int32: x = s_x (q_x - zp_x), so x @ W^T = s_x (q_x @ W_q^T - zp_x rowsum(W_q)) s_w
        acc, rs = _mm_and_rowsum(xq, qdata)
        acc = acc - zp_x.to(torch.int32) * rs
    # one float32 rescale, in place so eager allocates the (M, N) result once; compiled, inductor
    # fuses it into one pass over the int32 accumulator
    out = acc.to(torch.float32).mul_(s_x).mul_(scale.reshape(1, -1))
    if bias is not None:
        out = out.add_(bias)
    return out.to(input.dtype)


class _Int8ActivationLinear(torch.autograd.Function):
    """Forward: the W8A8 math above (``_activation_forward``). Backward: straight through the activation
    rounding to the input, and to the bias; the int8 weight is frozen."""

    @staticmethod
    def forward(ctx, input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel):
        ctx.save_for_backward(qdata, scale)
        ctx.has_bias = bias is not None
        ctx.spec = spec
        return _activation_forward(input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel)

    @staticmethod
    def backward(ctx, grad):
        qdata, scale = ctx.saved_tensors
        grad_bias = grad.sum(0) if ctx.has_bias else None
        return _grad_input(grad, qdata, scale, None, ctx.spec), None, None, grad_bias, None, None, None, None, None


def int8_activation_linear(
    input: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    act_spec: QuantSpec,
    spec: QuantSpec,
    kernel: str,
) -> torch.Tensor:
    """Int8 activations x int8 weights: the activation is quantized here by the primitives, per
    token (``act_scale`` None) or with the static per-tensor ``act_scale`` / ``act_zero_point``;
    the result is ``dequant(x_q) @ dequant(W).T + bias`` in ``input.dtype``.

    Not one opaque custom op on purpose: it is made of aten ops around ``lowbit::int8_mm``, so on CUDA (and
    on CPU without the int8_act build) torch.compile fuses the quantization before and the rescale after
    the integer GEMM. On CPU with the build, compile sees ``lowbit::int8_act_linear_cpu`` (the eager C++
    route whole, faster than inductor's kernels there).

    Args:
        input: (M, K) float activations.
        qdata: (N, K) int8 symmetric weight; scale: (N, 1) or (1, 1) float32.
        bias: (N,) or None.
        act_scale, act_zero_point: static activation qparams (one element each) or None.
        act_spec: the activation ``QuantSpec`` (int8, ``PerToken()`` dynamic or ``PerTensor()``
            static, symmetric or not), as the weight tensor stores it.
        spec: the weight's ``QuantSpec`` (int8 symmetric).
        kernel: "auto" or "reference".
    """
    _check_2d(input, qdata, scale)
    if scale.shape[1] != 1:
        raise ValueError(f"int8 activations need a per-row or per-tensor weight scale, got scale {tuple(scale.shape)}")
    check_kernel(kernel)
    if not torch.is_grad_enabled() or not (input.requires_grad or (bias is not None and bias.requires_grad)):
        # no gradient to record: the same forward without the autograd.Function's per-call layers
        return _activation_forward(input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel)
    return _Int8ActivationLinear.apply(input, qdata, scale, bias, act_scale, act_zero_point, act_spec, spec, kernel)


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
