"""lowbit.eval.plot: trade-off PNGs, and a clear error without matplotlib."""

import struct
import sys

import pytest

from lowbit.eval.plot import plot_tradeoff

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ROWS = [  # the shape of benchmarks/accuracy.py's "results" rows
    {"label": "float32 (no quantization)", "config": None, "bytes": 3_405_824, "delta_pct": 0.0},
    {"label": "Int8WeightOnlyConfig()", "bytes": 874_656, "delta_pct": 0.02},
    {"label": "Int4WeightOnlyConfig(group_size=32)", "bytes": 1_142_560, "delta_pct": -0.87},
    {"label": "broken", "bytes": 1_000_000, "delta_pct": None},  # a NaN perplexity: left out
]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_writes_a_png_of_accuracy_vs_size(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    path = plot_tradeoff(ROWS, tmp_path / "tradeoff.png", budget_pct=1.0, title="glassllm")
    assert path == tmp_path / "tradeoff.png" and path.stat().st_size > 0
    width, height = _png_size(path)
    assert width > 0 and height > 0
    # no global matplotlib state touched: backend, rcParams, pyplot
    assert matplotlib.get_backend() == backend and dict(matplotlib.rcParams) == rc
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_second_panel_when_rows_carry_speed(tmp_path):
    pytest.importorskip("matplotlib")
    one = _png_size(plot_tradeoff(ROWS, tmp_path / "one.png"))
    fast = [dict(r, tokens_per_s=1000.0 + 100 * i) for i, r in enumerate(ROWS)]
    two = _png_size(plot_tradeoff(fast, tmp_path / "two.png"))
    assert two[0] > 1.5 * one[0] and two[1] == one[1]  # twice as wide, same height


def test_accepts_objects_and_megabytes(tmp_path):
    pytest.importorskip("matplotlib")

    class Row:
        label, weight_mb, output_sqnr = "int8", 0.87, 45.0

    path = plot_tradeoff([Row()], tmp_path / "sqnr.png", metric="output_sqnr")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_bad_rows(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no row has a finite 'delta_pct'"):
        plot_tradeoff([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"rows\[0\] \('int8'\) has no size"):
        plot_tradeoff([{"label": "int8", "delta_pct": 0.1}], tmp_path / "x.png")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'lowbit\[plot\]'"):
        plot_tradeoff(ROWS, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
