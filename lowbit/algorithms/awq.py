"""``awq(model, config, calibration)``: activation-aware weight quantization (Lin et al. 2023), one
decoder block at a time, into the very tensors ``quantize_`` makes for the config.

Per block, on a float32 copy of it run once on the block's calibration inputs (every input,
output and error below is float32, whatever the model's dtype):

1. Each *scaling group* of ``lowbit.static.fold``'s table with a linear to quantize (input norm ->
   q/k/v, post-attention norm -> gate/up, ``v_proj`` -> ``o_proj``, ``up_proj`` -> ``down_proj``)
   gets a per-input-channel ``s = mean|x|^alpha`` over the calibration tokens, divided by
   ``sqrt(max(s) * min(s))``. ``alpha`` is the best of ``i / n_grid`` (``i < n_grid``): the one whose
   weights ``Q(W * s) / s`` (``Q``: the config's weight spec, fake-quantized by the primitives) give
   the highest output SQNR of the module reading the linears (the attention for q/k/v, the MLP for
   gate/up, the linear itself for ``o_proj`` and ``down_proj``) against the float module on the same
   inputs (the first calibration batches holding ``_SEARCH_TOKENS`` = 4096 tokens: a CPU's budget).
   ``alpha = 0`` is ``s = 1``, round-to-nearest: the chosen ``s`` never measures worse on the
   searched tokens. With GQA, ``o_proj``'s statistic is tied across the query heads of a
   key/value head (their max) so that ``1 / s`` folds into ``v_proj``'s rows exactly.
2. ``1 / s`` is folded into the group's norm or producer linear (:func:`lowbit.static.fold.fold_scales`)
   and ``W * s`` becomes the linear's float weight: the float model computes what it did before.
3. ``clip=True``: per quantization block (a row's group), the range ``[min, max]`` is shrunk by the
   best of ``_CLIP_SHRINK`` for that block's share of the linear's output error, ``d^T G d`` (``d``:
   the block's weight error, ``G``: the Gram matrix of its input columns, the scaled input ``x / s``
   over all calibration tokens). The shrunk range's qparams come from the spec's own
   ``choose_qparams_affine_from_min_max``, so the result is the config's tensor with other
   qparams; a shrink of 1 is round-to-nearest bit for bit.
4. The codes and qparams are written as the config's tensor (:func:`write_weight`).

The search sees the weight error only: configs that also quantize activations (8da4w, dynamic
W8A8) get their activation quantization at run time as usual, unmodelled here. Static activation
configs are refused: their ``act_scale`` was calibrated for the unscaled input.

The next block's inputs are the outputs of the *quantized* block (as GPTQ; AutoAWQ takes the
float block's), so each block's search sees the error of the blocks before it. Measured once on
SmolLM2-135M-Instruct int4 g128 (8 x 256 calibration tokens from the second half of
``pydoc_data.topics``, 16 x 256 evaluated from its start, ``benchmarks/algorithms.py``): perplexity
21.205 from quantized inputs, 21.207 from float inputs (RTN 25.631, float32 18.979): no measurable
difference, so the choice follows GPTQ.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowbit.algorithms._weights import integer_weight_spec, write_weight
from lowbit.algorithms.blocks import BlockInputs, capture_block_inputs, find_blocks, hidden_state, make_batches, run_block
from lowbit.configs.base import QuantConfig
from lowbit.primitives.affine import choose_qparams_affine_from_min_max, fake_quantize_affine, quantize_affine
from lowbit.quantize.plan import ConfigMapping, Step, plan_quantization
from lowbit.spec import QuantSpec
from lowbit.static.fold import FoldGroup, find_fold_groups, fold_scales

__all__ = ["awq", "AWQReport", "AWQGroup"]

_log = logging.getLogger("lowbit")

# clip search: each block's [min, max] times 1.0, 0.95, ..., 0.55 (AutoAWQ's grid: 20 steps, at most half)
_CLIP_SHRINK = tuple(1.0 - i / 20 for i in range(10))
# floor of mean|x|^alpha: a channel no token uses gets a finite s
_STAT_FLOOR = 1e-4
# the alpha search measures its modules on the first calibration batches holding at least this many
# tokens (all of them when fewer): 20 forwards of the attention and MLP per block over every token
# would dominate the run on a CPU; mean|x| and the clip search use every token
_SEARCH_TOKENS = 4096
# where the next block's inputs come from: "quantized" (this block after AWQ) or "float" (before it)
_NEXT_INPUTS = "quantized"


@dataclass(frozen=True)
class AWQGroup:
    """One scaling group: ``absorber`` makes the input of ``linears``, whose columns were scaled by
    ``s = mean|x|^alpha`` (normalized); ``1 / s`` went into ``absorber``.

    ``rtn_sqnr_db`` and ``sqnr_db``: output SQNR of ``measured`` (the modules reading the linears)
    on the calibration inputs, with the linears' weights round-to-nearest (``s = 1``) and
    ``Q(W * s) / s``, before any clipping. ``alpha`` None: not scaled, ``note`` says why (a fold
    check failed, e.g. heads that do not match; or a linear outside the decoder blocks, such as an
    untied ``lm_head``, which gets round-to-nearest: no op of the fold table makes its input).
    """

    block: int | None  # None: a linear outside the decoder blocks
    absorber: str
    linears: tuple[str, ...]
    measured: tuple[str, ...]
    alpha: float | None
    rtn_sqnr_db: float | None
    sqnr_db: float | None
    note: str | None = None


@dataclass
class AWQReport:
    """What ``awq`` did, and the calibration it used.

    Attributes:
        groups: every scaling group with a linear to quantize, in order.
        block_sqnr_db: block index -> output SQNR of the quantized block against the float block
            on the same inputs (the block's calibration inputs), for every block with a linear quantized.
        scales: linear -> the ``s`` its weight columns were multiplied by (float32, ``(in_features,)``;
            behind a norm rounded to a low-precision dtype, the effective ``s``, see ``FoldReport``);
            linears left unscaled are absent.
        clip: linear -> mean shrink of its blocks' ranges (1.0: none clipped); empty with ``clip=False``.
    """

    blocks: str
    samples: int
    tokens: int
    seconds: float
    summary: str
    groups: list[AWQGroup] = field(default_factory=list)
    block_sqnr_db: dict[int, float] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    clip: dict[str, float] = field(default_factory=dict)

    def to_table(self) -> str:
        """A markdown table, one row per scaling group, then one line of block output SQNRs."""
        rows = ["| block | scaled by | linears | measured on | alpha | RTN SQNR dB | AWQ SQNR dB |",
                "|---|---|---|---|---|---|---|"]
        for g in self.groups:
            tail = (f"{g.alpha:g} | {g.rtn_sqnr_db:.2f} | {g.sqnr_db:.2f}" if g.alpha is not None
                    else f"- | - | - ({g.note})")
            rows.append(f"| {'-' if g.block is None else g.block} | {g.absorber or '-'} | {', '.join(g.linears)} | {', '.join(g.measured)} | {tail} |")
        blocks = ", ".join(f"{i}: {db:.2f}" for i, db in self.block_sqnr_db.items())
        return "\n".join(rows) + f"\n\nblock output SQNR dB (quantized vs float block): {blocks}"


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_float32(obj):
    """``obj`` with every floating tensor, also inside tuples, lists and dicts, made float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float32(o) for o in obj) if type(obj) in (tuple, list) else obj
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


