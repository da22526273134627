"""Per-layer sensitivity: each layer's output SQNR in a quantized model, and each layer quantized alone.

``layer_sqnr`` compares every linear of a quantized model with the float model's on the same
inputs (errors of earlier layers included, as the model runs). ``sensitivity_report`` quantizes
one layer at a time (a quantized copy of that layer is _swapped in, then the float layer is put
back) and records what it does to the whole model: the output SQNR (logits vs float), the
perplexity (or a custom loss) change, and the layer's own output SQNR on the inputs it sees.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lowbit.configs.base import QuantConfig, get_handler
from lowbit.eval.perplexity import _check_logits, _nll, perplexity_windows
from lowbit.tensors.base import QuantizedTensor

__all__ = ["layer_sqnr", "sensitivity_report", "SensitivityReport", "SensitivityRow", "LayerResult"]

FilterFn = Callable[[nn.Module, str], bool]


# --- small helpers --------------------------------------------------------------------------


class _Energy:
    """Running ``||ref||^2`` and ``||ref - actual||^2``, for an SQNR over many calls.

    Differences are taken in float32 (float64 if either side is), sums accumulate in float64:
    the same dB as ``lowbit.eval.sqnr`` to ~1e-6 dB, without a float64 copy of every output.
    """

    def __init__(self):
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: torch.Tensor, actual: torch.Tensor) -> None:
        dtype = torch.float64 if torch.float64 in (ref.dtype, actual.dtype) else torch.float32
        ref, actual = ref.detach().to(dtype), actual.detach().to(dtype)
        diff = ref - actual
        self.signal += torch.sum(ref * ref, dtype=torch.float64).item()
        self.noise += torch.sum(diff * diff, dtype=torch.float64).item()

    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model returned: itself, ``.logits`` (transformers), or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, an object with .logits, "
                    "or a tuple whose first element is a tensor")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _selected(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    filter_fn = filter_fn or _is_linear
    return [(n, m) for n, m in model.named_modules() if filter_fn(m, n)]


def _weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module.weight``: every inner tensor of a quantized weight, or numel x element size."""
    w = module.weight
    if isinstance(w, QuantizedTensor):
        names, _ = w.__tensor_flatten__()
        return sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
    return w.numel() * w.element_size()


def _quantized_copy(module: nn.Module, config: QuantConfig, fqn: str) -> nn.Module:
    """A deep copy of ``module`` with ``config`` applied by its registered handler (the original is untouched)."""
    layer = copy.deepcopy(module)
    get_handler(config)(layer, config, fqn)
    return layer


def _weight_users(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The other modules of ``model`` holding ``module``'s weight tensor (tied weights)."""
    w = module._parameters.get("weight")
    return [] if w is None else [m for m in model.modules() if m is not module and m._parameters.get("weight") is w]


@contextlib.contextmanager
def _swapped(model: nn.Module, layers: dict[str, nn.Module]):
    """Install ``{fqn: module}`` in ``model`` for the duration of the block, then put the originals back."""
    originals = []
    try:
        for fqn, layer in layers.items():
            if not fqn:
                raise ValueError("the model itself is a selected layer; wrap it (nn.Sequential(model)) to quantize it")
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            originals.append((parent, child, original))
            setattr(parent, child, layer)
            # a module sharing the replaced weight (an embedding tied to the head) reads the quantized one, as
            # quantize_ leaves it when a mapping names the head
            for user in _weight_users(model, original):
                originals.append((user, "weight", user.weight))
                user.weight = layer.weight
        yield model
    finally:
        for parent, child, original in reversed(originals):
            setattr(parent, child, original)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool | None):
    """``iterable`` behind a tqdm bar (on stderr) when tqdm is installed; ``enabled=None``: only on a terminal."""
    if enabled is False:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if enabled is None else not enabled)


# --- layer_sqnr -------------------------------------------------------------------------------


