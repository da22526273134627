"""Float8 weight-only linear on CPU with our C++ kernel (``csrc/fp8_cpu.cpp``, AVX-512, or
``csrc/fp8_cpu_avx2.cpp`` on CPUs without it, float32 FMA instead of vdpbf16ps: ``_ext`` picks one).

``float8_weight_only_linear_cpu(x, qdata, scale, bias)`` computes
``F.linear(x, dequantize_float8(qdata, scale, spec, x.dtype), bias)`` without materializing the
dequantized weight, or returns None when the extension is unavailable or the case is not
supported (the caller then runs the reference).

Supported:

* ``qdata``: (N, K) ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``, contiguous, on CPU;
* ``scale``: float32, per row (N, 1) or per tensor (1, 1) (also (N,), (1,) and ());
* ``x``: (..., K) bfloat16, float32 or float16, any strides (leading dims are folded);
* ``bias``: None or (N,) in x's dtype;
* not differentiable itself: the caller (the custom op ``lowbit::float8_weight_only_linear``)
  owns the autograd formula.

Paths (chosen by M = number of rows of x; thresholds measured on a 2-core Zen 4/5, see the
module constants):

* bf16, M <= ``GEMV_MAX_M``: fused GEMV: float8 converted to bf16 in registers (exact, a
  256-entry table via vpermt2b), vdpbf16ps with float32 accumulation, the weight streamed once;
* bf16, M <= ``tiled_max_m()``: 4 weight rows converted to an L1 scratch, 4x4 vdpbf16ps tiles;
* bf16 above ``tiled_max_m()`` (K even): ``csrc/gemm_bf16.h``'s GEMM, 64-row panels of the weight
  converted exactly per call inside the GEMM (in L2), the scale and bias applied to the float32 sums
  (4096^2 M = 256: 1.02x bf16 where the chunked path ran 0.93x; SmolLM2's linears at M = 128 1.24x);
* otherwise (float32 / float16 x above ``tiled_max_m()``, or an odd K): one parallel region in which each thread takes a
  contiguous range of weight rows and converts it in chunks of ``CHUNK_ROWS`` rows into its own
  reused buffer (bf16, or float32 for float32/float16 x), each chunk multiplied with a serial
  ``at::mm`` into the output slice. (It was a parallel conversion and a parallel ``at::mm`` per
  chunk, ~1,800 parallel regions per SmolLM2 forward at M = 512: with another process on this
  2-core machine a region's threads wait for each other's scheduler slices, and the path ran
  15-30x slower than idle; one region per call: 2-4x, and within 10% of it when idle.);
* float32 / float16 x at small M: float32 FMA against the weight converted to float32;
* bf16 / fp16 x above ``tiled_max_m()`` on a CPU without native half matmul (``host.matmul_dtype``):
  x widened to float32, the chunked path in float32, the output rounded once (5-6x faster at
  M=256 on an AVX2 host than the bf16 chunked path).

The scale is applied to the float32 accumulator (or to the output of the chunked matmul) rather
than to the weight, so results differ from the reference by its rounding of ``q * s`` to x's
dtype (bf16: about 45 dB SQNR or better; float32: last-bit differences). NaN encodings in the
weight propagate to the outputs that use them.
"""

from __future__ import annotations

import torch

from lowbit.kernels import _ext, host
from lowbit.kernels.preference import wants_grad

__all__ = ["float8_weight_only_linear_cpu", "float8_act_linear_cpu", "act_linear_fn", "weight_finite", "forget_finite",
           "small_m_case", "tiled_max_m", "GEMV_MAX_M", "TILED_MAX_M", "TILED_MAX_M_AVX2", "CHUNK_ROWS"]