class _Recorder:
    """Forward hooks on a block's modules: each call's arguments, and the outputs of ``outputs``."""

    def __init__(self, root: nn.Module, names: set[str], outputs: set[str]):
        self.calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in names}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in outputs}
        self._handles = [root.get_submodule(n).register_forward_hook(self._hook(n), with_kwargs=True) for n in names]

    def _hook(self, name: str):
        def hook(module, args, kwargs, out):
            self.calls[name].append((tuple(args), dict(kwargs)))
            if name in self.outputs:
                self.outputs[name].append(_first(out))

        return hook

    def inputs(self, name: str) -> list[torch.Tensor]:
        """The first argument of every call of linear ``name``."""
        return [args[0] if args else kwargs["input"] for args, kwargs in self.calls[name]]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _error(module: nn.Module, calls, refs) -> tuple[float, float]:
    """(signal, noise) of ``module`` on the recorded ``calls`` against their float outputs."""
    signal = noise = 0.0
    for (args, kwargs), ref in zip(calls, refs):
        out = _first(module(*args, **kwargs))
        noise += float((out - ref).square().sum(dtype=torch.float64))
        signal += float(ref.square().sum(dtype=torch.float64))
    return signal, noise


def _search(work: nn.Module, group: FoldGroup, planned: dict[str, QuantSpec], rec: _Recorder, n_grid: int):
    """(alpha, s, RTN dB, best dB, measured modules) of one scaling group, searched on ``work``."""
    xs = rec.inputs(group.consumers[0])
    total = sum(x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64) for x in xs)
    count = sum(x.numel() // x.shape[-1] for x in xs)
    mean = group.tie((total / count).float())
    measured = (group.via,) if group.kind == "norm" else group.consumers
    modules = {m: work.get_submodule(m) for m in measured}
    batches, seen = 0, 0
    for x in xs:  # the first batches up to _SEARCH_TOKENS tokens
        if seen >= _SEARCH_TOKENS:
            break
        batches, seen = batches + 1, seen + x.numel() // x.shape[-1]
    weights = {c: work.get_submodule(c).weight for c in planned}
    originals = {c: w.detach().clone() for c, w in weights.items()}
    best = None
    rtn_db = None
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = mean.pow(alpha).clamp(min=_STAT_FLOOR)
            s = s / (s.max() * s.min()).sqrt()
            for c, spec in planned.items():
                weights[c].copy_(fake_quantize_affine(originals[c] * s, spec) / s)
            signal = noise = 0.0
            for m, module in modules.items():
                sg, ns = _error(module, rec.calls[m][:batches], rec.outputs[m][:batches])
                signal, noise = signal + sg, noise + ns
            db = _db(signal, noise)
            if i == 0:
                rtn_db = db
            if best is None or db > best[2]:
                best = (alpha, s, db)
    finally:
        for c, w in weights.items():
            w.copy_(originals[c])
    return best[0], best[1], rtn_db, best[2], measured


def _gram(xs: list[torch.Tensor], s: torch.Tensor | None, width: int) -> torch.Tensor:
    """``(K / width, width, width)``: the Gram matrix ``X^T X`` of each ``width``-column block of the
    input ``x / s`` over all calibration tokens, in float32."""
    k = xs[0].shape[-1]
    g = torch.zeros(k // width, width, width, device=xs[0].device)
    for x in xs:
        x = x.reshape(-1, k).float()
        if s is not None:
            x = x / s
        xb = x.reshape(-1, k // width, width).transpose(0, 1)  # (blocks, tokens, width)
        g.baddbmm_(xb.transpose(1, 2), xb)
    return g


def _clip_quantize(w: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None):
    """(codes, scale, zero point, mean shrink) of float32 ``w`` under ``spec``, each block's range
    shrunk by the ``_CLIP_SHRINK`` factor with the least output error (``gram`` None: no clip)."""
    n, k = w.shape
    br, bc = spec.block_size(w.shape)
    wb = w.reshape(n // br, br, k // bc, bc)
    mn, mx = wb.amin(dim=(1, 3)), wb.amax(dim=(1, 3))
    shrink = torch.ones_like(mn)
    if gram is not None:
        best = None
        for r in _CLIP_SHRINK:
            scale, zp = choose_qparams_affine_from_min_max(mn * r, mx * r, spec)
            d = (w - fake_quantize_affine(w, spec, scale, zp)).reshape(n, k // bc, bc).transpose(0, 1)
            err = (torch.bmm(d, gram) * d).sum(-1).t().reshape(n // br, br, k // bc).sum(1)  # (row blocks, col blocks)
            if best is None:
                best = err
                continue
            better = err < best
            shrink = torch.where(better, r, shrink)
            best = torch.where(better, err, best)
    scale, zp = choose_qparams_affine_from_min_max(mn * shrink, mx * shrink, spec)
    return quantize_affine(w, scale, zp, spec), scale, zp, float(shrink.mean())


def _block_groups(block: nn.Module, where: str, steps: dict[str, Step]) -> list[FoldGroup]:
    """The fold groups of ``block`` holding a linear of ``steps`` (relative names), checked: every
    such linear must be a consumer the table knows."""
    groups = [g for g in find_fold_groups(block) if any(c in steps for c in g.consumers)]
    known = {c for g in groups for c in g.consumers}
    unknown = [steps[r].fqn for r in steps if r not in known]
    if unknown:
        cls = f"{type(block).__module__}.{type(block).__qualname__}"
        raise NotImplementedError(
            f"AWQ: {unknown} in {where} ({cls}) read(s) no norm or linear of lowbit.static.fold.FOLD_TABLE (known: "
            "transformers Llama/Mistral/Qwen2 decoder layers, glassllm blocks), so their input scales have nowhere to "
            "fold; map them to None, or quantize them with quantize_ or gptq")
    return groups


def _awq_block(i: int, name: str, block: nn.Module, steps: dict[str, Step], groups: list[FoldGroup],
               inputs: BlockInputs, n_grid: int, clip: bool, report: AWQReport) -> BlockInputs:
    """AWQ on one block (``steps`` keyed by their name relative to it); returns the next inputs."""
    prefix = f"{name}.{i}."
    work = copy.deepcopy(block).float()
    inputs32 = [_to_float32(call) for call in inputs]
    usable = [g for g in groups if g.reason is None]
    names = {r for r in steps} | {c for g in usable for c in g.consumers}
    outputs = {m for g in usable for m in ((g.via,) if g.kind == "norm" else g.consumers)}
    rec = _Recorder(work, names | outputs, outputs)
    try:
        ref = [hidden_state(*call) for call in run_block(work, inputs32)]
    finally:
        rec.remove()
    missing = [steps[r].fqn for r in steps if not rec.calls[r]]
    if missing:
        raise ValueError(f"AWQ failed in {name}.{i} (the blocks before it are quantized, the rest is float): no "
                         f"calibration input reached {missing} (map them to None to leave them float)")
    float_next = run_block(block, inputs) if _NEXT_INPUTS == "float" else None

    scales: dict[str, torch.Tensor] = {}
    for g in groups:
        linears = tuple(prefix + c for c in g.consumers)
        if g.reason is not None:
            report.groups.append(AWQGroup(i, prefix + g.absorber, linears, (), None, None, None,
                                          f"{g.reason}; quantized unscaled"))
            continue
        planned = {c: steps[c].config.weight_spec() for c in g.consumers if c in steps}
        alpha, s, rtn_db, db, measured = _search(work, g, planned, rec, n_grid)
        report.groups.append(AWQGroup(i, prefix + g.absorber, linears, tuple(prefix + m for m in measured), alpha,
                                      rtn_db, db))
        if alpha > 0:
            scales.update(dict.fromkeys(g.consumers, s))
    folded = fold_scales(block, scales, groups)
    assert not folded.prescaled, folded.prescaled  # only foldable groups get scales
    report.scales.update({prefix + r: s for r, s in folded.scales.items()})

    grams: dict[tuple, torch.Tensor] = {}
    for r, step in steps.items():
        spec = step.config.weight_spec()
        w = step.module.weight.detach().float()
        gram = None
        if clip:
            xs, s = rec.inputs(r), folded.scales.get(r)
            key = (id(xs[0]), spec.block_size(w.shape)[1], None if s is None else id(s))
            if key not in grams:
                grams[key] = _gram(xs, s, key[1])
            gram = grams[key]
        codes, scale, zp, shrink = _clip_quantize(w, spec, gram)
        write_weight(step.module, step.fqn, step.config, step.shares, codes, scale, zp)
        if clip:
            report.clip[step.fqn] = shrink
    del rec, work, grams

    out = run_block(block, inputs)
    signal = sum(float(y.square().sum(dtype=torch.float64)) for y in ref)
    noise = sum(float((hidden_state(*o).float() - y).square().sum(dtype=torch.float64)) for o, y in zip(out, ref))
    report.block_sqnr_db[i] = _db(signal, noise)
    return out if float_next is None else float_next


def _check_options(n_grid, clip) -> None:
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid={n_grid!r} must be a positive int (the number of alphas i / n_grid tried)")
    if not isinstance(clip, bool):
        raise TypeError(f"clip={clip!r} must be a bool")


def awq(
    model: nn.Module,
    config: QuantConfig | ConfigMapping,
    calibration,
    *,
    n_grid: int = 20,
    clip: bool = True,
    batch_size: int = 8,
    blocks: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AWQReport:
    """Quantize ``model``'s linears in place with AWQ, into the tensors ``quantize_`` makes.

    Which linear gets which config follows ``quantize_`` exactly (mappings, group-size fallbacks,
    tied weights left float unless named). Every chosen config must have an int4 or int8 weight
    (as :func:`gptq`) and no static activation scale. Per-channel scales are folded into the
    preceding norm or linear (module docstring), so the model has no extra op; the quantized
    linears are the same ``Int4Tensor``/``Int8Tensor`` as ``quantize_``'s with other codes and
    qparams: same kernels, save and load. Selected linears outside the decoder blocks (an untied
    ``lm_head``) get round-to-nearest, listed in the report and warned about. Calibration text
    must differ from the evaluation text.

    Args:
        model: a causal LM taking token ids ``(batch, seq_len)`` whose decoder blocks are in
            ``lowbit.static.fold.FOLD_TABLE`` (transformers Llama/Mistral/Qwen2, glassllm).
        config: one config, or a mapping as ``quantize_`` takes.
        calibration: int64 ``(samples, seq_len)`` (see :func:`calibration_batches`) or a list of
            2-D token tensors.
        n_grid: alphas tried per scaling group: ``0, 1 / n_grid, ..., (n_grid - 1) / n_grid``.
        clip: search a shrink of each quantization block's range (module docstring).
        batch_size: calibration rows per forward.
        blocks: name of the decoder blocks' ``nn.ModuleList`` (found when None).
        progress: ``progress(done, total)`` after each block.

    Returns:
        :class:`AWQReport`.

    Raises:
        TypeError / ValueError: as ``quantize_`` for the config; a bad ``n_grid``/``clip``; bad
            calibration; blocks not found; a linear no calibration input reaches (the blocks
            already done stay quantized; the message says where it stopped).
        NotImplementedError: a float8 weight or a scale rule other than min/max; a static activation
            config; a linear inside a decoder block whose input no op of the fold table makes
            (each named). All checked before anything changes.

    Example:
        >>> calib = calibration_batches(calib_text, tokenizer, n_samples=128, seq_len=256)
        >>> report = awq(model, Int4WeightOnlyConfig(group_size=64), calib)
        >>> print(report.to_table())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_options(n_grid, clip)
    plan = plan_quantization(model, config)
    for s in plan.steps:
        integer_weight_spec(s.config, s.fqn, "AWQ")
        if getattr(s.config, "act_scale", None) is not None:
            raise NotImplementedError(f"AWQ: module {s.fqn!r} has config {s.config!r}, whose static act_scale was "
                                      "calibrated for the unscaled input; AWQ divides that input by per-channel scales "
                                      "(calibrate after AWQ with lowbit.static, or use a dynamic activation config)")
        if not bool(torch.isfinite(s.module.weight).all()):
            raise ValueError(f"AWQ: module {s.fqn!r}'s weight holds NaN or inf")
    name, layers = find_blocks(model, blocks)
    by_block: dict[int, dict[str, Step]] = {}
    outside = []
    for s in plan.steps:
        head, _, rel = s.fqn[len(name) + 1:].partition(".") if s.fqn.startswith(name + ".") else ("", "", "")
        if head.isdigit() and int(head) < len(layers) and rel:
            by_block.setdefault(int(head), {})[rel] = s
        else:
            outside.append(s)
    groups = {i: _block_groups(layers[i], f"{name}.{i}", steps) for i, steps in sorted(by_block.items())}
    param = next(model.parameters(), None)
    batches = make_batches(calibration, batch_size, param.device if param is not None else torch.device("cpu"))

    start = time.perf_counter()
    report = AWQReport(name, sum(b.shape[0] for b in batches), sum(b.numel() for b in batches), 0.0, plan.describe())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if by_block:
                inputs = capture_block_inputs(model, layers[0], batches)
                last = max(by_block)
                for i, layer in enumerate(layers[: last + 1]):
                    t0 = time.perf_counter()
                    steps = by_block.get(i, {})
                    if steps:
                        inputs = _awq_block(i, name, layer, steps, groups[i], inputs, n_grid, clip, report)
                    elif i < last:
                        inputs = run_block(layer, inputs)
                    _log.info("AWQ: %s.%d done (%d linears, %.1f s)", name, i, len(steps), time.perf_counter() - t0)
                    if progress is not None:
                        progress(i + 1, last + 1)
                del inputs
            for s in outside:  # no op of the fold table makes their input: round-to-nearest, as quantize_
                codes, scale, zp, _ = _clip_quantize(s.module.weight.detach().float(), s.config.weight_spec(), None)
                write_weight(s.module, s.fqn, s.config, s.shares, codes, scale, zp)
                report.groups.append(AWQGroup(None, "", (s.fqn,), (), None, None, None,
                                              f"outside the decoder blocks ({name}): round-to-nearest"))
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    unscaled = [g for g in report.groups if g.alpha is None]
    if unscaled:
        warnings.warn(f"AWQ left {len(unscaled)} group(s) of linears unscaled: "
                      + "; ".join(f"{g.absorber + ' -> ' if g.absorber else ''}{', '.join(g.linears)}: {g.note}"
                                  for g in unscaled),
                      UserWarning, stacklevel=2)
    line = "awq: " + plan.describe()
    if plan.notable:
        warnings.warn(line, UserWarning, stacklevel=2)
    else:
        _log.info(line)
    return report
