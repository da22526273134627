"""lowbit/kernels/_ext.py: which build of each C++ kernel runs (chosen from the CPU's features, or
forced by LOWBIT_ISA), why a kernel is unavailable, said once, and a failed build on a CPU that
could run it fails the suite instead of turning its tests into skips."""

import logging
import os
import platform
import threading
import time

import pytest

from lowbit.kernels import _ext

NAMES = sorted(_ext.BUILDS)
AVX2_FLAGS = "flags\t\t: fpu sse2 avx f16c fma avx2 bmi2 "
ALL_FLAGS = "flags\t\t: fpu sse2 " + " ".join(sorted({f for bs in _ext.BUILDS.values() for b in bs for f in b.features})) + " "


def _expected_isa(name: str) -> str | None:
    """The build this machine should run for ``name``: the first whose features /proc/cpuinfo lists
    (only the forced one when LOWBIT_ISA is set)."""
    flags = _ext._cpu_flags()
    forced = os.environ.get("LOWBIT_ISA", "auto").lower()
    if platform.machine() != "x86_64":
        return None
    for b in _ext.BUILDS[name]:
        if forced in ("", "auto", b.isa) and all(f" {f} " in f"{flags} " for f in b.features):
            return b.isa
    return None


@pytest.mark.parametrize("name", NAMES)
def test_extension_builds_where_the_cpu_can_run_it(name):
    """On a CPU with the features of one of a kernel's builds (and LOWBIT_NO_EXT unset), the first
    such build must build and load: a broken build must fail here, not leave the suite green on the
    slow PyTorch paths."""
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        assert _ext.status()[name] == _ext.DISABLED
        pytest.skip("LOWBIT_NO_EXT=1: C++ kernels disabled on purpose")
    isa = _expected_isa(name)
    if isa is None:
        assert _ext.status()[name].startswith(("cpu lacks", "not x86-64")), _ext.status()[name]
        pytest.skip(f"this CPU can't run {name} ({_ext.status()[name]})")
    assert _ext.status()[name] == f"ok ({isa})", f"C++ kernel {name}: {_ext.status()[name]}"
    assert _ext.load(name) is not None and _ext.active_isa(name) == isa


@pytest.fixture
def fresh(monkeypatch):
    """An empty load cache for the test (the process's real one is restored afterwards)."""
    monkeypatch.setattr(_ext, "_LOADED", {})
    monkeypatch.setattr(_ext, "_IMPORTED", {})
    monkeypatch.delenv("LOWBIT_NO_EXT", raising=False)
    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    return monkeypatch


def _record_builds(fresh, flags):
    """Fakes the CPU flags and the compiler: returns the list of sources 'built'."""
    built = []
    fresh.setattr(_ext, "_cpu_flags", lambda: flags)

    def fake_build(build, flags):
        built.append(build.source)
        return object()

    fresh.setattr(_ext, "_build", fake_build)
    return built


def test_status_disabled_by_env(fresh):
    fresh.setenv("LOWBIT_NO_EXT", "1")
    assert _ext.status() == {n: "disabled (LOWBIT_NO_EXT=1)" for n in NAMES}
    assert all(_ext.load(n) is None for n in NAMES)


def test_avx512_cpu_gets_the_avx512_builds(fresh):
    built = _record_builds(fresh, ALL_FLAGS)
    best = {n: _ext.BUILDS[n][0] for n in NAMES}
    assert _ext.status() == {n: f"ok ({b.isa})" for n, b in best.items()}
    assert sorted(built) == sorted(b.source for b in best.values())
    assert all(_ext.active_isa(n) == b.isa for n, b in best.items())


@pytest.mark.parametrize("flags", [AVX2_FLAGS, "flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512bw "],
                         ids=["avx2-only", "avx512-subset"])
def test_cpu_without_the_avx512_features_gets_the_avx2_builds(fresh, flags):
    built = _record_builds(fresh, flags)
    status = _ext.status()
    # int8_gemv needs only avx512f/bw: the second CPU runs its AVX-512 build, the others fall back
    want = {n: "ok (avx512)" if n == "int8_gemv" and "avx512bw" in flags else "ok (avx2)" for n in NAMES}
    assert status == want
    assert sorted(built) == sorted(n if want[n] == "ok (avx512)" else f"{n}_avx2" for n in NAMES)


