"""What this CPU computes fast, for the kernels' choice of path (read once from ``/proc/cpuinfo``).

Two facts move the large-M paths more than any kernel tuning does:

* **native half-precision matmul.** With ``avx512_bf16`` or ``amx_bf16`` (``avx512_fp16`` or
  ``amx_fp16`` for float16) oneDNN multiplies bf16 matrices in hardware. Without them (most AVX2
  laptops and cloud hosts, Zen 2/3, Skylake) a bf16 GEMM converts in software: on this project's
  AVX2 EPYC, ``F.linear`` at M=256, 4096 x 4096 ran at ~20 GFLOP/s in bf16 and ~170 in float32. So
  there the weight-only and fake-quantized paths above the small-M kernels compute in float32 on
  the exactly dequantized weight and round the result to the input dtype once (``matmul_dtype``).
* **int8 dot products** (``avx512_vnni``, ``avx_vnni``, ``amx_int8``). Without them
  ``torch._int_mm`` runs at ~2-5 GOP/s; ``lowbit.kernels.w8a8`` then computes the same exact int32
  products with float32 GEMMs (exact: see ``w8a8._int8_mm_float32``).

``LOWBIT_HALF_MATMUL=auto|native|float32`` overrides the first choice (tests force each path on any
host); ``LOWBIT_INT8_DOT=auto|native|float32`` the second.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from lowbit.kernels import _ext, hugepages

__all__ = [
    "cpu_flags",
    "half_matmul_native",
    "matmul_dtype",
    "has_int8_dot",
    "float32_matmul_exact",
    "host_report",
    "HALF_ENV",
    "INT8_ENV",
]

HALF_ENV = "LOWBIT_HALF_MATMUL"
INT8_ENV = "LOWBIT_INT8_DOT"
_CHOICES = ("auto", "native", "float32")
_HALF = (torch.bfloat16, torch.float16)
_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it can't be read), as ``_ext`` reads them."""
    line = _ext._cpu_flags()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def _env(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{name}={value!r}; allowed: {list(_CHOICES)}")
    return value


def half_matmul_native(dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` (bf16 / fp16) GEMM runs in hardware here; True for other dtypes."""
    if dtype not in _HALF:
        return True
    choice = _env(HALF_ENV)
    if choice != "auto":
        return choice == "native"
    return any(f in cpu_flags() for f in _NATIVE_FLAGS[dtype])


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a large CPU GEMM on ``dtype`` activations should compute in: float32 for bf16 / fp16
    where the CPU has no native half matmul, else ``dtype``."""
    return dtype if half_matmul_native(dtype) else torch.float32


def has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI / AMX) for ``torch._int_mm``."""
    choice = _env(INT8_ENV)
    if choice != "auto":
        return choice == "native"
    return any(f in cpu_flags() for f in _INT8_DOT_FLAGS)


def float32_matmul_exact() -> bool:
    """Whether float32 matmuls on CPU run in float32 (no bf16 / tf32 down-conversion allowed by
    ``torch.set_float32_matmul_precision`` or ``torch.backends.mkldnn.matmul.fp32_precision``)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(torch.backends, "mkldnn", None)
    matmul = getattr(mkldnn, "matmul", None)
    precision = getattr(matmul, "fp32_precision", "none")
    return precision in ("none", "ieee", None)


def amx_active() -> bool | None:
    """Whether the AVX-512 builds' GEMMs run on AMX tiles in this process (csrc/amx.h: the CPU has them, Linux
    granted the tile state, nothing switched them off); None where the int8_gemv AVX-512 build is not loaded."""
    from lowbit.kernels import _ext

    fn = getattr(_ext.load("int8_gemv"), "amx_active", None)
    return None if fn is None else bool(fn())


def _int4_gemm_from() -> str:
    """Above which M int4's bf16 x runs gemm_bf16 here, as text (it depends on K on the AVX-512 build)."""
    from lowbit.kernels import _int4_cpu

    big, small = _int4_cpu.small_max_m(_int4_cpu.LARGE_K), _int4_cpu.small_max_m(_int4_cpu.LARGE_K - 1)
    return str(big) if big == small else f"{big} (K >= {_int4_cpu.LARGE_K}; above {small} for smaller K)"


def _amx_note(flags: frozenset[str]) -> str:
    if "amx_tile" not in flags:
        return ""
    active = amx_active()
    return ("; on AMX tiles (amx_bf16, amx_int8)" if active else
            "; AMX tiles off: not granted by the OS or switched off (set_amx)" if active is False else "")


def host_report() -> list[tuple[str, str]]:
    """(fact, value) rows for ``lowbit info --kernels``."""
    flags = cpu_flags()
    rows = []
    for dtype in _HALF:
        have = [f for f in _NATIVE_FLAGS[dtype] if f in flags]
        name = str(dtype).removeprefix("torch.")
        how = "native" if half_matmul_native(dtype) else "float32 compute"
        why = f"has {', '.join(have)}" if have else f"no {' / '.join(_NATIVE_FLAGS[dtype])}"
        rows.append((f"{name} large-M matmul", f"{how} ({why}; {HALF_ENV} overrides)"))
    have = [f for f in _INT8_DOT_FLAGS if f in flags]
    if not has_int8_dot():
        how = "exact float32 GEMMs over K chunks"
    elif "avx512_vnni" in flags:
        how = "lowbit's VNNI mm_i8 / gemm_i8 (where the AVX-512 int8_act build runs), else torch._int_mm"
    else:
        how = "torch._int_mm"
    why = f"has {', '.join(have)}" if have else f"no {' / '.join(_INT8_DOT_FLAGS)}"
    if has_int8_dot() and "avx512_vnni" in flags:
        why += _amx_note(flags)  # gemm_i8 on the tiles where they are on
    rows.append(("int8 x int8 matmul", f"{how} ({why}; {INT8_ENV} overrides)"))
    if half_matmul_native(torch.bfloat16) and "avx512_bf16" in flags:
        how = ("lowbit's gemm_bf16, the weight made bf16 per panel inside the GEMM (where the AVX-512 builds run: "
               f"int8 above the GEMV's M, int4 above {_int4_gemm_from()} and float8 above 32"
               + ("; 8da4w with bf16 x from M = 32, on the tiles" if amx_active() else "") + ")")
        why = "has avx512_bf16" + _amx_note(flags)
    else:
        how = "the weight converted a chunk of rows at a time, then torch.mm"
        why = "no avx512_bf16" if "avx512_bf16" not in flags else f"bf16 matmul off by {HALF_ENV}"
    rows.append(("bf16 weight-only large-M matmul", f"{how} ({why})"))
    if hugepages.enabled():
        pages = (f"quantized weights of {hugepages.MIN_BYTES >> 20} MiB or more advised onto 2 MiB pages (madvise; "
                 f"{hugepages.ENV}=0 switches it off)")
    else:
        pages = f"4 KiB pages as allocated ({'switched off by ' + hugepages.ENV + '=0' if sys.platform.startswith('linux') else 'not Linux'})"
    rows.append(("weight pages", pages))
    return rows
