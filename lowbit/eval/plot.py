"""Accuracy-vs-size (and vs speed) trade-off plots of quantization configs, as PNG files.

matplotlib is optional (``pip install 'lowbit[plot]'``). The figure is drawn on its own Agg
canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), never through ``pyplot``, so no
global matplotlib state (backend, current figure, rcParams) is touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

__all__ = ["plot_tradeoff"]

_LABEL_KEYS = ("label", "config", "name")
_MB_KEYS = ("weight_mb",)
_BYTES_KEYS = ("bytes", "weight_bytes", "linear_bytes")
_SPEED_KEYS = ("tokens_per_s", "speedup", "speed")
_METRIC_LABELS = {
    "delta_pct": "perplexity change vs float (%)",
    "perplexity": "perplexity",
    "output_sqnr": "output SQNR vs float (dB)",
}


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401  (the package itself: cached submodules must not hide its absence)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_tradeoff needs matplotlib: pip install 'lowbit[plot]' "
                          "(or pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def _get(row: Any, key: str):
    if isinstance(row, Mapping):
        return row.get(key)
    return getattr(row, key, None)


def _first(row: Any, keys: Iterable[str]):
    for k in keys:
        v = _get(row, k)
        if v is not None:
            return v
    return None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def plot_tradeoff(
    rows: Iterable[Any],
    path: str | Path,
    *,
    metric: str = "delta_pct",
    metric_label: str | None = None,
    speed_key: str | None = None,
    speed_label: str | None = None,
    budget_pct: float | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG: accuracy vs weight size per config, and accuracy vs speed when rows carry speed.

    Each row is a mapping (or an object with attributes) with:

    * a label: ``label``, ``config`` or ``name``;
    * a size: ``weight_mb`` (MB), or ``bytes`` / ``weight_bytes`` / ``linear_bytes`` (shown in MB, 1e6 bytes);
    * the accuracy: ``metric`` (default ``delta_pct``, the perplexity change in percent, as
      ``benchmarks/accuracy.py`` writes its ``results`` and ``AutoQuantResult.as_row()`` gives);
      rows whose metric is missing, None or not finite are left out (e.g. a NaN perplexity);
    * optionally a speed: ``speed_key``, or the first of ``tokens_per_s``, ``speedup``, ``speed``
      that any row has; then a second panel plots accuracy against it.

    Args:
        rows: the rows.
        path: the PNG file to write (its folder must exist).
        metric: the row key plotted on the y axis.
        metric_label / speed_label: axis titles (defaults from the keys).
        budget_pct: draw a dashed line at this y value (e.g. an accuracy budget of 1.0 %).
        title: figure title.

    Returns:
        ``Path(path)``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'lowbit[plot]'``).
        ValueError: no row has a label, a size and a finite metric; a row without a size.

    Example:
        >>> rows = json.load(open("benchmarks/results/accuracy.json"))["models"]["glassllm"]["results"]
        >>> plot_tradeoff(rows, "glassllm.png", budget_pct=1.0)
    """
    Figure, FigureCanvasAgg = _require_matplotlib()
    rows = list(rows)
    points = []
    for i, row in enumerate(rows):
        label = _first(row, _LABEL_KEYS)
        y = _number(_get(row, metric))
        if y is None:
            continue
        mb = _number(_first(row, _MB_KEYS))
        if mb is None:
            nbytes = _number(_first(row, _BYTES_KEYS))
            if nbytes is None:
                raise ValueError(f"rows[{i}] ({label!r}) has no size: give one of {_MB_KEYS + _BYTES_KEYS}")
            mb = nbytes / 1e6
        points.append((str(label if label is not None else f"row {i}"), mb, y, row))
    if not points:
        raise ValueError(f"no row has a finite {metric!r}; rows need a label {_LABEL_KEYS}, a size "
                         f"{_MB_KEYS + _BYTES_KEYS} and the metric")
    if speed_key is None:
        speed_key = next((k for k in _SPEED_KEYS if any(_number(_get(p[3], k)) is not None for p in points)), None)
    panels = [("size", "linear weight size (MB)")]
    if speed_key is not None:
        panels.append(("speed", speed_label or speed_key.replace("_", " ").replace("per s", "/ s")))

    fig = Figure(figsize=(6.4 * len(panels), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ylabel = metric_label or _METRIC_LABELS.get(metric, metric.replace("_", " "))
    for ax, (kind, xlabel) in zip(axes, panels):
        for label, mb, y, row in points:
            x = mb if kind == "size" else _number(_get(row, speed_key))
            if x is None:
                continue
            ax.scatter([x], [y], s=24)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        if metric == "delta_pct":
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        if budget_pct is not None:
            unit = "%" if metric.endswith("pct") else ""
            ax.axhline(budget_pct, color="tab:red", linestyle="--", linewidth=0.8, label=f"budget {budget_pct:g}{unit}")
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, linewidth=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path