@torch.no_grad()
def layer_sqnr(float_model: nn.Module, quantized_model: nn.Module, inputs: Any,
               filter_fn: FilterFn | None = None) -> dict[str, float]:
    """Output SQNR (dB) of every selected layer of ``quantized_model`` against ``float_model``.

    Both models run on the same ``inputs``; forward hooks record each layer's output, matched by
    module name. Each layer sees the inputs its own model gives it, so the numbers include the
    error of the layers before it. A layer called several times is scored over all its calls.

    Args:
        float_model: the reference model.
        quantized_model: the same architecture with some layers quantized (``quantize_`` on a copy).
        inputs: a tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a dict (``model(**inputs)``).
        filter_fn: ``fn(module, fqn) -> bool`` on ``float_model``; default every ``nn.Linear``.

    Returns:
        ``{fqn: dB}`` in module order (``inf`` where the outputs are equal).

    Raises:
        ValueError: a selected layer name is missing from ``quantized_model``, or a layer ran a
            different number of times in the two models.

    Example:
        >>> q = quantize_(copy.deepcopy(model), Int8WeightOnlyConfig())
        >>> layer_sqnr(model, q, ids)["blocks.0.attn.q_proj"]
    """
    names = [n for n, _ in _selected(float_model, filter_fn)]
    q_modules = dict(quantized_model.named_modules())
    missing = [n for n in names if n not in q_modules]
    if missing:
        raise ValueError(f"quantized_model has no modules named {missing}; pass the same architecture")
    f_modules = dict(float_model.named_modules())
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    energy = {n: _Energy() for n in names}
    calls = dict.fromkeys(names, 0)

    def record(fqn):
        return lambda module, args, out: recorded[fqn].append(_output_tensor(out).detach().clone())

    def compare(fqn):
        def hook(module, args, out):
            if calls[fqn] >= len(recorded[fqn]):
                raise ValueError(f"layer {fqn!r} ran more often in quantized_model than in float_model")
            energy[fqn].add(recorded[fqn][calls[fqn]], _output_tensor(out))
            recorded[fqn][calls[fqn]] = None  # free it as soon as it is used
            calls[fqn] += 1

        return hook

    handles = [f_modules[n].register_forward_hook(record(n)) for n in names]
    try:
        _call(float_model, inputs)
    finally:
        for h in handles:
            h.remove()
    handles = [q_modules[n].register_forward_hook(compare(n)) for n in names]
    try:
        _call(quantized_model, inputs)
    finally:
        for h in handles:
            h.remove()
    short = [n for n in names if calls[n] != len(recorded[n])]
    if short:
        raise ValueError(f"layers {short} ran fewer times in quantized_model than in float_model")
    return {n: energy[n].db() for n in names}


# --- how a model is measured ------------------------------------------------------------------


@dataclass
class _Measurement:
    """One evaluation of a model: its metric, its output SQNR vs the float reference, or (for the
    reference itself) its outputs."""

    metric: float
    output_sqnr: float | None = None
    outputs: list[torch.Tensor] | None = None  # the reference's outputs, kept for later comparisons


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int" + (" or None" if allow_none else ""))


