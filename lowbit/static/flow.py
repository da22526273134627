"""The calibration flow: ``prepare`` (observers in), run data, ``convert`` (static scales out).

``prepare(model, config)`` turns each selected ``nn.Linear`` into an ``ObservedLinear`` in place
(same object, an ``input_observer`` submodule added; the forward is the float one) and, when the
config asks, each ``nn.Softmax`` into a ``QuantizedSoftmax``. The user runs calibration batches.
``convert(model)`` turns each observed linear back into an ``nn.Linear`` whose weight is a
quantized tensor with the observed static activation scale, by the ordinary config handlers:

* ``StaticQuantConfig("int8")`` -> ``Int8StaticActivationInt8WeightConfig(act_scale, act_zero_point)``;
* ``StaticQuantConfig("float8_e4m3fn")`` -> ``Float8StaticActivationFloat8WeightConfig(act_scale)``;
* ``SmoothQuantConfig(base, alpha)`` -> the base config on ``W * s``, with ``1 / s`` folded into
  the preceding norm or linear where ``lowbit.static.fold`` knows the model's structure and kept
  as the weight's ``act_pre_scale`` elsewhere (see ``SmoothQuantConfig``).

Scales come from the observers' ``calculate_qparams`` (the primitives), so a static linear whose
observer saw exactly the input it is run on gives the per-tensor dynamic result bit for bit.

Inputs dominated by outliers: for each static integer scale, ``convert`` compares the calibration
inputs' mean ``|x|`` with the scale and warns once, naming every linear whose typical input is
under ``UNDERFLOW_STEPS`` quantization steps (most of its inputs round to 0: a per-tensor range
set by rare huge activations, as SmolLM2's ``mlp.down_proj`` inputs have). The quantization
itself is unchanged; the warning names the remedies.

Missing data: ``convert`` raises when no observed linear saw a batch (calibration never ran),
and for a linear no batch reached (an unused MoE expert) it warns, names it, and applies
``config.missing``. No scale is ever NaN: an all-zero input gives the smallest scale.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    QuantConfig,
    get_handler,
)
from lowbit.configs.base import swap_weight
from lowbit.granularity import PerAxis, PerRow, PerTensor
from lowbit.observers import ObserverBase, make_observer
from lowbit.primitives.affine import choose_qparams_affine_from_min_max
from lowbit.primitives.float8 import choose_qparams_float8_from_amax
from lowbit.spec import QuantSpec
from lowbit.static.config import SmoothQuantConfig, StaticQuantConfig
from lowbit.static.fold import FoldGroup, FoldReport, find_fold_groups, fold_scales
from lowbit.static.softmax import quantize_softmax_module
from lowbit.tensors.base import QuantizedTensor

__all__ = ["ObservedLinear", "prepare", "convert", "smoothing_factors", "SMOOTH_MIN", "SMOOTH_MAX", "UNDERFLOW_STEPS"]

# convert() warns when a static integer input scale exceeds 1 / UNDERFLOW_STEPS times the mean |x| its
# observer saw: for a Laplace-like input that rounds 1 - exp(-2) ~ 86% of the values to 0.
UNDERFLOW_STEPS = 0.25

# SmoothQuant factors are clamped to this range: a channel that is all zero in the activations
# or in the weight gets s = 1 (no change) instead of 0 or inf.
SMOOTH_MIN, SMOOTH_MAX = 1e-5, 1e5


class ObservedLinear(nn.Linear):
    """``nn.Linear`` that records its input range in ``input_observer`` (forward unchanged)."""

    input_observer: ObserverBase
    static_config: StaticQuantConfig | SmoothQuantConfig

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.input_observer(input)
        return F.linear(input, self.weight, self.bias)


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return type(module) is nn.Linear


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _act_spec(config) -> QuantSpec:
    """The observer's spec: the activation spec the config states (static: per tensor); SmoothQuant
    observes the same spec per input channel."""
    if isinstance(config, SmoothQuantConfig):
        return dataclasses.replace(config.base_config.act_spec(), granularity=PerAxis(1))
    return config.act_spec()


def _observer_recipe(config) -> StaticQuantConfig:
    if isinstance(config, SmoothQuantConfig) and isinstance(config.base_config, StaticQuantConfig):
        return config.base_config
    return config if isinstance(config, StaticQuantConfig) else StaticQuantConfig()


def prepare(
    model: nn.Module,
    config: StaticQuantConfig | SmoothQuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Put observers on ``model``'s linears (and quantize its softmax modules), in place.

    Args:
        model: a float model.
        config: ``StaticQuantConfig(...)`` or ``SmoothQuantConfig(...)``.
        filter_fn: ``fn(module, fqn) -> bool`` choosing the linears; default: every module whose
            type is exactly ``nn.Linear``. A linear whose weight another module shares (an output
            head tied to the embedding) is left float and tied, with a warning naming it, as
            ``quantize_`` does by default.

    Returns:
        ``model``; run calibration batches through it, then call ``convert(model)``.

    Raises:
        TypeError: ``config`` is not a static recipe; a linear is already observed or quantized.
        ValueError: no linear selected.

    Example:
        >>> prepare(model, StaticQuantConfig("int8"))
        >>> for batch in calibration_data: model(batch)
        >>> convert(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, (StaticQuantConfig, SmoothQuantConfig)):
        raise TypeError(
            f"config must be StaticQuantConfig or SmoothQuantConfig, got {type(config).__name__}; "
            "configs with a fixed act_scale go straight to quantize_"
        )
    filter_fn = filter_fn or _is_linear
    recipe = _observer_recipe(config)
    spec = _act_spec(config)
    targets = []
    for fqn, module in model.named_modules():
        if isinstance(module, ObservedLinear):
            raise TypeError(f"linear {fqn!r} is already prepared for calibration; call convert(model) first")
        if filter_fn(module, fqn):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"filter_fn selected {fqn!r} ({type(module).__name__}); only nn.Linear can be observed")
            if isinstance(module.weight, QuantizedTensor) or not module.weight.is_floating_point():
                raise TypeError(f"linear {fqn!r} is already quantized ({type(module.weight).__name__})")
            targets.append((fqn, module))
    tied = _tied_linears(model, targets)
    if tied:
        # quantize_'s policy: a weight shared with another module (an output head tied to the
        # embedding) stays float and tied; converting it would untie it and add a quantized copy
        warnings.warn(f"prepare: {len(tied)} linear(s) share their weight with another module and stay float "
                      f"and tied: {', '.join(f'{k} = {v}' for k, v in tied.items())}", UserWarning, stacklevel=2)
        targets = [(fqn, m) for fqn, m in targets if fqn not in tied]
    if not targets:
        raise ValueError("prepare found no nn.Linear to observe (check filter_fn)")
    device = _model_device(model)
    for fqn, module in targets:
        module.input_observer = make_observer(recipe.observer, spec, name=fqn, **recipe.observer_kwargs()).to(device)
        module.static_config = config
        module.__class__ = ObservedLinear
    static_base = not isinstance(config, SmoothQuantConfig) or isinstance(config.base_config, StaticQuantConfig)
    if recipe.softmax and static_base:
        for _, module in model.named_modules():
            if type(module) is nn.Softmax:
                quantize_softmax_module(module, recipe.dtype, device)
    return model


def _tied_linears(model: nn.Module, targets) -> dict[str, str]:
    """The selected linears whose weight another module shares, with the names of the sharers."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    return {fqn: ", ".join(o for o in owners[id(m.weight)] if o != fqn) for fqn, m in targets
            if len(owners.get(id(m.weight), ())) > 1}


