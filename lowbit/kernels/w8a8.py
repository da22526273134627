"""Int8 activations x int8 weights (W8A8): traceable aten ops around the custom op ``lowbit::int8_mm``.

One reference implementation (both operands dequantized with the primitives, then ``F.linear``) and fast
implementations chosen here by device and shape, on CPU and CUDA: activations quantized with the primitives
(per token, or the static scale given), ``lowbit::int8_mm`` (exact int32: on CPUs with AVX-512 VNNI our
``mm_i8`` for M <= 4 and ``gemm_i8`` above, ``csrc/int8_act.cpp`` and ``csrc/gemm_i8.h``; elsewhere
``torch._int_mm``, or on CPUs without int8 dot products our AVX2 ``mm_i8`` at small M and exact float32 GEMMs
over K chunks, ``_int8_mm_float32``, above), an exact integer zero-point correction for asymmetric
activations (``zp_x * rowsum(W)``), one float32 rescale, one cast. Eager CPU runs the activation quantization
and the rescale each as one C++ pass (``_fused_cpu``), compiled CPU the same route as one op.

Inputs are 2-D (the tensor layer folds leading dims). Weights are symmetric int8 with a float32 scale of
shape ``(N, 1)`` or ``(1, 1)``; the weight-only linear and the argument checks both share are ``int8.py``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels import _cpu_ops, _ext, host
from lowbit.kernels.int8 import _check_2d, _grad_input
from lowbit.kernels.preference import check_kernel, check_static_act_scale, static_act_scale_value
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from lowbit.spec import QuantSpec, spec_from_key, spec_key

__all__ = ["int8_activation_linear", "int8_mm"]

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