class _Probe:
    """How every model in a report or a search is measured, always on the same inputs.

    Language-model mode (``data`` = 1-D token ids): the first ``max_windows`` windows of
    ``lowbit.eval.perplexity_windows`` (same windows and ``prefix``, same batches, same float64
    arithmetic, so the float perplexity equals ``perplexity(...)``'s); the metric is the
    perplexity unless ``eval_fn`` is given; the output SQNR is over the logits.
    Custom mode (``eval_fn(model) -> loss``): the metric is what ``eval_fn`` returns (lower is
    better); the output SQNR comes from ``inputs`` (or the windows of ``data``) when given.
    """

    def __init__(self, data=None, *, seq_len: int = 128, max_windows: int | None = 16, batch_size: int = 8,
                 eval_fn: Callable[[nn.Module], float] | None = None, inputs: Any = None, name: str = "data",
                 prefix: Sequence[int] | torch.Tensor = ()):
        _check_positive_int("seq_len", seq_len)
        _check_positive_int("max_windows", max_windows, allow_none=True)
        _check_positive_int("batch_size", batch_size)
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable as eval_fn(model) -> loss, got {type(eval_fn).__name__}")
        if data is None and eval_fn is None:
            raise ValueError(f"{name}=None needs eval_fn: pass token ids as {name}, or eval_fn(model) -> loss")
        if data is not None and inputs is not None:
            raise ValueError(f"pass either {name} (token ids) or inputs (model inputs for the output SQNR), not both")
        self.eval_fn, self.inputs, self.batch_size = eval_fn, inputs, batch_size
        self.windows = self.targets = None
        self.prefix = tuple(int(i) for i in prefix)
        if data is not None:
            self.windows, self.targets = perplexity_windows(data, seq_len, max_windows, prefix=prefix, name=name)
        self.metric_name = "perplexity" if eval_fn is None else "loss"
        self.tokens = None if self.targets is None else self.targets.numel()

    def _batches(self, model: nn.Module):
        param = next(model.parameters(), None)
        device = param.device if param is not None else self.windows.device
        for start in range(0, self.windows.shape[0], self.batch_size):
            x = self.windows[start : start + self.batch_size].to(device)
            yield _output_tensor(model(x)), x, self.targets[start : start + self.batch_size].to(device)

    @torch.no_grad()
    def measure(self, model: nn.Module, reference: _Measurement | None = None, keep: bool = True) -> _Measurement:
        """Measure ``model``; with ``reference`` (the float model's measurement), also its output SQNR.

        Without ``reference``, the outputs are kept (for later comparisons) unless ``keep=False``.
        """
        energy, kept, nll = _Energy(), [], 0.0
        if self.windows is not None:
            for i, (logits, x, y) in enumerate(self._batches(model)):
                _check_logits(logits, x)
                if self.eval_fn is None:
                    nll += _nll(logits, x, y)
                if reference is None:
                    if keep:
                        kept.append(logits.detach().float().cpu())
                else:
                    energy.add(reference.outputs[i], logits.float().cpu())
        elif self.inputs is not None and (keep or reference is not None):
            out = _output_tensor(_call(model, self.inputs)).detach().float().cpu()
            if reference is None:
                kept.append(out)
            else:
                energy.add(reference.outputs[0], out)
        if self.eval_fn is None:
            metric = math.exp(nll / self.tokens)
        else:
            metric = self.eval_fn(model)
            if isinstance(metric, torch.Tensor) and metric.numel() == 1:
                metric = metric.item()
            if not isinstance(metric, (int, float)) or isinstance(metric, bool):
                raise TypeError(f"eval_fn must return a number (a loss, lower is better), got {type(metric).__name__}")
            metric = float(metric)
        if reference is None:
            return _Measurement(metric, None, kept or None)
        return _Measurement(metric, energy.db() if reference.outputs is not None else None)


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerResult:
    """One layer quantized alone with one config.

    Attributes:
        bytes: the layer's quantized weight bytes (None when n/a).
        output_sqnr: model output (logits) SQNR vs the float model, dB (None without outputs).
        layer_sqnr: the layer's own output vs its float output on the same inputs, dB.
        metric: the model's perplexity (or ``eval_fn`` loss) with this layer quantized.
        delta_pct: ``100 * (metric / float_metric - 1)``.
        error: why the config can't apply to this layer (its handler's ValueError), else None.
    """

    bytes: int | None = None
    output_sqnr: float | None = None
    layer_sqnr: float | None = None
    metric: float | None = None
    delta_pct: float | None = None
    error: str | None = None

    @property
    def applicable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class SensitivityRow:
    """One layer: its name, weight shape, float weight bytes, and a ``LayerResult`` per config label."""

    fqn: str
    shape: tuple[int, ...]
    float_bytes: int
    results: dict[str, LayerResult]

    def score(self) -> tuple:
        """Sort key, most sensitive first: lowest output SQNR over the configs (highest metric
        change when there is no SQNR); layers no config applies to go last."""
        done = [r for r in self.results.values() if r.applicable]
        if not done:
            return (2, 0.0)
        sqnrs = [r.output_sqnr for r in done if r.output_sqnr is not None]
        if sqnrs:
            return (0, min(sqnrs))
        return (1, -max(r.delta_pct or 0.0 for r in done))


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" (exact), "-inf", "nan": strict JSON has no such numbers
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _tabulate():
    try:
        from tabulate import tabulate
    except ImportError as e:
        raise ImportError("to_table needs tabulate: pip install tabulate (or pip install 'lowbit[dev]')") from e
    return tabulate


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


