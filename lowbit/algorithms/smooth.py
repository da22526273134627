"""``smooth_(model, calibration, alpha)``: SmoothQuant's scales folded into a float model, before
any quantizer (``quantize_``, ``gptq``) runs.

SmoothQuant (Xiao et al. 2022) moves activation outliers into the weights: a linear reading ``x``
becomes ``(x / s) (W * s)^T`` with ``s = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` per input
channel. ``lowbit.static``'s ``SmoothQuantConfig`` does this and quantizes with round-to-nearest
in one step; this function does only the smoothing, so that the weights can then be quantized by
GPTQ (W8A8 with GPTQ weights) or anything else, and the model stays float until then.

Only linears whose ``1 / s`` folds exactly into the op producing their input (the fold table of
:mod:`lowbit.static.fold`: the RMSNorm before q/k/v and gate/up, ``v_proj`` before ``o_proj``,
``up_proj`` before ``down_proj``) are smoothed: a float model has no place for a per-linear
pre-scale. The others are left as they are and listed in the report with the reason.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.algorithms.blocks import forward_kwargs, make_batches
from lowbit.static.flow import smoothing_factors
from lowbit.static.fold import FoldReport, find_fold_groups, fold_scales

__all__ = ["smooth_"]

_log = logging.getLogger("lowbit")


@torch.no_grad()
def smooth_(
    model: nn.Module,
    calibration,
    alpha: float = 0.5,
    *,
    filter_fn=None,
    batch_size: int = 8,
) -> FoldReport:
    """Fold SmoothQuant's per-channel scales into ``model`` (in place; it stays float).

    The activation maxima are observed on the float model over the calibration tokens (one
    forward per batch); each fold group (linears reading one norm or one producer linear) gets
    one ``s`` from the union of its linears' maxima and weights (tied across the query heads that
    share a key/value head), exactly as ``SmoothQuantConfig`` computes it.

    Args:
        model: a float model taking token ids ``(batch, seq_len)``.
        calibration: int64 ``(samples, seq_len)`` or a list of 2-D token tensors (as ``gptq``'s).
        alpha: migration strength in ``[0, 1]``: 0 leaves activations, 1 moves all their range
            into the weights.
        filter_fn: ``filter_fn(module, fqn) -> bool``; a group is smoothed only when it holds
            for all its linears. None: every group.
        batch_size: calibration rows per forward.

    Returns:
        The ``FoldReport`` of ``lowbit.static.fold.fold_scales``: ``folded`` (linear -> the op its
        ``1 / s`` went into) and ``scales``; ``prescaled`` is always empty (nothing is left to
        the caller) and the groups that could not fold are logged.

    Raises:
        TypeError / ValueError: a bad argument (named); calibration the model cannot run.

    Example:
        >>> smooth_(model, calib, alpha=0.5)
        >>> gptq(model, Int8DynamicActivationInt8WeightConfig(), calib)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be a float in [0, 1]")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool or None, got {type(filter_fn).__name__}")
    param = next(model.parameters(), None)
    batches = make_batches(calibration, batch_size, param.device if param is not None else torch.device("cpu"))

    groups = find_fold_groups(model)
    chosen = []
    for g in groups:
        if g.reason is not None:
            _log.info("smooth_: %s not smoothed: %s", ", ".join(g.consumers), g.reason)
            continue
        if filter_fn is None or all(filter_fn(model.get_submodule(c), c) for c in g.consumers):
            chosen.append(g)
    if not chosen:
        return FoldReport()

    amax: dict[str, torch.Tensor] = {}

    def observe(fqn):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            amax[fqn] = m if fqn not in amax else torch.maximum(amax[fqn], m)

        return hook

    readers = {g.consumers[0] for g in chosen}  # the linears of a group read one tensor
    handles = [model.get_submodule(f).register_forward_pre_hook(observe(f), with_kwargs=True) for f in readers]
    was_training = model.training
    model.eval()
    try:
        extra = forward_kwargs(model)
        for b in batches:
            model(b, **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    scales = {}
    for g in chosen:
        if g.consumers[0] not in amax:
            _log.info("smooth_: no calibration input reached %s; not smoothed", g.consumers[0])
            continue
        weights = [model.get_submodule(c).weight for c in g.consumers]
        s = smoothing_factors(amax[g.consumers[0]], weights, alpha, tie=g.tie)
        scales.update(dict.fromkeys(g.consumers, s))
    report = fold_scales(model, scales, chosen)
    if report.prescaled:  # only foldable groups were given scales: a fold-table defect
        raise RuntimeError(f"smooth_: fold_scales left pre-scales on a float model: {report.prescaled}")
    _log.info("smooth_: %s", report.summary())
    return report