def test_lowbit_isa_forces_the_avx2_build_on_an_avx512_cpu(fresh):
    built = _record_builds(fresh, ALL_FLAGS)
    fresh.setenv("LOWBIT_ISA", "avx2")
    assert _ext.status() == {n: "ok (avx2)" for n in NAMES}
    assert sorted(built) == sorted(f"{n}_avx2" for n in NAMES)
    assert "LOWBIT_ISA=avx2 forces the avx2 builds" in _ext.kernel_report()[-1]


def test_lowbit_isa_avx512_on_an_avx2_cpu_says_what_is_missing(fresh):
    built = _record_builds(fresh, AVX2_FLAGS)
    fresh.setenv("LOWBIT_ISA", "AVX512")
    assert _ext.load("int8_gemv") is None and built == []
    assert _ext.status()["int8_gemv"] == "cpu lacks avx512f, avx512bw (avx512) [forced by LOWBIT_ISA=avx512]"


@pytest.mark.parametrize("value", ["sse4", "avx-512", "1"])
def test_bad_lowbit_isa_is_a_clear_error(fresh, value):
    _record_builds(fresh, ALL_FLAGS)
    fresh.setenv("LOWBIT_ISA", value)
    with pytest.raises(ValueError, match=rf"LOWBIT_ISA='{value}' is not a known instruction set; use one of auto, avx512, avx2"):
        _ext.load("int4_cpu")
    assert "int4_cpu" not in _ext._LOADED  # nothing recorded: fixing the variable fixes the next call


def test_a_second_build_of_a_loaded_kernel_is_refused(fresh):
    """Both builds register the same lowbit_cpu:: dispatcher ops: one per process."""
    built = _record_builds(fresh, ALL_FLAGS)
    fresh.setattr(_ext, "_IMPORTED", {"int4_cpu": "avx512"})
    fresh.setenv("LOWBIT_ISA", "avx2")
    assert _ext.load("int4_cpu") is None and built == []
    assert _ext.status()["int4_cpu"] == "the avx512 build of int4_cpu is already loaded in this process (avx2 asked for)"


