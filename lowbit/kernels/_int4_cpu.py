"""Int4 weight-only linear on CPU with our C++ kernels (``csrc/int4_cpu.cpp``, AVX-512, or
``csrc/int4_cpu_avx2.cpp`` on CPUs without it: ``_ext`` picks one per process).

``int4_linear_cpu(x, qdata, scale, zero_point, bias)`` computes
``F.linear(x, dequantize(qdata, scale, zero_point), bias)`` in ``x.dtype``, or returns None when
it can't (then the caller uses another path, e.g. the reference).

Weight layout (the library's canonical int4 data, used as is, nothing cached or repacked):
``qdata`` uint8 (N, K // 2) from ``pack_int4`` (element 2j in the low nibble of byte j);
``scale`` float32 (N, G); ``zero_point`` (N, G) int8 in [0, 15] or float32 (asymmetric uint4
nibbles, integer or float zero-point domain) or None (symmetric: nibbles are int4 two's
complement). Group size K // G.

Supported (anything else returns None):

* CPU tensors, x of rank >= 1 with last dim K (leading dims folded, any strides: x is copied
  only when its last dim is not unit-stride); not differentiable itself (the caller, the custom
  op ``lowbit::int4_weight_only_linear``, owns the autograd formula);
* x dtype bfloat16, float32 or float16; output in x's dtype; bias (N,) or None;
* group size a power of two >= ``MIN_GROUP`` (32, 64, 128, 256, ...; the C++ entry points check
  the same), K even, K % G == 0; any N; qdata contiguous; ``zero_point`` int8, float32 or None; the
  extension built (AVX-512 F/BW/VL/BF16/VBMI/VNNI, or AVX2 + FMA + F16C: see ``_ext``).

Paths, by M = number of rows of x (thresholds measured on Zen 5, 2 threads, 8 x 4096^2 layers; the
AVX2 build has the same paths and entry points, with float32 FMA where AVX-512 uses vdpbf16ps: bf16
x is widened to float32 and multiplied by the exact ``q - zp``; at M = 1 with an int8 zero point or none,
exact int32 sums of the nibbles times x held as two int16 planes, see ``csrc/int4_cpu_avx2.cpp``):

* bfloat16, M <= ``gemv_max_m(K)`` (``GEMV_MAX_M``, ``GEMV_MAX_M_LARGE_K`` from K = ``LARGE_K``; the AVX2 build and
  CPUs with AMX tiles ``GEMV_MAX_M_AVX2`` /
  ``GEMV_MAX_M_AMX``, 4): ``gemv_bf16``, streams the packed weight once (at M > 4 in blocks of 4 rows of x,
  each against 4 rows of W while they are in L1); nibbles become
  bf16 ``16 + q`` in two ops, vdpbf16ps against x (bf16, permuted once per call), per-group scale
  by FMA, the ``16 + zp`` offset (an int8 or a float32 zp alike) removed once per row from
  per-group sums of x. Float32
  accumulation; the weight is used unrounded (the reference rounds it to bf16 first), so results
  differ from the reference by about the reference's own rounding (~50 dB SQNR); the offset adds an
  absolute error of about 2^-24 (16 + zp) s sum|x|.
* bfloat16, ``gemv_max_m(K)`` < M <= ``small_max_m(K)`` (the AVX-512 build: ``SMALL_MAX_M_LARGE_K`` from K =
  ``LARGE_K``, none below it; the AVX2 build ``SMALL_MAX_M_AVX2``;
  CPUs with AMX ``SMALL_MAX_M_AMX``, the GEMV's 4: none): ``gemm_small_bf16``, nibbles looked up as bf16
  ``q - zp`` (exact products, no offset), each unpacked weight pair applied to 16 rows of x per instruction
  (register tile of W rows x 16-row blocks of x).
* bfloat16, ``small_max_m(K)`` < M <= ``rows_max_m(K)`` (the AVX-512 build without AMX: ``ROWS_MAX_M_LARGE_K`` from K =
  ``LARGE_K``, none below it): ``gemm_rows_bf16``, each block of 4 weight rows dequantized once to the reference's
  bf16 values into a per-thread scratch that serves every row of x (4 x 4 ``vdpbf16ps`` tiles over all of K).
* bfloat16 above ``rows_max_m(K)`` (the AVX-512 build): ``gemm_bf16``, a bf16 GEMM (``csrc/gemm_bf16.h``)
  whose 64-row panels are dequantized exactly (the reference's bf16 values) per call inside the
  GEMM, in L2; float32 sums, one rounding of the output. SmolLM2's seven linears at M = 128, g64:
  1.12-1.18x bf16 where the chunked path ran 0.67-0.94x; 4096^2 g128 M = 256: 0.99x (chunked 0.92-0.96x)
  (``benchmarks/results/avx512_zen4/scratch/int4_gemm_bf16_vs_paths.py``). At M = 9..32 it is ahead of
  the GEMV and ``gemm_small_bf16`` on SmolLM2's layers (K < ``LARGE_K``) and from M = 17 on larger ones, so it takes
  M > ``small_max_m(K)`` (session 26; the comment at ``LARGE_K``).
* otherwise (and float32/float16 with M > ``F32_ROWS_MAX_M``): ``linear_chunked``: ``CHUNK_ROWS`` rows of W at a
  time are dequantized exactly (bit-equal to ``dequantize_affine``: ``(q - zp) * s`` in float32,
  q exact, one rounding for a float zp's subtraction, one for the product, one to x's dtype) into a reused buffer, then ``addmm``/``mm`` (oneDNN/BLAS) into
  the output's column slice. Equal to the reference up to matmul accumulation order. bf16/fp16 x
  on a CPU without native half matmul (``host.matmul_dtype``): ``_chunked_float32``, the same
  dequantized values widened to float32, a float32 matmul, one rounding of the output (5-6x faster
  at M=256 on an AVX2 host).
* float32 / float16, M <= ``F32_ROWS_MAX_M`` (8): ``gemv_f32`` once per row of x, float32 math (x converted to
  float32 exactly, nibbles to float32 exactly, FMA), one rounding of the output; each row's bits are its M = 1
  bits. Until session 24 only M = 1 took it, and M = 2 fell to ``linear_chunked`` (dequantizing every weight row
  per call): through ``quantize_`` + ``nn.Linear`` on the Zen 4 host, 2 threads, the rows are 1.38-7.1x faster for
  float32 x at M = 2-8 and 1.6-13.8x for float16 x (8 x 4096^2 float32 M = 2 50.9 -> 11.1 ms), mixed at M = 16
  (0.73-2.59x) (``benchmarks/results/avx512_zen4/scratch/int4_f32_rows_session24.txt``).
"""

