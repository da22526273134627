"""Mixed-precision search: per layer, the smallest config that keeps the measured model within a budget.

The search (``autoquant``) in four steps, all on a deep copy of the model:

1. sensitivity: each layer quantized alone with each candidate (``sensitivity_report``); a
   layer's *damage* under a config is the noise power it adds to the model output,
   ``10 ** (-output_sqnr / 10)`` (noise powers of independent layers add up; with only an
   ``eval_fn``, the relative loss increase, clipped at 0);
2. every layer starts at its smallest applicable option by weight bytes;
3. upgrades (a layer to a larger option that does less damage) are ordered by damage removed
   per byte added, best first, along each layer's lower convex hull in (bytes, damage), so a
   layer's own upgrades keep their order;
4. the shortest prefix of that upgrade list whose assembled model MEASURES within the budget is
   found by bisection (a few full evaluations, not a sum of per-layer numbers); the returned
   choice is the measured one.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lowbit.configs.base import QuantConfig
from lowbit.configs.int8 import Int8WeightOnlyConfig
from lowbit.eval.sensitivity import (
    FilterFn,
    SensitivityReport,
    _check_configs,
    _Probe,
    _quantized_copy,
    _report,
    _selected,
    _swapped,
    _tabulate,
    _weight_bytes,
)

__all__ = ["autoquant", "AutoQuantResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Option:
    config: QuantConfig | None  # None: the layer stays float
    label: str
    bytes: int
    damage: float
    order: int  # position in candidates (float last): the tie-break after bytes and damage


@dataclass(frozen=True)
class _Upgrade:
    fqn: str
    old: _Option
    new: _Option
    score: float  # damage removed per byte added


def _damage(result) -> float:
    if result.output_sqnr is not None:
        return 0.0 if result.output_sqnr == math.inf else 10.0 ** (-result.output_sqnr / 10.0)
    return max(result.delta_pct or 0.0, 0.0) / 100.0


def _hull_path(fqn: str, options: list[_Option]) -> tuple[_Option, list[_Upgrade]]:
    """The smallest option, and the upgrades along the lower convex hull of (bytes, damage).

    From the current option, the next is the larger one removing the most damage per added
    byte; so each step's score is at most the previous one's (a hull has falling slopes).
    """
    options = sorted(options, key=lambda o: (o.bytes, o.damage, o.order))
    current, path = options[0], []
    while True:
        best = None
        for o in options:
            if o.bytes > current.bytes and o.damage < current.damage:
                score = (current.damage - o.damage) / (o.bytes - current.bytes)
                if best is None or score > best.score:
                    best = _Upgrade(fqn, current, o, score)
        if best is None:
            return options[0], path
        path.append(best)
        current = best.new


@dataclass(eq=False, repr=False)
class AutoQuantResult(Mapping):
    """The chosen per-layer configs, usable directly as ``quantize_(model, result)``.

    It is a read-only mapping ``{fqn: config or None}`` (None: the layer stays float) covering
    every selected layer, plus what was measured.

    Attributes:
        mapping: the plain dict.
        metric_name: "perplexity" or "loss" (``eval_fn``).
        float_metric / metric: the float and the chosen model's metric on ``data``.
        budget: the allowed relative increase; ``target = float_metric * (1 + budget)``.
        output_sqnr: the chosen model's output (logits) SQNR vs float on ``data``, dB, when known.
        weight_bytes / float_bytes / int8_bytes: weight bytes of the selected layers, chosen /
            all float / all ``Int8WeightOnlyConfig()``.
        holdout_float_metric / holdout_metric: the same on ``holdout``, when given.
        evaluations: every full-model measurement of the search: ``{"upgrades", "metric", "within_budget"}``.
        upgrades: the ordered upgrade list ``(fqn, from label, to label)``; the first ``n_upgrades`` were applied.
        report: the ``SensitivityReport`` the order came from.
    """

    mapping: dict[str, QuantConfig | None]
    metric_name: str
    float_metric: float
    metric: float
    budget: float
    output_sqnr: float | None
    weight_bytes: int
    float_bytes: int
    int8_bytes: int
    n_upgrades: int
    upgrades: list[tuple[str, str, str]]
    evaluations: list[dict] = field(default_factory=list)
    holdout_float_metric: float | None = None
    holdout_metric: float | None = None
    report: SensitivityReport | None = None

    def __getitem__(self, fqn: str) -> QuantConfig | None:
        return self.mapping[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)

    @property
    def target(self) -> float:
        return self.float_metric * (1.0 + self.budget)

    @property
    def within_budget(self) -> bool:
        return self.metric <= self.target

    @property
    def delta_pct(self) -> float:
        return 100.0 * (self.metric / self.float_metric - 1.0)

    @property
    def holdout_delta_pct(self) -> float | None:
        if self.holdout_metric is None:
            return None
        return 100.0 * (self.holdout_metric / self.holdout_float_metric - 1.0)

    def counts(self) -> dict[str, int]:
        """Layers per chosen config label (``"float"`` for None)."""
        out: dict[str, int] = {}
        for config in self.mapping.values():
            label = "float" if config is None else repr(config)
            out[label] = out.get(label, 0) + 1
        return out

    def as_row(self, label: str = "autoquant") -> dict:
        """A row for ``plot_tradeoff``: label, weight bytes and the metric change in percent."""
        return {"label": label, "bytes": self.weight_bytes, "delta_pct": self.delta_pct}

    def to_dict(self) -> dict:
        return {
            "mapping": {k: None if v is None else repr(v) for k, v in self.mapping.items()},
            "metric": self.metric_name, "float_metric": self.float_metric, "chosen_metric": self.metric,
            "delta_pct": self.delta_pct, "budget": self.budget, "within_budget": self.within_budget,
            "output_sqnr": self.output_sqnr if self.output_sqnr is None or math.isfinite(self.output_sqnr)
            else str(self.output_sqnr),
            "weight_bytes": self.weight_bytes, "float_bytes": self.float_bytes, "int8_bytes": self.int8_bytes,
            "holdout_float_metric": self.holdout_float_metric, "holdout_metric": self.holdout_metric,
            "holdout_delta_pct": self.holdout_delta_pct, "n_upgrades": self.n_upgrades,
            "upgrades": [list(u) for u in self.upgrades], "evaluations": self.evaluations,
        }

    def to_table(self, tablefmt: str = "simple") -> str:
        """The chosen configs (layers and bytes per config) and the measured numbers."""
        tabulate = _tabulate()
        per: dict[str, list[int]] = {}
        rows = {r.fqn: r for r in self.report.rows} if self.report else {}
        for fqn, config in self.mapping.items():
            label = "float" if config is None else repr(config)
            row = rows.get(fqn)
            nbytes = (row.float_bytes if config is None else row.results[label].bytes) if row else 0
            n, b = per.get(label, [0, 0])
            per[label] = [n + 1, b + nbytes]
        body = [[label, n, f"{b:,}"] for label, (n, b) in per.items()]
        lines = [
            f"{self.metric_name}: float {self.float_metric:.4g}, chosen {self.metric:.4g} ({self.delta_pct:+.2f}%; "
            f"budget {100 * self.budget:.2f}%: {'within' if self.within_budget else 'OVER'})",
        ]
        if self.holdout_metric is not None:
            lines.append(f"held-out {self.metric_name}: float {self.holdout_float_metric:.4g}, chosen "
                         f"{self.holdout_metric:.4g} ({self.holdout_delta_pct:+.2f}%)")
        lines.append(f"weight bytes: {self.weight_bytes:,} = {self.weight_bytes / self.float_bytes:.3f}x float, "
                     f"{self.weight_bytes / self.int8_bytes:.3f}x all-int8; {self.n_upgrades} of "
                     f"{len(self.upgrades)} upgrades, {len(self.evaluations)} full evaluations")
        table = tabulate(body, headers=["config", "layers", "weight bytes"], tablefmt=tablefmt,
                         disable_numparse=True, colalign=("left", "right", "right"))
        return "\n".join(lines) + "\n" + table

    def __repr__(self) -> str:
        return (f"AutoQuantResult({len(self.mapping)} layers {self.counts()}, {self.metric_name} "
                f"{self.metric:.4g} vs float {self.float_metric:.4g} ({self.delta_pct:+.2f}%), "
                f"{self.weight_bytes:,} weight bytes)")


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget={budget!r} must be a positive finite number: the allowed relative increase "
                         "of the metric over float (0.01 = 1%)")
    return float(budget)


@torch.no_grad()
def autoquant(
    model: nn.Module,
    candidates: Sequence[QuantConfig],
    data: torch.Tensor | None = None,
    budget: float = 0.01,
    *,
    seq_len: int = 128,
    max_windows: int | None = 16,
    batch_size: int = 8,
    eval_fn: Callable[[nn.Module], float] | None = None,
    inputs: Any = None,
    holdout: torch.Tensor | None = None,
    allow_float: bool = True,
    filter_fn: FilterFn | None = None,
    report: SensitivityReport | None = None,
    progress_bar: bool | None = None,
    prefix: Sequence[int] | torch.Tensor = (),
) -> AutoQuantResult:
    """Choose a config per layer: the smallest weights whose measured model stays within ``budget``.

    ``model`` is not modified: the search runs on a deep copy in eval mode (so it needs memory
    for a second model, the float logits of the windows, and the quantized layers it tried).
    Apply the result with ``quantize_(model, result)`` (it is the ``{fqn: config or None}`` mapping).

    The metric is the perplexity on ``data`` (token ids, first ``max_windows`` windows of
    ``seq_len``), or ``eval_fn(model)`` for other models; the budget holds when
    ``metric <= float_metric * (1 + budget)``. See the module docstring for the search.

    Args:
        model: the float model.
        candidates: the configs to choose from (a list, at least one). Per layer, only those
            its handler accepts are options; float is the last resort when ``allow_float``.
            Options of equal weight bytes are ordered by measured damage, then by their place
            in this list (list a faster config first to prefer it).
        data: 1-D token ids the choice is made on (a causal LM taking ``(B, T)`` ids, returning
            logits or an object with ``.logits``). Optional with ``eval_fn``.
        budget: allowed relative increase of the metric, > 0 (default 0.01: perplexity within 1%).
        seq_len, max_windows, batch_size: the windows of ``data`` (as ``lowbit.eval.perplexity``).
        eval_fn: ``eval_fn(model) -> loss``: a positive number, lower is better (e.g. a mean
            cross-entropy or ``1 - accuracy`` on a fixed batch), run under ``torch.no_grad()``
            on copies of ``model``; for models that are not causal LMs. It replaces the perplexity.
        inputs: with ``eval_fn``: fixed model inputs (tensor, tuple or dict) whose output SQNR
            orders the layers; without them the per-layer loss increase orders them.
        holdout: other token ids (say, a later slice of the text): the float and the chosen
            model's perplexity on all of its windows is reported, not used for choosing.
        allow_float: let a layer stay float when no candidate keeps the model within budget.
        filter_fn: ``fn(module, fqn) -> bool``; default every ``nn.Linear``.
        report: a ``SensitivityReport`` already measured with these candidates and data (skips step 1).
        progress_bar: tqdm bar during the sensitivity pass (None: only on a terminal).
        prefix: token ids put before every window of ``data`` and ``holdout``, never scored: the
            tokenizer's BOS (``lowbit.eval.tokenize_for_perplexity``), as ``lowbit.eval.perplexity``.

    Returns:
        An ``AutoQuantResult``: the mapping, the measured metric, weight bytes vs float and vs
        all-int8. If even the largest options exceed the budget (``allow_float=False``), it
        holds those, ``within_budget`` is False and a warning says so.

    Raises:
        TypeError: ``candidates`` not a list, an entry that is not a lowbit config, non-integer
            ``data``/``holdout``, ``eval_fn`` not callable.
        ValueError: empty ``candidates`` or one listed twice, ``budget <= 0``, ``data``/``holdout``
            shorter than one window (``seq_len + 1`` tokens; ``seq_len`` with a prefix), neither ``data`` nor ``eval_fn``, ``holdout``
            with ``eval_fn``, a float metric <= 0, a ``report`` for other candidates, layers or data.

    Example:
        >>> ids = torch.tensor(tokenizer.encode(text))
        >>> choice = autoquant(model, [Int4WeightOnlyConfig(group_size=32), Int8WeightOnlyConfig()],
        ...                    ids[:20000], budget=0.01, holdout=ids[20000:40000])
        >>> print(choice.to_table())
        >>> quantize_(model, choice)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(candidates, (list, tuple)):
        raise TypeError(f"candidates must be a list of lowbit configs, e.g. [Int4WeightOnlyConfig(group_size=32), "
                        f"Int8WeightOnlyConfig()], got {type(candidates).__name__}")
    candidates = _check_configs("candidates", candidates)
    budget = _check_budget(budget)
    probe = _Probe(data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                   eval_fn=eval_fn, inputs=inputs, prefix=prefix)
    hold = None
    if holdout is not None:
        if eval_fn is not None:
            raise ValueError("holdout (token ids, scored by perplexity) can't be used with eval_fn; "
                             "measure held-out data in your own eval_fn")
        hold = _Probe(holdout, seq_len=seq_len, max_windows=None, batch_size=batch_size, name="holdout",
                      prefix=prefix)

    work = copy.deepcopy(model).eval()
    layers = dict(_selected(work, filter_fn))
    if not layers:
        raise ValueError("filter_fn selected no layer of the model")
    reference = probe.measure(work)
    float_metric = reference.metric
    if not math.isfinite(float_metric) or float_metric <= 0:
        raise ValueError(f"the float model's {probe.metric_name} is {float_metric!r}; a relative budget needs a "
                         "positive finite loss (eval_fn must return one)")
    labels = [repr(c) for c in candidates]
    if report is None:
        report = _report(work, candidates, probe, filter_fn, True, progress_bar, reference)
    else:
        _check_report(report, labels, layers, probe.metric_name, float_metric)

    # Options and the ordered upgrade list.
    start: dict[str, _Option] = {}
    upgrades: list[_Upgrade] = []
    for row in report.rows:
        options = [_Option(c, lab, r.bytes, _damage(r), i)
                   for i, (c, lab) in enumerate(zip(candidates, labels)) if (r := row.results[lab]).applicable]
        if allow_float or not options:
            options.append(_Option(None, "float", row.float_bytes, 0.0, len(candidates)))
        start[row.fqn], path = _hull_path(row.fqn, options)
        upgrades += path
    upgrades.sort(key=lambda u: -u.score)  # stable: a layer's own steps keep their (non-increasing) order

    cache: dict[tuple[str, str], nn.Module] = {}

    def assignment(k: int) -> dict[str, _Option]:
        chosen = dict(start)
        for u in upgrades[:k]:
            chosen[u.fqn] = u.new
        return chosen

    def installed(chosen: dict[str, _Option]) -> dict[str, nn.Module]:
        out = {}
        for fqn, opt in chosen.items():
            if opt.config is not None:
                if (fqn, opt.label) not in cache:
                    cache[(fqn, opt.label)] = _quantized_copy(layers[fqn], opt.config, fqn)
                out[fqn] = cache[(fqn, opt.label)]
        return out

    target = float_metric * (1.0 + budget)
    measured: dict[int, Any] = {}
    evaluations: list[dict] = []

    def within(k: int) -> bool:
        with _swapped(work, installed(assignment(k))):
            m = probe.measure(work, reference)
        measured[k] = m
        evaluations.append({"upgrades": k, "metric": m.metric, "within_budget": m.metric <= target})
        logger.info("autoquant: %d/%d upgrades -> %s %.6g (target %.6g)", k, len(upgrades),
                    probe.metric_name, m.metric, target)
        return m.metric <= target

    n = len(upgrades)
    if within(0):
        k = 0
    elif n == 0 or not within(n):
        k = n
        if n:
            evaluations[-1]["note"] = "largest options, over budget"
        warnings.warn(f"autoquant: no choice among the candidates keeps the {probe.metric_name} within "
                      f"budget={budget} (best measured {measured[k].metric:.6g} > target {target:.6g}); "
                      "returning the largest options"
                      + ("" if allow_float else "; allow_float=True lets layers stay float"),
                      stacklevel=2)
    else:
        lo, hi = 0, n  # lo measured over budget, hi measured within
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if within(mid):
                hi = mid
            else:
                lo = mid
        k = hi

    chosen = assignment(k)
    order = [fqn for fqn in layers]  # module order, as quantize_ walks them
    mapping = {fqn: chosen[fqn].config for fqn in order}
    hold_float = hold_metric = None
    if hold is not None:
        hold_float = hold.measure(work, keep=False).metric
        with _swapped(work, installed(chosen)):
            hold_metric = hold.measure(work, keep=False).metric
    int8 = Int8WeightOnlyConfig()
    int8_bytes = 0
    for fqn, module in layers.items():
        try:
            int8_bytes += _weight_bytes(_quantized_copy(module, int8, fqn))
        except ValueError:
            int8_bytes += _weight_bytes(module)
    return AutoQuantResult(
        mapping=mapping, metric_name=probe.metric_name, float_metric=float_metric, metric=measured[k].metric,
        budget=budget, output_sqnr=measured[k].output_sqnr,
        weight_bytes=sum(chosen[f].bytes for f in order), float_bytes=sum(_weight_bytes(m) for m in layers.values()),
        int8_bytes=int8_bytes, n_upgrades=k, upgrades=[(u.fqn, u.old.label, u.new.label) for u in upgrades],
        evaluations=evaluations, holdout_float_metric=hold_float, holdout_metric=hold_metric, report=report,
    )


def _check_report(report, labels, layers, metric_name, float_metric) -> None:
    if not isinstance(report, SensitivityReport):
        raise TypeError(f"report must be a SensitivityReport (from sensitivity_report), got {type(report).__name__}")
    if report.labels != labels:
        raise ValueError(f"report was measured for configs {report.labels}, not the candidates {labels}")
    if sorted(r.fqn for r in report.rows) != sorted(layers):
        raise ValueError("report covers other layers than filter_fn selects in this model")
    if report.metric_name != metric_name or not math.isclose(report.float_metric, float_metric, rel_tol=1e-9):
        raise ValueError(f"report was measured on other data: float {report.metric_name} {report.float_metric!r} "
                         f"there, {metric_name} {float_metric!r} here")