@dataclass
class SensitivityReport:
    """What quantizing each layer alone does to the model; rows sorted most sensitive first.

    Attributes:
        labels: one label per config (its repr), the keys of every row's ``results``.
        configs: the configs, in the order given.
        rows: ``SensitivityRow`` per selected layer.
        metric_name: "perplexity" or "loss" (``eval_fn``).
        float_metric: the float model's metric on the same data.
        settings: how it was measured (windows, seq_len, tokens).
    """

    labels: list[str]
    configs: list[QuantConfig]
    rows: list[SensitivityRow]
    metric_name: str
    float_metric: float
    settings: dict = field(default_factory=dict)

    def row(self, fqn: str) -> SensitivityRow:
        for r in self.rows:
            if r.fqn == fqn:
                return r
        raise KeyError(f"no layer {fqn!r} in the report")

    def to_dict(self) -> dict:
        return _jsonable({
            "metric": self.metric_name, "float_metric": self.float_metric, "configs": self.labels,
            "settings": self.settings,
            "rows": [{"fqn": r.fqn, "shape": list(r.shape), "float_bytes": r.float_bytes,
                      "results": {k: vars(v) for k, v in r.results.items()}} for r in self.rows],
        })

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON (non-finite SQNR, e.g. an exact layer, is written as ``"inf"``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path``; returns the path."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    def to_table(self, tablefmt: str = "simple") -> str:
        """A tabulate table: one row per layer, one column group per config (keys A, B, ... in a legend)."""
        tabulate = _tabulate()
        keys = [chr(ord("A") + i) if i < 26 else f"C{i}" for i in range(len(self.labels))]
        delta = "ppl %" if self.metric_name == "perplexity" else "loss %"
        headers = ["layer", "weight"]
        for k in keys:
            headers += [f"{k} out dB", f"{k} {delta}", f"{k} layer dB"]
        body = []
        for r in self.rows:
            line = [r.fqn, "x".join(map(str, r.shape))]
            for label in self.labels:
                res = r.results[label]
                if not res.applicable:
                    line += ["n/a", "n/a", "n/a"]
                else:
                    line += [_fmt(res.output_sqnr, ".1f"), _fmt(res.delta_pct, "+.2f"), _fmt(res.layer_sqnr, ".1f")]
            body.append(line)
        head = [f"float {self.metric_name}: {self.float_metric:.4g}; "
                + ", ".join(f"{k}={v}" for k, v in self.settings.items() if v is not None)]
        head += [f"{k} = {label}" for k, label in zip(keys, self.labels)]
        head.append("out dB: model output (logits) SQNR vs float; layer dB: the layer's own output SQNR; "
                    "most sensitive first")
        table = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True,
                         colalign=("left", "right") + ("right",) * (3 * len(keys)))
        return "\n".join(head) + "\n" + table + self._na_notes(keys)

    def _na_notes(self, keys: list[str]) -> str:
        groups: dict[tuple[str, str], list[str]] = {}
        for r in self.rows:
            for k, label in zip(keys, self.labels):
                err = r.results[label].error
                if err is not None:
                    groups.setdefault((k, err.replace(repr(r.fqn), "<layer>")), []).append(r.fqn)
        lines = []
        for (k, reason), fqns in groups.items():
            shown = ", ".join(fqns[:3]) + (f" and {len(fqns) - 3} more" if len(fqns) > 3 else "")
            lines.append(f"n/a {k} ({len(fqns)} layers: {shown}): {reason}")
        return ("\n" + "\n".join(lines)) if lines else ""


def _check_configs(name: str, configs) -> list[QuantConfig]:
    """``configs`` as a non-empty list of distinct registered configs, or a clear error naming ``name``."""
    if isinstance(configs, QuantConfig):
        configs = [configs]
    if not isinstance(configs, (list, tuple)):
        raise TypeError(f"{name} must be a list of lowbit configs, e.g. [Int4WeightOnlyConfig(), "
                        f"Int8WeightOnlyConfig()], got {type(configs).__name__}")
    if not configs:
        raise ValueError(f"{name} is empty; give at least one lowbit config, e.g. [Int8WeightOnlyConfig()]")
    for i, c in enumerate(configs):
        if not isinstance(c, QuantConfig):
            raise TypeError(f"{name}[{i}]={c!r} is not a lowbit config; allowed: instances of QuantConfig "
                            "subclasses (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32), ...)")
        get_handler(c)  # TypeError naming the known configs
    labels = [repr(c) for c in configs]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"{name} lists {dup} more than once; give each config once")
    return list(configs)