from __future__ import annotations

import torch

from lowbit.kernels import _cpu_ops, _ext, host
from lowbit.kernels.preference import wants_grad

__all__ = ["int4_linear_cpu", "available", "direct_gemv_fp8_act", "direct_gemv_fp8_act_fn", "small_max_m", "gemv_max_m",
           "GEMV_MAX_M", "LARGE_K", "GEMV_MAX_M_LARGE_K", "SMALL_MAX_M_LARGE_K", "ROWS_MAX_M_LARGE_K", "rows_max_m", "GEMV_MAX_M_AVX2", "GEMV_MAX_M_AMX", "GEMV_KERNEL_MAX_M", "F32_ROWS_MAX_M",
           "SMALL_MAX_M_AVX2", "CHUNK_ROWS", "MIN_GROUP"]

# bf16: gemv_bf16 up to here on the AVX-512 build, gemm_small_bf16 above. 2 threads, Zen 4, gemv_bf16 / gemm_small_bf16
# (/ gemm_bf16): 8 x 4096^2 (weights from DRAM), ms (benchmarks/results/avx512_zen4/scratch/int4_gemv_m16_ab.txt):
# g128 M = 8 11.0 / 17.1, M = 12 16.2 / 18.3, M = 16 22.2 / 18.6; g32 M = 8 12.5 / 21.0, M = 12 14.4 / 17.3. SmolLM2's
# layers (hot in cache), g64, us (int4_gemv_m16_smollm2.txt): 576 <- 576 M = 8 62.1 / 66.3 / 57.0, M = 12 90.2 / 72.6
# / 61.1; 576 <- 1536 M = 8 83.7 / 122.9 / 115.0, M = 12 160.3 / 148.3 / 160.8. Above 8 the GEMV wins only where the
# weight streams from DRAM, so 8.
GEMV_MAX_M = 8
# From K = LARGE_K (session 26): the GEMV up to GEMV_MAX_M_LARGE_K, gemm_small_bf16 up to SMALL_MAX_M_LARGE_K, gemm_bf16
# above; below LARGE_K gemm_bf16 from GEMV_MAX_M + 1. 2 threads, Zen 4, weights from DRAM, ms gemv / small / gemm
# (benchmarks/results/avx512_zen4/scratch/int4_small_m_routes_session26.txt): llama1b's 7 linears x 4 (K 2048 / 8192)
# g128 M = 9 18.5 / 24.6 / 28.3, M = 12 23.3 / 25.3 / 30.5, M = 16 31.0 / 26.1 / 34.8, M = 24 - / 47.6 / 43.3;
# 8 x 4096^2 g32 M = 12 14.3 / 17.2 / 17.7, M = 16 18.6 / 16.9 / 20.1, M = 24 - / 31.4 / 24.9; SmolLM2's 7 linears
# x 30 (K 576 / 1536) g32 float zero point M = 9 17.8 / 21.7 / 17.0, M = 12 21.9 / 22.8 / 17.3, M = 16 27.8 / 23.2
# / 19.4 (int8 zero points: gemm_small and gemm_bf16 level at 12-16).
LARGE_K = 2048
GEMV_MAX_M_LARGE_K = 12
SMALL_MAX_M_LARGE_K = 16
# From K = LARGE_K above SMALL_MAX_M_LARGE_K (session 27): gemm_rows_bf16 (4 weight rows dequantized once into a scratch
# for every row of x) up to ROWS_MAX_M_LARGE_K, gemm_bf16 above. 8 x 4096^2 g128, 2 threads, Zen 4, ms rows / gemm_bf16
# / gemm_small_bf16 / bf16 F.linear (benchmarks/results/avx512_zen4/scratch/int4_rows_gemm_session27.txt, run 1): M = 20 17.90
# / 21.90 / 25.27 / 22.96, M = 24 21.19 / 25.22 / 26.35 / 26.32, M = 32 25.99 / 29.06 / 25.90 / 30.20, M = 48 40.47 /
# 43.11 / 40.28 / 42.39, M = 64 48.64 / 47.83 / 50.01 / 49.91. Below LARGE_K (SmolLM2's layers) gemm_bf16 stays ahead
# from M = 20 (rows 1.41 / gemm 1.34 ms), so there it keeps every M above the GEMV.
ROWS_MAX_M_LARGE_K = 48
GEMV_MAX_M_AVX2 = 4  # the AVX2 build's float32 GEMV (it takes larger M in blocks of 4, a pass over W each)
GEMV_KERNEL_MAX_M = 16  # the largest M either build's gemv_bf16 / gemv_bf16_act takes
F32_ROWS_MAX_M = 8  # float32 / float16 x: gemv_f32 once per row up to here, then linear_chunked (module docstring)
# The AVX2 build: gemm_small_bf16 (tile_f32.h's 4 x 3 tiles, its C++ limit 64) against the chunked path
# (float32 at::mm: no native bf16 matmul), ms for 2 x 4096^2 g128, 2 threads, Zen 2 (benchmarks/results/
# avx2_zen2/scratch/int4_fp8_small_m_vs_chunked.py): M = 32 15.4 / 43.0, 48 21.5 / 50.1, 64 29.8 / 59.4.
SMALL_MAX_M_AVX2 = 64
CHUNK_ROWS = 1024  # rows of W per mm (256-row slices measured 15% slower than one mm; 1024 equal)
MIN_GROUP = 32  # smallest group size (a power of two) the kernels take: gemv_f32 steps 32 elements