# Measured on the 8 x Linear(4096, 4096) bf16 stack (2 threads, medians of interleaved runs):
# M=1 GEMV 3.38 ms vs tiled 5.59 vs chunks 9.5-10.3; M=16 tiled 12.16 vs chunks(512) 12.19;
# M=32 tiled 17.24 vs chunks 17.33; M=64 tiled 29.45 vs chunks(256) 27.15 (eager 25.52);
# M=256 chunks of 256 rows 81.9 vs 512 rows 83.7 (eager 79.4).
GEMV_MAX_M = 4  # fused GEMV up to here (the kernel supports at most 4)
TILED_MAX_M = 32  # scratch + 4x4 vdpbf16ps tiles for GEMV_MAX_M < M <= TILED_MAX_M (the AVX-512 build)
# The AVX2 build's tiles (float32 FMA) against its chunked path, which widens x to float32 for at::mm on a CPU
# without native bf16 matmul (Zen 2, 2 threads, benchmarks/results/avx2_zen2/scratch/fp8_tiled_cap_m.py): ahead
# at every M measured, weight-only and with dynamic float8 activations: 2 x 4096^2 1.75x at M = 33, 1.46x at 64,
# 1.19x at 128, 1.11x at 192; SmolLM2's shapes 1.40x / 1.22x / 1.13x / 1.13x.
TILED_MAX_M_AVX2 = 192
CHUNK_ROWS = 256  # chunked path: rows converted per at::mm call

_TILED: list[int] = []  # tiled_max_m's answer (the CPU and LOWBIT_ISA do not change within a process)


def tiled_max_m() -> int:
    """The largest M the kernel's tiled path serves: it depends on the build (``TILED_MAX_M_AVX2`` for the AVX2
    one). Taken from the build this CPU runs (``_ext.fitting_isa``), not from whether it loaded: a compiled
    graph's route (``small_m_case``) must be the same with and without the extension."""
    if not _TILED:
        _TILED.append(TILED_MAX_M_AVX2 if _ext.fitting_isa("fp8_cpu") == "avx2" else TILED_MAX_M)
    return _TILED[0]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_X_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _supported(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or qdata.device.type != "cpu" or scale.device.type != "cpu":
        return False
    if qdata.dtype not in _FP8 or qdata.dim() != 2 or not qdata.is_contiguous():
        return False
    n, k = qdata.shape
    if x.dtype not in _X_DTYPES or x.dim() < 1 or x.shape[-1] != k:
        return False
    if scale.dtype != torch.float32 or scale.numel() not in (n, 1):
        return False
    if scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1) or (scale.dim() == 1 and scale.numel() != n and scale.numel() != 1):
        return False
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != x.dtype or bias.shape != (n,)):
        return False
    return True


def weight_finite(qdata: torch.Tensor) -> bool:
    """Whether no byte of the float8 weight ``qdata`` is NaN or inf, counted once per version of it.

    The AVX2 GEMV converts float8 by shifts alone, which would read NaN / inf bytes as finite values, so
    it checks every byte on every call (about a fifth of its time at M = 1: ``csrc/fp8_special.h``)
    unless told that there is none. The count (one pass over the weight) is kept by the extension
    (``fp8_weight_finite``, which the compiled graphs' ops call too) for this tensor object with its
    version counter and data pointer: every in-place torch op (``copy_``, ``load_state_dict``, ``fill_``, a
    write through a view) bumps the version, and the next call counts again. Writes that bypass the counter
    (through ``.data``, numpy or a raw pointer) are not seen: after one, call :func:`forget_finite`. An
    inference tensor has no version counter: False, and every call checks. No extension: False.
    """
    fn = getattr(_ext.load("fp8_cpu"), "fp8_weight_finite", None)
    return False if fn is None else fn(qdata)


def forget_finite(qdata: torch.Tensor) -> None:
    """Drop :func:`weight_finite`'s count for ``qdata`` (after a write that bypassed its version counter)."""
    fn = getattr(_ext.load("fp8_cpu"), "fp8_forget_finite", None)
    if fn is not None:
        fn(qdata)