@torch.no_grad()
def sensitivity_report(
    model: nn.Module,
    configs: QuantConfig | Sequence[QuantConfig],
    data: torch.Tensor | None = None,
    *,
    seq_len: int = 128,
    max_windows: int | None = 16,
    batch_size: int = 8,
    eval_fn: Callable[[nn.Module], float] | None = None,
    inputs: Any = None,
    filter_fn: FilterFn | None = None,
    sort: bool = True,
    progress_bar: bool | None = None,
    prefix: Sequence[int] | torch.Tensor = (),
) -> SensitivityReport:
    """Quantize each selected layer alone with each config and measure the whole model.

    For every (layer, config) a quantized deep copy of that one layer is _swapped into ``model``,
    the model is measured, and the float layer is put back (``model`` is unchanged afterwards,
    also on error; it runs in its current train/eval mode, so call ``.eval()`` first). Cost: one
    evaluation per (layer, config) plus one for the float model; memory: the float model's
    outputs on the windows are kept (``windows x seq_len x vocab`` float32: keep ``max_windows``
    small for a large vocabulary, e.g. 4 x 256 tokens of SmolLM2 is 200 MB).

    Args:
        model: the float model.
        configs: one config or a list of them (one column group each).
        data: 1-D token ids for a causal LM (``model(ids: (B, T)) -> logits`` or an object with
            ``.logits``): the first ``max_windows`` windows of ``seq_len`` tokens give the
            perplexity and the logits SQNR. Optional with ``eval_fn``.
        seq_len: scored tokens per window.
        max_windows: windows used (None: all the data holds).
        batch_size: windows per forward.
        eval_fn: ``eval_fn(model) -> loss`` (a number, lower is better) replacing the perplexity;
            for models that are not language models. It runs under ``torch.no_grad()``.
        inputs: with ``eval_fn`` and no ``data``: model inputs (tensor, tuple or dict) whose
            output SQNR is reported; without them the output SQNR column is empty.
        filter_fn: ``fn(module, fqn) -> bool``; default every ``nn.Linear`` (as ``quantize_``).
        sort: sort rows most sensitive first (``SensitivityRow.score``); False keeps module order.
        progress_bar: tqdm bar on stderr (None: only on a terminal; needs tqdm).
        prefix: token ids put before every window of ``data``, never scored: the tokenizer's BOS
            (``lowbit.eval.tokenize_for_perplexity``), as ``lowbit.eval.perplexity`` takes it.

    Returns:
        A ``SensitivityReport``. A config whose handler raises ``ValueError`` for a layer (e.g.
        a group size that does not divide in_features) gets an n/a result with the reason.

    Raises:
        TypeError: a non-config in ``configs``, non-integer ``data``, a non-callable ``eval_fn``.
        ValueError: empty ``configs``, ``data`` shorter than one window (``seq_len + 1``
            tokens; ``seq_len`` with a prefix), neither ``data`` nor ``eval_fn``, no layer selected.

    Example:
        >>> rep = sensitivity_report(model, [Int4WeightOnlyConfig(group_size=32), Int8WeightOnlyConfig()], ids)
        >>> print(rep.to_table()); rep.save("sensitivity.json")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    configs = _check_configs("configs", configs)
    probe = _Probe(data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                  eval_fn=eval_fn, inputs=inputs, prefix=prefix)
    return _report(model, configs, probe, filter_fn, sort, progress_bar)


def _report(model, configs, probe: _Probe, filter_fn, sort, progress_bar, reference=None) -> SensitivityReport:
    layers = _selected(model, filter_fn)
    if not layers:
        raise ValueError("filter_fn selected no layer of the model")
    reference = reference or probe.measure(model)
    labels = [repr(c) for c in configs]
    results: dict[str, dict[str, LayerResult]] = {fqn: {} for fqn, _ in layers}
    todo = [(fqn, module, c, lab) for fqn, module in layers for c, lab in zip(configs, labels)]
    for fqn, module, config, label in _progress(todo, len(todo), "sensitivity", progress_bar):
        try:
            layer = _quantized_copy(module, config, fqn)
        except ValueError as e:
            results[fqn][label] = LayerResult(error=str(e))
            continue
        energy = _Energy()

        def hook(mod, args, kwargs, out, module=module, energy=energy):
            energy.add(_output_tensor(module(*args, **kwargs)), _output_tensor(out))

        handle = layer.register_forward_hook(hook, with_kwargs=True)
        try:
            with _swapped(model, {fqn: layer}):
                m = probe.measure(model, reference)
        finally:
            handle.remove()
        results[fqn][label] = LayerResult(
            bytes=_weight_bytes(layer), output_sqnr=m.output_sqnr, layer_sqnr=energy.db(), metric=m.metric,
            delta_pct=100.0 * (m.metric / reference.metric - 1.0) if reference.metric else None,
        )
    rows = [SensitivityRow(fqn, tuple(module.weight.shape), _weight_bytes(module), results[fqn])
            for fqn, module in layers]
    if sort:
        rows.sort(key=SensitivityRow.score)
    settings = {"windows": None if probe.targets is None else probe.targets.shape[0],
                "seq_len": None if probe.targets is None else probe.targets.shape[1],
                "prefix": list(probe.prefix) or None}
    return SensitivityReport(labels, configs, rows, probe.metric_name, reference.metric, settings)
