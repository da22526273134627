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


def _drawn_figure(monkeypatch, *args, **kwargs):
    """plot_tradeoff's figure, caught as it is saved (the PNG is still written)."""
    from matplotlib.figure import Figure

    caught = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (caught.append(self), save(self, *a, **k))[1])
    path = plot_tradeoff(*args, **kwargs)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and len(caught) == 1
    return caught[0]


def test_perplexity_change_is_on_a_symmetric_log_axis(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    wide = ROWS + [{"label": "int4 g64", "bytes": 1_500_000, "delta_pct": 55.6, "prefill_x": 0.9}]
    fig = _drawn_figure(monkeypatch, wide, tmp_path / "d.png", budget_pct=1.0, speed_key="prefill_x")
    axes = fig.get_axes()
    assert [ax.get_yscale() for ax in axes] == ["symlog", "symlog"]
    lo, hi = axes[0].get_ylim()
    assert lo < -0.87 and hi > 55.6  # every point inside
    assert lo > -10  # no empty decades below the lowest point (symlog's autoscale adds them)
    assert "log scale" in axes[0].get_ylabel()
    linear = _drawn_figure(monkeypatch, ROWS, tmp_path / "l.png", yscale="linear")
    assert linear.get_axes()[0].get_yscale() == "linear"

    class Row:
        label, weight_mb, output_sqnr = "int8", 0.87, 45.0

    sqnr = _drawn_figure(monkeypatch, [Row()], tmp_path / "s.png", metric="output_sqnr")
    assert sqnr.get_axes()[0].get_yscale() == "linear"  # the default log axis is for delta_pct only
    positive = [dict(r, perplexity=100 + i) for i, r in enumerate(ROWS[:3])]
    log = _drawn_figure(monkeypatch, positive, tmp_path / "p.png", metric="perplexity", yscale="log")
    assert log.get_axes()[0].get_yscale() == "log"


def test_numbers_at_crowded_points_do_not_overlap(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    # twelve configs at nearly one spot, as the int8 rows of the demo sit at one size and ~0%
    crowd = [{"label": f"config {i}", "bytes": 1_263_776, "delta_pct": 0.001 * i} for i in range(12)]
    fig = _drawn_figure(monkeypatch, crowd, tmp_path / "c.png")
    ax = fig.get_axes()[0]
    renderer = fig.canvas.get_renderer()
    numbers = [t for t in ax.texts if t.get_text().isdigit()]
    assert sorted(int(t.get_text()) for t in numbers) == list(range(1, 13))
    boxes = [Text.get_window_extent(t, renderer) for t in numbers]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"{i + 1}  config {i}" for i in range(12)]


def test_bad_scales(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="yscale='loglog'; allowed: linear, log, symlog"):
        plot_tradeoff(ROWS, tmp_path / "x.png", yscale="loglog")
    with pytest.raises(ValueError, match="yscale='log' needs 'delta_pct' > 0; 'float32 .no quantization.' has 0"):
        plot_tradeoff(ROWS, tmp_path / "x.png", yscale="log")
    with pytest.raises(ValueError, match="linthresh=0 must be a positive number"):
        plot_tradeoff(ROWS, tmp_path / "x.png", linthresh=0)
    assert not (tmp_path / "x.png").exists()