def _unobserve(module: ObservedLinear) -> tuple[ObserverBase, StaticQuantConfig | SmoothQuantConfig]:
    observer = module.input_observer
    del module.input_observer
    config = module.static_config
    del module.static_config
    module.__class__ = nn.Linear
    return observer, config


def _static_config(recipe: StaticQuantConfig, scale: torch.Tensor, zero_point) -> QuantConfig:
    if recipe.is_float8:
        return Float8StaticActivationFloat8WeightConfig(
            act_scale=float(scale), granularity=recipe.granularity, dtype=getattr(torch, recipe.dtype), kernel=recipe.kernel
        )
    return Int8StaticActivationInt8WeightConfig(
        act_scale=float(scale), act_zero_point=None if zero_point is None else int(zero_point),
        granularity=recipe.granularity, kernel=recipe.kernel,
    )


def _dynamic_config(recipe: StaticQuantConfig) -> QuantConfig:
    if recipe.is_float8:
        per_row = isinstance(recipe.granularity, PerRow)
        return Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if per_row else PerTensor(), dtype=getattr(torch, recipe.dtype), kernel=recipe.kernel
        )
    return Int8DynamicActivationInt8WeightConfig(
        act_symmetric=recipe.act_symmetric, granularity=recipe.granularity, kernel=recipe.kernel
    )