# On a CPU with AMX, gemm_bf16 runs on the tiles and is ahead from M = 5: 2 x 4096^2 g128, 2 threads, ms,
# gemm_small_bf16 / gemm_bf16 (2-core Xeon guest, benchmarks/results/avx512_amx_xeon/scratch/int4_small_m_amx.py):
# M = 5 5.64 / 3.24, 16 5.95 / 4.05, 32 10.93 / 3.24. So there gemm_small_bf16 serves no M.
SMALL_MAX_M_AMX = GEMV_MAX_M_AMX = 4  # the tiles from M = 5, as before the GEMV took larger M (not measured against it)


def _amx_on() -> bool:
    on = getattr(_ext.load("int4_cpu"), "amx_active", None)
    return on is not None and bool(on())


def gemv_max_m(k: int | None = None) -> int:
    """The largest M ``gemv_bf16`` serves for bf16 x (K = ``k`` where known): on the AVX-512 build ``GEMV_MAX_M``, or
    ``GEMV_MAX_M_LARGE_K`` from K = ``LARGE_K``; ``GEMV_MAX_M_AVX2`` on the
    AVX2 one, ``GEMV_MAX_M_AMX`` where the AVX-512 build's GEMMs run on AMX tiles (as ``small_max_m``). While
    torch.compile traces, from the build that fits this CPU and its flags (``_ext.fitting_isa``), not from whether
    the extension loaded (README design note); either build's kernel takes any M up to ``GEMV_KERNEL_MAX_M``."""
    if torch.compiler.is_compiling():
        isa = _ext.fitting_isa("int4_cpu")
        amx = "amx_bf16" in host.cpu_flags()
    else:
        isa = _ext.active_isa("int4_cpu")
        amx = isa == "avx512" and _amx_on()
    if isa == "avx2":
        return GEMV_MAX_M_AVX2
    if amx:
        return GEMV_MAX_M_AMX
    return GEMV_MAX_M_LARGE_K if k is not None and k >= LARGE_K else GEMV_MAX_M