def test_status_names_missing_cpu_features_and_logs_once(fresh, caplog):
    fresh.setattr(_ext, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx512f")
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels._ext"):
        assert _ext.load("int8_gemv") is None
        assert _ext.load("int8_gemv") is None
    why = "cpu lacks avx512bw, f16c (avx512); avx2, fma, f16c (avx2)"
    assert _ext.status()["int8_gemv"] == why
    lines = [r.getMessage() for r in caplog.records if "int8_gemv" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0], lines


def test_status_not_x86(fresh):
    fresh.setattr(platform, "machine", lambda: "aarch64")
    assert _ext.status()["int4_cpu"] == "not x86-64 (aarch64)"
    assert _ext.active_isa("int4_cpu") is None


def test_build_failure_is_recorded_and_warned(fresh):
    fresh.setattr(_ext, "_cpu_flags", lambda: ALL_FLAGS)

    def broken(build, flags):
        raise RuntimeError(f"Error building extension 'lowbit_{build.source}': g++ exploded")

    fresh.setattr(_ext, "_build", broken)
    with pytest.warns(RuntimeWarning) as warned:
        assert _ext.load("fp8_cpu") is None
        status = _ext.status()
    assert status["fp8_cpu"] == "build failed (avx512): RuntimeError: Error building extension 'lowbit_fp8_cpu': g++ exploded"
    fp8 = [str(w.message) for w in warned if "kernel fp8_cpu " in str(w.message)]
    assert len(fp8) == 1 and "could not be built" in fp8[0] and "g++ exploded" in fp8[0], fp8


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown C\+\+ kernel source 'nope'"):
        _ext.load("nope")
    with pytest.raises(ValueError, match=r"unknown C\+\+ kernel source 'nope'"):
        _ext.needed_features("nope")
    with pytest.raises(ValueError, match=r"kernel 'int4_cpu' has no 'sse' build"):
        _ext.needed_features("int4_cpu", "sse")


def test_every_build_has_its_source_and_the_avx2_builds_need_only_avx2_fma_f16c():
    for name, builds in _ext.BUILDS.items():
        assert [b.isa for b in builds] in (list(_ext.ISAS), ["avx2"]), name
        for b in builds:
            assert (_ext._CSRC / f"{b.source}.cpp").is_file(), b
        assert _ext.needed_features(name) == _ext.needed_features(name, "avx2") == ("avx2", "fma", "f16c")
    assert _ext.BUILDS["int8_act"][0].cflags == _ext.BUILDS["int8_act"][1].cflags == ("-ffp-contract=off",)


def test_kernel_report_lists_every_kernel_with_its_status(fresh):
    _record_builds(fresh, AVX2_FLAGS)
    lines = _ext.kernel_report()
    assert len(lines) == len(NAMES)
    assert lines[0].startswith("int8_gemv: ok (avx2) [builds: avx512 (avx512f, avx512bw, f16c), avx2 (avx2, fma, f16c)]")


def test_concurrent_first_loads_build_once(fresh):
    fresh.setattr(_ext, "_cpu_flags", lambda: ALL_FLAGS)
    calls, sentinel = [], object()

    def slow_build(build, flags):
        calls.append(build.source)
        time.sleep(0.05)
        return sentinel

    fresh.setattr(_ext, "_build", slow_build)
    barrier, results = threading.Barrier(8), []

    def first_call():
        barrier.wait()
        results.append(_ext.load("int8_act"))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["int8_act"] and results == [sentinel] * 8


@pytest.mark.slow
@pytest.mark.parametrize("build", [b for bs in _ext.BUILDS.values() for b in bs], ids=lambda b: b.source)
def test_builds_this_cpu_does_not_run_still_compile(build):
    """A build whose features this CPU lacks is never built by the suite here (CI has no AVX-512):
    it must still compile (with its own -m flags; syntax and types only, ~15 s each)."""
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    name = next(n for n, bs in _ext.BUILDS.items() if build in bs)
    if _ext.active_isa(name) == build.isa:
        pytest.skip(f"{build.source} is the build this process runs: built and tested by the other tests")
    flags = [f"-m{_ext._GCC_FLAG.get(f, f)}" for f in build.features]
    cmd = [os.environ.get("CXX", "c++"), "-fsyntax-only", "-std=c++20", f"-DTORCH_EXTENSION_NAME=lowbit_{build.source}",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{_ext._CSRC}", *(f"-isystem{p}" for p in include_paths()),
           f"-isystem{sysconfig.get_paths()['include']}", *build.cflags, *flags, str(_ext._CSRC / f"{build.source}.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", NAMES)
def test_fitting_isa_is_the_build_this_cpu_runs(name):
    """``fitting_isa`` names the build ``load`` chooses here, LOWBIT_NO_EXT=1 or not (routing asked while tracing
    must not depend on whether the extension loaded)."""
    assert _ext.fitting_isa(name) == _expected_isa(name)


def test_fitting_isa_from_the_flags_and_lowbit_isa(fresh):
    fresh.setattr(_ext, "_cpu_flags", lambda: ALL_FLAGS)
    assert {n: _ext.fitting_isa(n) for n in NAMES} == {n: _ext.BUILDS[n][0].isa for n in NAMES}
    fresh.setenv("LOWBIT_NO_EXT", "1")
    assert {n: _ext.fitting_isa(n) for n in NAMES} == {n: _ext.BUILDS[n][0].isa for n in NAMES}
    fresh.setenv("LOWBIT_ISA", "avx2")
    assert {n: _ext.fitting_isa(n) for n in NAMES} == {n: "avx2" for n in NAMES}
    fresh.setattr(_ext, "_cpu_flags", lambda: AVX2_FLAGS)
    fresh.setenv("LOWBIT_ISA", "avx512")
    assert _ext.fitting_isa("fp8_cpu") is None
    fresh.setattr(platform, "machine", lambda: "aarch64")
    fresh.delenv("LOWBIT_ISA")
    assert _ext.fitting_isa("fp8_cpu") is None
    with pytest.raises(ValueError, match="unknown C\\+\\+ kernel source 'nope'"):
        _ext.fitting_isa("nope")