def _convert_static(module: nn.Linear, fqn: str, observer: ObserverBase, recipe: StaticQuantConfig) -> float | None:
    """Quantize ``module`` with the observed static scale; returns the observed mean ``|x|`` in
    quantization steps when it is under ``UNDERFLOW_STEPS`` (integer recipes only), else None."""
    scale, zero_point = observer.calculate_qparams()
    config = _static_config(recipe, scale, zero_point)
    get_handler(config)(module, config, fqn)
    mean = observer.mean_abs
    if recipe.is_float8 or not mean:  # no statistics, or all-zero inputs (exact at any scale)
        return None
    steps = mean / float(scale.float().mean())
    return steps if steps < UNDERFLOW_STEPS else None


def _warn_underflow(low: dict[str, float]) -> None:
    worst = sorted(low.items(), key=lambda kv: kv[1])
    shown = ", ".join(f"{n!r} {v:.2g}" for n, v in worst[:5]) + (f" and {len(worst) - 5} more" if len(worst) > 5 else "")
    warnings.warn(
        f"convert: {len(low)} linear(s) got a static int8 input scale over {1 / UNDERFLOW_STEPS:g}x the mean |x| of "
        f"their calibration inputs, so most of their inputs round to 0 (mean |x| in quantization steps: {shown}); "
        "rare large activations set their ranges. Remedies: SmoothQuantConfig, dynamic per-token activations "
        "(Int8DynamicActivationInt8WeightConfig), or leaving them float (prepare's filter_fn)",
        stacklevel=3,
    )


