"""The weight-stream prefetch setting (csrc/prefetch.h, lowbit/kernels/prefetch.py): parsing and
validation, the measured choice and its cache, and that no setting changes a value."""

import json

import pytest
import torch

from torch import nn

from lowbit import configs as C
from lowbit.kernels import _ext, prefetch
from lowbit.quantize import quantize_

SETTINGS = [(0, 32768), (1, 4096), (2, 65536), (2, 0)]


@pytest.mark.parametrize("value, want", [("nta", ("nta", 32768)), ("T1:65536", ("t1", 65536)), (" t0:0 ", ("t0", 0))])
def test_parse(value, want):
    assert prefetch.parse(value) == want


@pytest.mark.parametrize("value, match", [("t2", "hint must be one of"), ("t1:100", "multiple of 64"),
                                          ("t1:x", "multiple of 64"), ("nta:2097152", "multiple of 64")])
def test_parse_rejects_and_names_the_variable(value, match):
    with pytest.raises(ValueError, match=match) as e:
        prefetch.parse(value)
    assert "LOWBIT_PREFETCH" in str(e.value)


def _ext_or_skip(name):
    ext = _ext.load(name)
    if ext is None:
        pytest.skip(f"{name} not built here")
    return ext


@pytest.mark.parametrize("name", list(_ext.BUILDS))
def test_every_gemv_module_takes_the_setting_and_checks_it(name):
    ext = _ext_or_skip(name)
    hint, distance, _ = prefetch.choice(name)
    assert ext.get_prefetch() == (prefetch.HINTS[hint], distance)  # load() applied the kernel's choice
    if name not in prefetch.MEASURED:
        assert prefetch.choice(name) == prefetch.choice("int8_gemv")
    with pytest.raises(RuntimeError, match="prefetch hint must be"):
        ext.set_prefetch(3, 4096)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ext.set_prefetch(0, 100)
    assert ext.get_prefetch() == (prefetch.HINTS[hint], distance)  # a refused setting changes nothing


def _outputs():
    """Decode (M = 1, 3) and small-M (17) outputs of int8, int4 and float8 weight-only and W8A8 layers."""
    outs = []
    for config in (C.Int8WeightOnlyConfig(), C.Int4WeightOnlyConfig(group_size=64), C.Float8WeightOnlyConfig(),
                   C.Int8DynamicActivationInt8WeightConfig()):
        torch.manual_seed(0)
        layer = quantize_(nn.Linear(512, 96).bfloat16(), config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            outs += [layer(torch.randn(m, 512, generator=g).bfloat16()) for m in (1, 3, 17)]
    return outs


def test_no_setting_changes_a_value():
    exts = [e for e in (_ext.load(n) for n in _ext.BUILDS) if e is not None and hasattr(e, "set_prefetch")]
    if not exts:
        pytest.skip("no C++ kernel built here")
    before = [e.get_prefetch() for e in exts]
    try:
        results = []
        for setting in SETTINGS:
            for e in exts:
                e.set_prefetch(*setting)
            results.append(_outputs())
    finally:
        for e, b in zip(exts, before):
            e.set_prefetch(*b)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_choice_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_PREFETCH", "t0:8192")
    prefetch.choice.cache_clear()
    try:
        assert prefetch.choice()[:2] == ("t0", 8192)
        monkeypatch.setenv("LOWBIT_PREFETCH", "l2")
        prefetch.choice.cache_clear()
        with pytest.raises(ValueError, match="LOWBIT_PREFETCH='l2'"):
            prefetch.choice()
    finally:
        monkeypatch.delenv("LOWBIT_PREFETCH")
        prefetch.choice.cache_clear()


def test_choice_measures_once_then_reads_its_cache(monkeypatch, tmp_path):
    if _ext.built("int8_gemv") is None:
        pytest.skip("int8_gemv not built here")
    monkeypatch.delenv("LOWBIT_PREFETCH", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    calls = []
    rates = {prefetch.DEFAULT: 10.0, ("t1", 32768): 10.4, ("t1", 65536): 12.0}

    def fake_measure(ext, kernel="int8_gemv"):
        calls.append(kernel)
        return dict(rates)

    monkeypatch.setattr(prefetch, "_measure", fake_measure)
    prefetch.choice.cache_clear()
    try:
        assert prefetch.choice()[:2] == ("t1", 65536)  # 1.2x the default: taken
        cached = json.loads(next(tmp_path.glob("prefetch-*.json")).read_text())
        assert (cached["hint"], cached["distance"]) == ("t1", 65536)
        prefetch.choice.cache_clear()
        assert prefetch.choice()[:2] == ("t1", 65536) and len(calls) == 1  # read back, not measured again
        for f in tmp_path.glob("prefetch-*.json"):
            f.unlink()
        rates[("t1", 65536)] = 10.3  # under MIN_GAIN over the default: the default stays
        prefetch.choice.cache_clear()
        assert prefetch.choice()[:2] == prefetch.DEFAULT and len(calls) == 2
    finally:
        prefetch.choice.cache_clear()


def test_int4_has_its_own_measured_choice(monkeypatch, tmp_path):
    """int4_cpu is timed on its own GEMV, cached in its own file; a kernel not in MEASURED takes int8_gemv's."""
    if _ext.built("int8_gemv") is None or _ext.built("int4_cpu") is None:
        pytest.skip("int8_gemv / int4_cpu not built here")
    monkeypatch.delenv("LOWBIT_PREFETCH", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    best = {"int8_gemv": ("t1", 65536), "int4_cpu": ("t1", 16384)}

    def fake_measure(ext, kernel="int8_gemv"):
        return {c: 20.0 if c == best[kernel] else 10.0 for c in prefetch.CANDIDATES}

    monkeypatch.setattr(prefetch, "_measure", fake_measure)
    prefetch.choice.cache_clear()
    try:
        assert prefetch.choice("int4_cpu")[:2] == ("t1", 16384)
        assert prefetch.choice("int8_gemv")[:2] == ("t1", 65536)
        assert prefetch.choice("fp8_cpu")[:2] == ("t1", 65536)
        assert sorted(f.name.endswith("-int4_cpu.json") for f in tmp_path.glob("prefetch-*.json")) == [False, True]
    finally:
        prefetch.choice.cache_clear()


@pytest.mark.parametrize("kernel", prefetch.MEASURED)
def test_the_measurement_runs_every_candidate(monkeypatch, kernel):
    """The real timing loop on a small weight: a rate for every candidate, the module's setting restored."""
    ext = _ext_or_skip(kernel)
    monkeypatch.setattr(prefetch, "_BYTES", 1 << 20)
    before = ext.get_prefetch()
    rates = prefetch._measure(ext, kernel)
    assert sorted(rates) == sorted(prefetch.CANDIDATES) and all(r > 0 for r in rates.values())
    assert ext.get_prefetch() == before


def test_each_module_keeps_its_own_setting():
    """The setting lives in each extension module (csrc/prefetch.h): setting one leaves the others as they are."""
    exts = {n: e for n in _ext.BUILDS if (e := _ext.load(n)) is not None and hasattr(e, "set_prefetch")}
    if len(exts) < 2:
        pytest.skip("fewer than two C++ kernels built here")
    before = {n: e.get_prefetch() for n, e in exts.items()}
    first, *others = exts
    try:
        exts[first].set_prefetch(1, 4096)
        assert exts[first].get_prefetch() == (1, 4096)
        assert all(exts[n].get_prefetch() == before[n] for n in others)
    finally:
        exts[first].set_prefetch(*before[first])
