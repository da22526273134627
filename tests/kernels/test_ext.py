"""lowbit/kernels/_ext.py: why each C++ kernel is (un)available, said once, and a failed build on a
CPU that could run it fails the suite instead of turning its tests into skips."""

import logging
import os
import platform
import threading
import time

import pytest

from lowbit.kernels import _ext

NAMES = sorted(_ext._FEATURES)
ALL_FLAGS = "flags\t\t: fpu sse2 " + " ".join(sorted({f for fs in _ext._FEATURES.values() for f in fs})) + " "


def _cpu_has(name: str) -> bool:
    flags = _ext._cpu_flags()
    return platform.machine() == "x86_64" and all(f" {f} " in f"{flags} " for f in _ext.needed_features(name))


@pytest.mark.parametrize("name", NAMES)
def test_extension_builds_where_the_cpu_can_run_it(name):
    """On a CPU with the features a kernel needs (and LOWBIT_NO_EXT unset), it must build and load:
    a broken build must fail here, not leave the suite green on the slow PyTorch paths."""
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        assert _ext.status()[name] == _ext.DISABLED
        pytest.skip("LOWBIT_NO_EXT=1: C++ kernels disabled on purpose")
    if not _cpu_has(name):
        assert _ext.status()[name].startswith(("cpu lacks", "not x86-64")), _ext.status()[name]
        pytest.skip(f"this CPU can't run {name} ({_ext.status()[name]})")
    assert _ext.status()[name] == _ext.OK, f"C++ kernel {name}: {_ext.status()[name]}"
    assert _ext.load(name) is not None


@pytest.fixture
def fresh(monkeypatch):
    """An empty load cache for the test (the process's real one is restored afterwards)."""
    monkeypatch.setattr(_ext, "_LOADED", {})
    monkeypatch.delenv("LOWBIT_NO_EXT", raising=False)
    return monkeypatch


def test_status_disabled_by_env(fresh):
    fresh.setenv("LOWBIT_NO_EXT", "1")
    assert _ext.status() == {n: "disabled (LOWBIT_NO_EXT=1)" for n in NAMES}
    assert all(_ext.load(n) is None for n in NAMES)


def test_status_names_missing_cpu_features_and_logs_once(fresh, caplog):
    fresh.setattr(_ext, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx512f")
    fresh.setattr(platform, "machine", lambda: "x86_64")
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels._ext"):
        assert _ext.load("int8_gemv") is None
        assert _ext.load("int8_gemv") is None
    assert _ext.status()["int8_gemv"] == "cpu lacks avx512bw"
    lines = [r.getMessage() for r in caplog.records if "int8_gemv" in r.getMessage()]
    assert len(lines) == 1 and "cpu lacks avx512bw" in lines[0], lines


def test_status_not_x86(fresh):
    fresh.setattr(platform, "machine", lambda: "aarch64")
    assert _ext.status()["int4_cpu"] == "not x86-64 (aarch64)"


def test_build_failure_is_recorded_and_warned(fresh):
    fresh.setattr(_ext, "_cpu_flags", lambda: ALL_FLAGS)
    fresh.setattr(platform, "machine", lambda: "x86_64")

    def broken(name, flags):
        raise RuntimeError(f"Error building extension 'lowbit_{name}': g++ exploded")

    fresh.setattr(_ext, "_build", broken)
    with pytest.warns(RuntimeWarning) as warned:
        assert _ext.load("fp8_cpu") is None
        status = _ext.status()
    assert status["fp8_cpu"] == "build failed: RuntimeError: Error building extension 'lowbit_fp8_cpu': g++ exploded"
    fp8 = [str(w.message) for w in warned if "kernel fp8_cpu " in str(w.message)]
    assert len(fp8) == 1 and "could not be built" in fp8[0] and "g++ exploded" in fp8[0], fp8


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown C\+\+ kernel source 'nope'"):
        _ext.load("nope")
    with pytest.raises(ValueError, match=r"unknown C\+\+ kernel source 'nope'"):
        _ext.needed_features("nope")


def test_concurrent_first_loads_build_once(fresh):
    fresh.setattr(_ext, "_cpu_flags", lambda: ALL_FLAGS)
    fresh.setattr(platform, "machine", lambda: "x86_64")
    calls, sentinel = [], object()

    def slow_build(name, flags):
        calls.append(name)
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