def small_max_m(k: int | None = None) -> int:
    """The largest M ``gemm_small_bf16`` or the GEMV serves for bf16 x (K = ``k``; without it, the largest over K),
    gemm_bf16 above on the AVX-512 build: it depends on the build that runs (``_ext.active_isa``)
    and, for the AVX-512 one, on K (``SMALL_MAX_M_LARGE_K`` from ``LARGE_K``, else the GEMV's ``GEMV_MAX_M``: no M) and
    on whether its GEMMs run on AMX tiles in this process (``SMALL_MAX_M_AMX``): the
    build's ``amx_active()``, not the CPU's flags, so where Linux refuses the tiles or ``set_amx(False)`` switched
    them off, gemm_bf16 (then on ``vdpbf16ps`` alone) does not take the M that gemm_small_bf16 serves faster."""
    if _ext.active_isa("int4_cpu") == "avx2":
        return SMALL_MAX_M_AVX2
    if _amx_on():
        return SMALL_MAX_M_AMX
    return SMALL_MAX_M_LARGE_K if k is None or k >= LARGE_K else GEMV_MAX_M


def rows_max_m(k: int | None = None) -> int:
    """The largest M ``gemm_rows_bf16``, ``gemm_small_bf16`` or the GEMV serves for bf16 x (K = ``k``; without it, the
    largest over K), gemm_bf16 above: on the AVX-512 build without AMX tiles ``ROWS_MAX_M_LARGE_K`` from K =
    ``LARGE_K``, else ``small_max_m(k)`` (no M for gemm_rows_bf16)."""
    if _ext.active_isa("int4_cpu") == "avx512" and not _amx_on() and (k is None or k >= LARGE_K):
        return ROWS_MAX_M_LARGE_K
    return small_max_m(k)


_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
_ZP_DTYPES = (torch.int8, torch.float32)  # integer / float zero-point domain


