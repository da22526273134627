"""The AVX2 and AVX-512 builds of every C++ kernel agree (lowbit/kernels/_ext.py picks one per process).

Only one build of a kernel can load in a process (both register the same dispatcher ops), so this
process runs the AVX-512 builds and a child process (``LOWBIT_ISA=avx2``) the AVX2 ones on the same
inputs, every entry point over odd shapes and all group sizes. Integer results (exact dequantization,
activation quantization, the W8A8 epilogue, the float8 conversion) must be equal; float results, each
tested against the reference within a bound, must agree within that same bound. Runs only on a CPU
with AVX-512 (skipped elsewhere, saying what is missing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.eval.metrics import sqnr
from lowbit.kernels import _ext

# Bounds each build meets against the reference (tests/kernels/test_*_ext.py, test_int8.py), by
# output dtype; the two builds differ by their summation order only.
FLOAT_DB = {torch.bfloat16: 44.0, torch.float16: 60.0, torch.float32: 110.0}
FP8_DB = {torch.bfloat16: 42.0, torch.float16: 60.0, torch.float32: 110.0}
INT4_GROUPS = (32, 64, 128, 256)


def _outputs() -> dict[str, torch.Tensor]:
    """Every entry point of every kernel on fixed seeded inputs; keys ending in ``/exact`` must be equal."""
    out = {}
    g = torch.Generator().manual_seed(0)
    e4 = _ext.load("int4_cpu")
    for gs in INT4_GROUPS:
        n, k = 37, 3 * gs
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        s = torch.rand(n, k // gs, generator=g) + 0.05
        for zp in (torch.randint(0, 16, s.shape, dtype=torch.int8, generator=g), None):
            tag = f"int4/g{gs}/{'asym' if zp is not None else 'sym'}"
            b = torch.randn(n, generator=g)
            for m in (1, 3):
                out[f"{tag}/gemv_bf16/M{m}"] = e4.gemv_bf16(torch.randn(m, k, generator=g).bfloat16(), q, s, zp, b)
            for dt in (torch.float32, torch.float16):
                out[f"{tag}/gemv_f32/{dt}"] = e4.gemv_f32(torch.randn(1, k, generator=g).to(dt), q, s, zp, b)
            for m in (5, 33):
                out[f"{tag}/gemm_small_bf16/M{m}"] = e4.gemm_small_bf16(torch.randn(m, k, generator=g).bfloat16(), q, s, zp, b)
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                buf = torch.empty(n, k, dtype=dt)
                e4.dequant_rows(q, s, zp, 0, n, buf)
                out[f"{tag}/dequant_rows/{dt}/exact"] = buf
    e8 = _ext.load("int8_gemv")
    for groups in (1, 3):
        n, k = 29, 48 * 5
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, groups, generator=g)
        for m in (1, 3):
            for dt in (torch.bfloat16, torch.float32, torch.float16):
                out[f"int8_gemv/G{groups}/M{m}/{dt}"] = e8.int8_weight_only_mm(torch.randn(m, k, generator=g).to(dt), w, s)
    ef = _ext.load("fp8_cpu")
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        every = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128).view(fp8).contiguous()
        out[f"fp8/{fp8}/to_bf16/exact"] = ef.fp8_to_bf16(every)
        n, k = 67, 200
        q = (torch.randn(n, k, generator=g) * 4).to(fp8)
        s = torch.rand(n, 1, generator=g) + 0.5
        for path, args in {"gemv": (4, 4, 256), "tiled": (0, 1 << 30, 256), "chunks": (0, 0, 16)}.items():
            for dt in (torch.bfloat16, torch.float32, torch.float16):
                for m in (1, 7):
                    x = torch.randn(m, k, generator=g).to(dt)
                    out[f"fp8/{fp8}/{path}/M{m}/{dt}"] = ef.fp8_linear(x, q, s, torch.randn(n, generator=g).to(dt), *args)
    ea = _ext.load("int8_act")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(7, 203, generator=g).to(dt) * 3
        q, sx = ea.quantize_i8(x, -1.0, 0, 1e-6)
        out[f"int8_act/{dt}/dynamic/exact"], out[f"int8_act/{dt}/dynamic_scale/exact"] = q, sx
        out[f"int8_act/{dt}/static/exact"] = ea.quantize_i8(x, 0.05, 3, 1e-6)[0]
        acc = torch.randint(-5000, 5000, (7, 45), dtype=torch.int32, generator=g)
        zc = torch.randint(-100, 100, (45,), dtype=torch.int32, generator=g)
        out[f"int8_act/{dt}/epilogue/exact"] = ea.w8a8_epilogue(acc, sx, torch.rand(45, generator=g), torch.randn(45, generator=g).to(dt), zc, x)
    e44 = _ext.load("int8_int4")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(9, 11 * 32, generator=g).to(dt) * 3
        xq, sx, zp, ok = e44.quantize_act_asym(x, -128, 127, 1e-9)
        assert ok
        out[f"int8_int4/{dt}/quantize_act_asym/exact"] = torch.cat([xq.float(), sx, zp.float()], 1)
    for gs in (32, 64, 96, 128, 256):
        n, k = 37, 3 * gs
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        s = torch.rand(n, k // gs, generator=g) + 0.05
        for m in (1, 4, 9, 40):  # 40: the AVX-512 build's panel GEMM
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=g).to(dt)
                b = torch.randn(n, generator=g).to(dt)
                out[f"int8_int4/g{gs}/M{m}/{dt}/dynamic"] = e44.int8_int4_dynamic_linear(x, q, s, b, -128, 127, 1e-9)
    return out


def _bound(key: str, t: torch.Tensor) -> float:
    return (FP8_DB if key.startswith("fp8/") else FLOAT_DB)[t.dtype]


def _avx512_missing() -> list[str]:
    flags = _ext._cpu_flags()
    need = {f for builds in _ext.BUILDS.values() for b in builds for f in b.features}
    return sorted(f for f in need if f" {f} " not in f"{flags} ")


def test_avx2_and_avx512_builds_agree(tmp_path):
    missing = _avx512_missing()
    if missing:
        pytest.skip(f"needs a CPU that runs both builds; this one lacks {', '.join(missing)}")
    active = {name: _ext.active_isa(name) for name in _ext.BUILDS if len(_ext.BUILDS[name]) > 1}
    if set(active.values()) != {"avx512"}:
        pytest.skip(f"this process does not run the AVX-512 builds ({active}; LOWBIT_ISA={os.environ.get('LOWBIT_ISA')})")
    path = tmp_path / "avx2.pt"
    env = dict(os.environ, LOWBIT_ISA="avx2")
    subprocess.run([sys.executable, str(Path(__file__)), str(path)], env=env, check=True, timeout=1200)
    avx2, avx512 = torch.load(path), _outputs()
    assert avx2.keys() == avx512.keys()
    for key, want in avx512.items():
        got = avx2[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if key.endswith("/exact"):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert sqnr(want.float(), got.float()) >= _bound(key, want), key


def test_outputs_of_this_build_are_complete_and_finite():
    """The case list itself runs on whichever build is active here (the AVX2 one on a CPU without
    AVX-512): every entry point answers, every non-NaN case is finite."""
    if any(_ext.load(name) is None for name in _ext.BUILDS):
        pytest.skip(f"C++ kernels unavailable here: {_ext.status()}")
    outs = _outputs()
    assert len(outs) > 100
    for key, t in outs.items():
        if "to_bf16" not in key:
            assert bool(t.float().isfinite().all()), key


if __name__ == "__main__":  # the child: this interpreter's build (LOWBIT_ISA) writes its outputs
    assert all(_ext.active_isa(name) == os.environ.get("LOWBIT_ISA") for name in _ext.BUILDS if len(_ext.BUILDS[name]) > 1), _ext.status()
    torch.save(_outputs(), sys.argv[1])