def small_m_case(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``float8_weight_only_linear_cpu`` (and, for contiguous x, ``float8_act_linear_cpu``) takes this
    case with one C++ call on x as it is: x 2-D with a static number of rows 1 <= M <= ``tiled_max_m()`` (a plain
    int, not a symbolic size), and the dtypes and shapes it supports. Asked while tracing, of fake tensors: the
    compiled graph then calls ``lowbit_cpu::fp8_small_linear`` / ``fp8_small_act_linear``, whose C++ kernels
    make eager's call."""
    m = x.shape[0] if x.dim() == 2 else None
    return type(m) is int and 1 <= m <= tiled_max_m() and _supported(x, qdata, scale, bias)


def float8_weight_only_linear_cpu(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``x @ (qdata * scale).T + bias`` in ``x.dtype``, or None (unsupported case / no extension).

    Args:
        x: (..., K) bfloat16, float32 or float16 activations on CPU.
        qdata: (N, K) contiguous float8_e4m3fn or float8_e5m2 weight.
        scale: float32 (N, 1) per row or (1, 1) per tensor.
        bias: (N,) in x's dtype, or None.

    Returns:
        (..., N) in ``x.dtype``, or None when the caller must use the reference.
    """
    if not _supported(x, qdata, scale, bias):
        return None
    ext = _ext.load("fp8_cpu")
    if ext is None:
        return None
    n, k = qdata.shape
    x2 = x.reshape(-1, k)
    tiled = tiled_max_m()
    dtype = host.matmul_dtype(x.dtype) if x2.shape[0] > tiled else x.dtype
    if dtype != x.dtype:  # the chunked path in float32: the CPU has no native bf16/fp16 matmul
        out = ext.fp8_linear(x2.to(dtype), qdata, scale, None if bias is None else bias.to(dtype),
                             GEMV_MAX_M, tiled, CHUNK_ROWS).to(x.dtype)
    else:
        finite = x2.shape[0] <= GEMV_MAX_M and weight_finite(qdata)
        out = ext.fp8_linear(x2, qdata, scale, bias, GEMV_MAX_M, tiled, CHUNK_ROWS, finite)
    return out.reshape(*x.shape[:-1], n)


def act_linear_fn():
    """The extension's ``fp8_linear_act(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows,
    act_per_token, act_eps, act_e5m2)``, or None when the extension is unavailable. It returns what
    ``fp8_linear`` returns for x fake-quantized first by ``int8_act``'s ``fake_quant_fp8`` (dynamic
    scale per token or per tensor, float8_e5m2 if ``act_e5m2`` else float8_e4m3fn, floor ``act_eps``),
    bit for bit, in one call: at M <= tiled_max_m the fake-quantized values go straight into the
    kernel's own widened copy of x (``csrc/fp8_act.h``), no tensor in between. Raises RuntimeError
    naming ``act_eps`` unless it is > 0, and ``fp8_linear``'s errors for the other arguments."""
    return getattr(_ext.load("fp8_cpu"), "fp8_linear_act", None)


def act_static_linear_fn():
    """The extension's ``fp8_linear_act_static(x, qdata, scale, bias, gemv_max_m, tiled_max_m, chunk_rows,
    act_scale, act_eps, act_e5m2)``, or None: :func:`act_linear_fn`'s call with a static per-tensor activation
    scale (``fake_quant_fp8``'s ``static_scale``), bit for bit ``fp8_linear`` of x fake-quantized with it. Raises
    RuntimeError naming ``act_scale`` unless it is a positive finite float."""
    return getattr(_ext.load("fp8_cpu"), "fp8_linear_act_static", None)


def float8_act_linear_cpu(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool, eps: float,
    e5m2: bool,
) -> torch.Tensor | None:
    """``float8_weight_only_linear_cpu(fake_quantize_float8(x), qdata, scale, bias)`` for dynamic float8
    activations in one C++ call (:func:`act_linear_fn`), bit for bit; None where it does not apply:
    x not a contiguous 2-D CPU tensor with 1 <= M <= ``tiled_max_m()`` (above, the weight-only path may
    widen x first), a gradient wanted, a case ``float8_weight_only_linear_cpu`` does not take, or no
    extension.

    Args:
        x: (M, K) bfloat16, float32 or float16 activations (not yet quantized).
        qdata, scale, bias: as for :func:`float8_weight_only_linear_cpu`.
        per_token: one scale per row of x (True) or one for all of x (False).
        eps: the scale's floor (the activation spec's ``eps``), > 0.
        e5m2: activations as float8_e5m2 (True) or float8_e4m3fn (False).
    """
    if (x.dim() != 2 or not 1 <= x.shape[0] <= tiled_max_m() or not x.is_contiguous()
            or wants_grad(x, bias)
            or not _supported(x, qdata, scale, bias)):
        return None
    fn = act_linear_fn()
    if fn is None:
        return None
    finite = x.shape[0] <= GEMV_MAX_M and weight_finite(qdata)
    return fn(x, qdata, scale, bias, GEMV_MAX_M, tiled_max_m(), CHUNK_ROWS, per_token, eps, e5m2, finite)