def available() -> bool:
    """Whether the C++ extension could be built and loaded here."""
    return _ext.load("int4_cpu") is not None


def _supported(x, qdata, scale, zero_point, bias) -> bool:
    if not all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "cpu") for t in (x, qdata, scale, zero_point, bias)):
        return False
    if x.dtype not in _DTYPES or x.dim() < 1 or qdata.dtype != torch.uint8 or qdata.dim() != 2 or not qdata.is_contiguous():
        return False
    n, k = qdata.shape[0], 2 * qdata.shape[1]
    if x.shape[-1] != k or scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != n:
        return False
    g = scale.shape[1]
    if g == 0 or k % g:
        return False
    gs = k // g
    if gs < MIN_GROUP or gs & (gs - 1):
        return False
    if zero_point is not None and (zero_point.shape != scale.shape or zero_point.dtype not in _ZP_DTYPES):
        return False
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.dtype.is_floating_point):
        return False
    return True


def direct_gemv_op():
    """``lowbit_cpu::int4_gemv_bf16`` (the bf16 small-M GEMV as a dispatcher op, defined in ``_cpu_ops``), or None:
    while torch.compile traces, where no build of the kernel fits this CPU (``_ext.fitting_isa``: a graph must
    not depend on whether the extension loaded, README design note); in eager, where the extension is not loaded
    (the custom op's PyTorch paths are then faster than the op's reference body)."""
    if torch.compiler.is_compiling():
        return None if _ext.fitting_isa("int4_cpu") is None else _cpu_ops.int4_gemv_bf16
    return None if _ext.load("int4_cpu") is None else _cpu_ops.int4_gemv_bf16


def direct_gemv(x, qdata, scale, zero_point, bias) -> torch.Tensor | None:
    """The GEMV through :func:`direct_gemv_op` when it applies: CPU bf16 ``x`` (M, K) with M <= ``gemv_max_m()``, no
    gradient wanted (the op has no autograd kernel) and a shape ``int4_linear_cpu`` takes (an int8,
    float32 or no zero point); else None. Same kernel, same values as ``int4_linear_cpu``."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] > gemv_max_m(x.shape[-1]) or x.device.type != "cpu":
        return None
    if wants_grad(x, bias):
        return None
    if x.stride(-1) != 1 or not scale.is_contiguous() or (zero_point is not None and not zero_point.is_contiguous()):
        return None
    if x.shape[0] == 0 or not _supported(x, qdata, scale, zero_point, bias):
        return None
    op = direct_gemv_op()
    return None if op is None else op(x, qdata, scale, zero_point, bias)


def direct_gemv_fp8_act_fn():
    """The extension's ``gemv_bf16_act(x, qdata, scale, zero_point, bias, act_per_token, act_eps,
    act_e5m2)`` (a plain extension function, not a dispatcher op), or None when the extension is not
    available. It returns what the GEMV returns for x fake-quantized first by ``int8_act``'s
    ``fake_quant_fp8`` (dynamic scale per token or per tensor, float8_e5m2 if ``act_e5m2`` else
    float8_e4m3fn, floor ``act_eps``), bit for bit, in one call (``csrc/fp8_act.h``). Raises
    RuntimeError naming ``act_eps`` unless it is > 0, and the GEMV's errors for the other arguments."""
    return getattr(_ext.load("int4_cpu"), "gemv_bf16_act", None)


def direct_gemv_fp8_act(x, qdata, scale, zero_point, bias, per_token: bool, eps: float, e5m2: bool) -> torch.Tensor | None:
    """:func:`direct_gemv` of ``x`` fake-quantized to float8 (dynamic scale per token or per tensor,
    floor ``eps``, e5m2 or e4m3fn) in one C++ call (:func:`direct_gemv_fp8_act_fn`), the same values
    bit for bit as that fake quantization followed by :func:`direct_gemv`; None where
    :func:`direct_gemv` would return None or ``x`` is not contiguous."""
    if not isinstance(x, torch.Tensor) or not x.is_contiguous():
        return None
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] > gemv_max_m(x.shape[-1]) or x.device.type != "cpu":
        return None
    if wants_grad(x, bias):
        return None
    if zero_point is not None and not zero_point.is_contiguous():
        return None
    if not scale.is_contiguous() or x.shape[0] == 0 or not _supported(x, qdata, scale, zero_point, bias):
        return None
    fn = direct_gemv_fp8_act_fn()
    return None if fn is None else fn(x, qdata, scale, zero_point, bias, per_token, eps, e5m2)


