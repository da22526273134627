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
_YSCALES = ("linear", "log", "symlog")
_DPI = 120
# each point's style: colors and markers cycle together, so the first 40 points all differ
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# where a point's number may go, in points from the point: close first, then farther out (with a leader line)
_OFFSETS = tuple((r * dx, r * dy) for r in (1, 2, 3.5) for dx, dy in
                 ((4, 2), (4, -9), (-10, 2), (-10, -9), (-3, 7), (-3, -14), (8, -3), (-15, -3)))
_METRIC_LABELS = {
    "delta_pct": "perplexity change vs float, %",
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
    yscale: str | None = None,
    linthresh: float = 0.1,
) -> Path:
    """Write a PNG: accuracy vs weight size per config, and accuracy vs speed when rows carry speed.

    Every point has its own color and marker and a number next to it (placed where it overlaps no
    other number or point); the legend to the right lists ``number  label`` with the same marker,
    so labels never overlap however close the points are.

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
        yscale: "linear", "log" (every plotted value must be > 0) or "symlog" (logarithmic beyond
            ``+-linthresh``, linear inside: changes of either sign, from 0.01% to 100s of %, in one
            plot). None: "symlog" for ``delta_pct``, else "linear".
        linthresh: the linear range of "symlog" (in the metric's unit; 0.1: 0.1% for ``delta_pct``).

    Returns:
        ``Path(path)``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'lowbit[plot]'``).
        ValueError: no row has a label, a size and a finite metric; a row without a size; an unknown
            ``yscale``, a non-positive ``linthresh``, or "log" with a value <= 0.

    Example:
        >>> rows = json.load(open("benchmarks/results/accuracy.json"))["models"]["glassllm"]["results"]
        >>> plot_tradeoff(rows, "glassllm.png", budget_pct=1.0)
    """
    if yscale is None:
        yscale = "symlog" if metric == "delta_pct" else "linear"
    if yscale not in _YSCALES:
        raise ValueError(f"yscale={yscale!r}; allowed: {', '.join(_YSCALES)} or None")
    if not (_number(linthresh) is not None and linthresh > 0):
        raise ValueError(f"linthresh={linthresh!r} must be a positive number")
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
    if yscale == "log" and min(p[2] for p in points) <= 0:
        bad = next(p for p in points if p[2] <= 0)
        raise ValueError(f"yscale='log' needs {metric!r} > 0; {bad[0]!r} has {bad[2]:g}: use yscale='symlog'")
    if speed_key is None:
        speed_key = next((k for k in _SPEED_KEYS if any(_number(_get(p[3], k)) is not None for p in points)), None)
    panels = [("size", "linear weight size (MB)")]
    if speed_key is not None:
        panels.append(("speed", speed_label or speed_key.replace("_", " ").replace("per s", "/ s")))

    from matplotlib.lines import Line2D

    legend_w = 2.6 if len(points) <= 26 else 4.6  # in inches: one or two columns of "number  label"
    fig = Figure(figsize=(6.4 * len(panels) + legend_w, 5.2), dpi=_DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ylabel = metric_label or _METRIC_LABELS.get(metric, metric.replace("_", " "))
    if yscale != "linear":
        ylabel += f", {'symmetric ' if yscale == 'symlog' else ''}log scale"
    styles = [(_COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)]) for i in range(len(points))]
    placed_points = []  # per panel: (axes, [(number, x, y)])
    for ax, (kind, xlabel) in zip(axes, panels):
        shown = []
        for n, ((label, mb, y, row), (color, marker)) in enumerate(zip(points, styles), 1):
            x = mb if kind == "size" else _number(_get(row, speed_key))
            if x is None:
                continue
            ax.scatter([x], [y], s=30, color=color, marker=marker, zorder=3)
            shown.append((n, x, y))
        placed_points.append((ax, shown))
        if metric == "delta_pct":
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        if budget_pct is not None:
            ax.axhline(budget_pct, color="tab:red", linestyle="--", linewidth=0.8)
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=linthresh)
        elif yscale == "log":
            ax.set_yscale("log")
        ys = [y for _, _, y in shown] + ([0.0] if metric == "delta_pct" else []) + \
            ([budget_pct] if budget_pct is not None and (yscale != "log" or budget_pct > 0) else [])
        if yscale == "symlog":  # a sign's side reaches at least +-linthresh: its first decade tick shows
            ys += [-linthresh] * any(y < 0 for y in ys) + [linthresh] * any(y > 0 for y in ys)
        _fit_ylim(ax, ys)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", linewidth=0.3)
    handles = [Line2D([], [], color=c, marker=m, linestyle="", markersize=6) for c, m in styles]
    labels = [f"{n}  {p[0]}" for n, p in enumerate(points, 1)]
    if budget_pct is not None:
        unit = "%" if metric.endswith("pct") else ""
        handles.append(Line2D([], [], color="tab:red", linestyle="--", linewidth=0.8))
        labels.append(f"budget {budget_pct:g}{unit}")
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, ncols=1 if len(points) <= 26 else 2,
               handletextpad=0.3, borderaxespad=0.2, frameon=False)
    if title:
        fig.suptitle(title)
    # fix the layout, then put each number where it overlaps no other number and no point
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    for ax, shown in placed_points:
        _place_numbers(ax, shown, renderer)
    path = Path(path)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _fit_ylim(ax, ys: list[float]) -> None:
    """y limits around ``ys`` with 6% of their span (in the axis' own scale) on each side: the
    autoscale of a symlog axis rounds out to whole decades, adding empty negative decades."""
    if not ys:
        return
    forward = ax.yaxis.get_transform()
    lo, hi = forward.transform([[min(ys)], [max(ys)]])[:, 0]
    margin = 0.06 * (hi - lo) if hi > lo else 0.5
    ax.set_ylim(*forward.inverted().transform([[lo - margin], [hi + margin]])[:, 0])


def _place_numbers(ax, shown: list[tuple[int, float, float]], renderer) -> None:
    """Annotate each ``(number, x, y)`` at the first offset of ``_OFFSETS`` whose text box overlaps no
    number placed before and no point's marker (the fewest overlaps when none is free); a number
    placed away from its point gets a thin leader line."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    pad = 4.0  # half a marker, in pixels
    taken = []
    for _, x, y in shown:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox([[px - pad, py - pad], [px + pad, py + pad]]))
    for n, x, y in shown:
        best = None
        for k, offset in enumerate(_OFFSETS):
            text = ax.annotate(str(n), (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                               annotation_clip=False,
                               arrowprops=None if k < 8 else {"arrowstyle": "-", "color": "0.5", "linewidth": 0.5,
                                                              "shrinkA": 0, "shrinkB": 3})
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the number's box alone, without its leader line
            clashes = sum(box.overlaps(t) for t in taken)
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, text, box)
            else:
                text.remove()
            if clashes == 0:
                break
        taken.append(best[2])
