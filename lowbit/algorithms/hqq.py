"""HQQ on whole models: ``quantize_hqq_``, ``quantize_`` with every config's ``qparams="hqq"``.

The solver itself (``hqq_optimize``, ``hqq_qparams``) is a pure tensor function of the primitives
layer (``lowbit.primitives.hqq``), where the configs' handlers reach it; it is re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping

from torch import nn

from lowbit.algorithms._weights import integer_weight_spec, write_weight
from lowbit.configs.base import QuantConfig, mark_quantized
from lowbit.primitives.affine import quantize_affine
from lowbit.primitives.hqq import HQQResult, hqq_optimize, hqq_qparams
from lowbit.quantize import quantize_
from lowbit.quantize.plan import ConfigMapping, plan_quantization

__all__ = ["HQQResult", "hqq_optimize", "hqq_qparams", "quantize_hqq_"]

_log = logging.getLogger("lowbit")
_OPTIONS = ("iters", "p", "beta", "kappa", "optimize_scale", "selection")


def _with_hqq(config):
    """``config`` with ``qparams="hqq"`` where it has that field (None and other configs as they are)."""
    if isinstance(config, QuantConfig):
        if any(f.name == "qparams" for f in dataclasses.fields(config)):
            return dataclasses.replace(config, qparams="hqq")
        return config
    if isinstance(config, Mapping):
        return {k: _with_hqq(v) for k, v in config.items()}
    return config  # quantize_'s plan names what is wrong with it


def quantize_hqq_(model: nn.Module, config: QuantConfig | ConfigMapping, filter_fn=None, **hqq_options) -> nn.Module:
    """``quantize_`` with HQQ's qparams: every config gets ``qparams="hqq"``, so every linear
    ``quantize_`` would quantize gets the same tensor class and spec, its codes made by
    ``quantize_affine`` with :func:`hqq_qparams`, and records that config.

    Without options this is ``quantize_(model, config_with_qparams_hqq, filter_fn)`` (its warning
    line starts ``quantize_:``). Options
    other than HQQ's defaults (for experiments) run the solver with them on the same plan; the
    modules record the same ``qparams="hqq"`` config (the options are not recorded).

    All or nothing, as ``quantize_``: on any error the modules already done get their float
    weights back.

    Args:
        model: the model, changed in place.
        config: one config or a mapping, as ``quantize_`` takes; int4/int8 weights only (the
            configs with a ``qparams`` field).
        filter_fn: as ``quantize_``'s.
        **hqq_options: ``iters``, ``p``, ``beta``, ``kappa``, ``optimize_scale``, ``selection`` (:func:`hqq_optimize`).

    Returns:
        ``model``.

    Raises:
        TypeError / ValueError: as ``quantize_``, or bad HQQ options.
        NotImplementedError: a config whose weight is not int4/int8 by its spec's min/max.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    unknown = set(hqq_options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"quantize_hqq_ got unknown options {sorted(unknown)}; allowed: {', '.join(_OPTIONS)}")
    config = _with_hqq(config)
    plan = plan_quantization(model, config, filter_fn)
    for step in plan.steps:
        if getattr(step.config, "qparams", None) != "hqq":  # float8, fp8-then-int4, QAT: the reason, named
            integer_weight_spec(step.config, step.fqn, "HQQ")
            raise NotImplementedError(f"HQQ: module {step.fqn!r} has config {step.config!r}, which has no qparams "
                                      "field")
    if not hqq_options:
        quantize_(model, config, filter_fn)  # its one plan line says 'quantize_: ...'
        return model
    saved = []
    try:
        for step in plan.steps:
            w = step.module.weight.detach()
            spec = step.config.weight_spec()
            scale, zp = hqq_qparams(w, spec, **hqq_options)
            saved += [(m, dict(m.__dict__, _parameters=dict(m._parameters))) for m in
                      (step.module, *(m for _, m in step.shares))]
            minmax = dataclasses.replace(step.config, qparams="minmax")  # the handler's fields, without its own HQQ run
            write_weight(step.module, step.fqn, minmax, step.shares, quantize_affine(w, scale, zp, spec), scale, zp)
            for m in (step.module, *(m for _, m in step.shares)):
                mark_quantized(m, step.config)
    except BaseException:
        for m, state in reversed(saved):
            m.__dict__.clear()
            m.__dict__.update(state)
        raise
    line = "quantize_hqq_: " + plan.describe()
    if plan.notable:
        warnings.warn(line, UserWarning, stacklevel=2)
    else:
        _log.info(line)
    return model