def _chunked_float32(ext, x: torch.Tensor, qdata, scale, zero_point, bias) -> torch.Tensor:
    """``linear_chunked``'s math with a float32 matmul, for bf16/fp16 x on a CPU without native half
    matmul: each chunk of rows is dequantized exactly in x's dtype (``dequant_rows``: the reference's
    weight values, rounded as it rounds them), widened exactly to float32 and multiplied in float32;
    the output is rounded to x's dtype once. Equal to the reference up to accumulation order."""
    m, k = x.shape
    n = qdata.shape[0]
    rows = min(n, CHUNK_ROWS)
    half = torch.empty(rows, k, dtype=x.dtype)
    wide = torch.empty(rows, k)
    xf = x.float()
    out = torch.empty(m, n)
    b = None if bias is None else bias.float()
    for i in range(0, n, rows):
        j = min(i + rows, n)
        ext.dequant_rows(qdata, scale, zero_point, i, j, half)
        w = wide[: j - i].copy_(half[: j - i]).t()
        if b is None:
            torch.mm(xf, w, out=out[:, i:j])
        else:
            torch.addmm(b[i:j], xf, w, out=out[:, i:j])
    return out.to(x.dtype)


def int4_linear_cpu(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``x @ dequantize(W).T + bias`` in ``x.dtype``, or None when unsupported (see module docs).

    Args:
        x: (..., K) bfloat16, float32 or float16 activations.
        qdata: (N, K // 2) uint8, two int4 values per byte (``pack_int4``).
        scale: (N, G) float32.
        zero_point: (N, G) int8 zero point in [0, 15] or float32 (asymmetric), or None (symmetric).
        bias: (N,) or None.

    Returns:
        (..., N) tensor in ``x.dtype``, or None.
    """
    if not _supported(x, qdata, scale, zero_point, bias):
        return None
    ext = _ext.load("int4_cpu")
    if ext is None:
        return None
    n, k = qdata.shape[0], 2 * qdata.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    scale = scale.contiguous()
    if zero_point is not None:
        zero_point = zero_point.contiguous()
    if x.dtype == torch.bfloat16 and m <= gemv_max_m(x2.shape[1]):
        out = ext.gemv_bf16(x2, qdata, scale, zero_point, bias)
    elif x.dtype == torch.bfloat16 and m <= small_max_m(x2.shape[1]):
        out = ext.gemm_small_bf16(x2, qdata, scale, zero_point, bias)
    elif x.dtype != torch.bfloat16 and m <= F32_ROWS_MAX_M:  # gemv_f32 once per row: each row's M = 1 bits
        out = ext.gemv_f32(x2, qdata, scale, zero_point, bias) if m == 1 else torch.cat(
            [ext.gemv_f32(x2[i : i + 1], qdata, scale, zero_point, bias) for i in range(m)])
    elif host.matmul_dtype(x.dtype) != x.dtype:
        out = _chunked_float32(ext, x2, qdata, scale, zero_point, bias)
    elif x.dtype == torch.bfloat16 and m <= rows_max_m(x2.shape[1]) and hasattr(ext, "gemm_rows_bf16"):
        out = ext.gemm_rows_bf16(x2, qdata, scale, zero_point, bias)
    elif x.dtype == torch.bfloat16 and hasattr(ext, "gemm_bf16"):
        out = ext.gemm_bf16(x2, qdata, scale, zero_point, bias)
    else:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        out = ext.linear_chunked(x2, qdata, scale, zero_point, bias, CHUNK_ROWS)
    return out.reshape(*lead, n)