def smoothing_factors(
    act_amax: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    alpha: float,
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s = act_amax ** alpha / max|W[:, j]| ** (1 - alpha)`` (float32, (K,)).

    Args:
        act_amax: ``(K,)`` largest activation magnitude per input channel.
        weight: ``(N, K)``, or several weights reading the same input (q/k/v behind one norm):
            ``max|W[:, j]|`` is then taken over all of them, so they share one ``s``.
        alpha: migration strength in ``[0, 1]``.
        tie: applied to both per-channel maxima before ``s`` is formed (``FoldGroup.tie``: equal
            across the query heads that share a key/value head); None: no tie.

    A channel whose activation or weight maximum is 0 gets ``s = 1``; the rest are clamped to
    ``[SMOOTH_MIN, SMOOTH_MAX]``.
    """
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    a = act_amax.float().reshape(-1)
    w = torch.stack([x.detach().float().abs().amax(dim=0) for x in weights]).amax(dim=0).to(a.device)
    if tie is not None:
        a, w = tie(a), tie(w)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(SMOOTH_MIN, SMOOTH_MAX)


def _act_amax(observer: ObserverBase) -> torch.Tensor:
    return torch.maximum(-observer.min_val, observer.max_val).reshape(-1)


def _smooth_scales(model: nn.Module, smooth: dict) -> tuple[dict[str, torch.Tensor], list[FoldGroup]]:
    """``s`` per smoothed linear: shared (from the union of ranges) within each fold group whose
    linears are all smoothed with one config, per linear elsewhere."""
    groups = find_fold_groups(model)
    scales = {}
    for g in groups:
        members = [smooth.get(c) for c in g.consumers]
        if g.reason is not None or None in members or len({m[2] for m in members}) != 1:
            continue  # fold_scales reports why; these get their own s below
        act = torch.stack([_act_amax(obs) for _, obs, _ in members]).amax(dim=0)
        s = smoothing_factors(act, [m.weight for m, _, _ in members], members[0][2].alpha, tie=g.tie)
        scales.update(dict.fromkeys(g.consumers, s))
    for fqn, (module, observer, config) in smooth.items():
        if fqn not in scales:
            scales[fqn] = smoothing_factors(_act_amax(observer), module.weight, config.alpha)
    return scales, groups


def _quantize_smoothed(module: nn.Linear, fqn: str, observer: ObserverBase, config: SmoothQuantConfig,
                       s: torch.Tensor, pre_scale: bool) -> None:
    """Quantize ``module`` (its weight already ``W * s``) with the base config; ``1 / s`` becomes the
    weight's ``act_pre_scale`` when nothing absorbed it."""
    mn, mx = observer.min_val.reshape(-1), observer.max_val.reshape(-1)
    inv = 1.0 / s.to(mn.device)
    base = config.base_config
    if isinstance(base, StaticQuantConfig):
        # per-tensor range of x * inv from the per-channel ranges: exact (inv > 0 keeps the order)
        lo, hi = (mn * inv).amin().reshape(1, 1), (mx * inv).amax().reshape(1, 1)
        spec = base.act_spec()
        if spec.dtype.is_float:
            scale, zp = choose_qparams_float8_from_amax(torch.maximum(-lo, hi).clamp(min=0), spec), None
        else:
            scale, zp = choose_qparams_affine_from_min_max(lo, hi, spec)
        concrete = _static_config(base, scale, zp)
    else:
        concrete = base
    get_handler(concrete)(module, concrete, fqn)
    if pre_scale:
        weight = module.weight._replace(act_pre_scale=inv.reshape(1, -1).to(module.weight.device))
        swap_weight(module, weight, concrete)


def _convert_smooth(model: nn.Module, smooth: dict) -> FoldReport:
    scales, groups = _smooth_scales(model, smooth)
    fold = all(cfg.fold for _, _, cfg in smooth.values())
    report = fold_scales(model, scales, groups if fold else [])
    if not fold:  # the same s, every 1 / s a pre-scale: equal to the folded model up to float32 rounding
        report.prescaled = dict.fromkeys(report.prescaled, "SmoothQuantConfig(fold=False)")
    for fqn, (module, observer, config) in smooth.items():
        _quantize_smoothed(module, fqn, observer, config, report.scales[fqn], fqn in report.prescaled)
    kept = list(report.prescaled)
    if kept and fold:  # fold=False asked for pre-scales: no warning
        shown = ", ".join(repr(k) for k in kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        warnings.warn(
            f"SmoothQuant: {len(kept)} of {len(smooth)} linear(s) kept a per-linear pre-scale 1/s (one float32 "
            f"multiply per call; nothing in the fold table absorbs it): {shown}; the reasons are in "
            "model.lowbit_fold_report.prescaled",
            stacklevel=3,
        )
    return report


def convert(model: nn.Module) -> nn.Module:
    """Replace every observed linear by its statically quantized form, in place.

    SmoothQuant: ``s`` is shared by the linears that read one norm and tied across the query
    heads of one key/value head (see ``lowbit.static.fold``); ``1 / s`` is folded into the
    preceding norm or linear where ``FOLD_TABLE`` knows the structure, and kept as the quantized
    weight's ``act_pre_scale`` elsewhere (or everywhere with ``SmoothQuantConfig(fold=False)``).
    ``model.lowbit_fold_report`` (a ``FoldReport``) then says which linear went where and why.

    Returns:
        ``model``.

    Raises:
        ValueError: the model has no observed linears (``prepare`` was not called).
        RuntimeError: no observed linear saw a calibration batch (run data between prepare and
            convert; the message names the layers), or ``missing="error"`` and some did not.

    Warns:
        UserWarning naming each linear no batch reached (handled per ``config.missing``), and,
        for SmoothQuant with ``fold=True``, one naming the count of linears that kept a pre-scale;
        one naming the linears whose static int8 scale is over ``1 / UNDERFLOW_STEPS`` times their
        inputs' mean ``|x|`` (most of their inputs round to 0).
    """
    observed = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, ObservedLinear)]
    if not observed:
        raise ValueError("convert found no observed linears: call lowbit.static.prepare(model, config) first")
    empty = [fqn for fqn, m in observed if not m.input_observer.has_data]
    if len(empty) == len(observed):
        shown = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise RuntimeError(
            f"convert() before any calibration batch: no observed linear saw data ({shown}); "
            "run model(batch) on calibration data between prepare() and convert()"
        )
    if empty:
        recipe = _observer_recipe(observed[0][1].static_config)
        if recipe.missing == "error":
            raise RuntimeError(f"no calibration batch reached these linears: {empty} (missing='error')")
        action = {"dynamic": "dynamic activation quantization", "float": "left in float"}[recipe.missing]
        warnings.warn(f"no calibration batch reached {len(empty)} linear(s), {action}: {empty}", stacklevel=2)
    unobserved = [(fqn, module, *_unobserve(module)) for fqn, module in observed]
    smooth = {fqn: (module, observer, config) for fqn, module, observer, config in unobserved
              if isinstance(config, SmoothQuantConfig) and observer.has_data}
    if smooth:
        # all scales first, then the folds (they rewrite norms and producer linears, e.g. v_proj's
        # rows for o_proj, before any of them is quantized), then the quantization
        model.lowbit_fold_report = _convert_smooth(model, smooth)
    low = {}
    for fqn, module, observer, config in unobserved:
        recipe = _observer_recipe(config)
        if not observer.has_data:
            if recipe.missing == "dynamic":
                dyn = _dynamic_config(recipe)
                get_handler(dyn)(module, dyn, fqn)
        elif not isinstance(config, SmoothQuantConfig):
            steps = _convert_static(module, fqn, observer, recipe)
            if steps is not None:
                low[fqn] = steps
    if low:
        _warn_underflow(low)
    return model
