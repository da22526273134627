"""quantize_: apply a config (or a per-layer mapping of configs) to a model, in place, all or nothing."""

from __future__ import annotations

import logging
import warnings
from typing import Callable

from torch import nn

import lowbit.configs  # noqa: F401  (registers every config's handler)
from lowbit.configs.base import QuantConfig, get_handler, mark_quantized
from lowbit.kernels import hugepages
from lowbit.quantize.plan import ConfigMapping, QuantizePlan, check_config, plan_quantization, state_bytes
from lowbit.tensors.base import QuantizedTensor

__all__ = ["quantize_", "plan_quantization", "QuantizePlan", "state_bytes", "check_config", "ConfigMapping"]

_log = logging.getLogger("lowbit")


def quantize_(
    model: nn.Module,
    config: QuantConfig | ConfigMapping,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    strict: bool = False,
) -> nn.Module:
    """Quantize ``model``'s modules in place and return it; all of them or, on any error, none.

    Every selected module is checked with its config before anything changes; then the handlers
    run, and if one still fails, the modules already changed get their original state back (the
    model is bit for bit as before) and the error is raised.

    What happens beyond "each selected module gets its config" is reported in ONE line: a
    ``UserWarning`` when a module got a smaller group, or something was left float, or nothing was
    quantized (otherwise logged at INFO on the ``lowbit`` logger), with the state's bytes before
    and after (float and quantized; a storage shared by several tensors counted once):

    * **Group sizes**: a config whose group does not divide a layer's in_features gets, for that
      layer, the largest allowed smaller group that does (``config.for_weight(shape)``; e.g.
      ``Int4WeightOnlyConfig()`` on a 576-wide layer: ``group_size=64``), shown in the layer's
      repr; a layer no allowed group fits is left float. ``strict=True`` raises instead.
    * **Tied weights** (one weight shared by several modules, e.g. an output head and the input
      embedding): by default such a weight stays float and tied, as transformers' 4-bit quantizers
      leave the head. Naming the module in a mapping (an exact key, ``{"lm_head": config}``)
      quantizes the weight once and gives the same quantized tensor to every module sharing it
      (an embedding reads its rows from it), so the model holds one copy. A config that quantizes
      activations quantizes the head's input only: the embedding's lookup reads the weight's rows.
    * **Fused MoE experts** and other float parameters of 3 or more dims outside convolutions
      (``nn.Linear`` is what quantize_ handles) stay float and are named.

    Args:
        model: the model (its weights are replaced; modules stay).
        config: one config for every selected module, or a mapping ``{fqn or "re:<regex>":
            config or None}`` for per-layer choices: an exact module name wins, then the first
            regex (``re.fullmatch`` on the name) in order; ``None`` skips the module; modules
            that match no key are left alone.
        filter_fn: ``fn(module, fqn) -> bool`` selecting modules. Default: every ``nn.Linear``.
        strict: raise instead of falling back to a smaller group or leaving a layer float
            because no group fits.

    Returns:
        ``model``.

    Raises:
        TypeError: a config with no handler, a non-module ``model``, a non-floating weight.
        ValueError: an exact mapping key naming no module or a module ``filter_fn`` does not
            select; a selected module without a float weight or already quantized; tied modules
            given different configs (or one of them None); with ``strict=True``, every module whose
            config does not fit as given.
            Nothing has changed when it raises.

    Example:
        >>> quantize_(model, {"re:.*mlp.*": Int8WeightOnlyConfig(), "lm_head": None})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = plan_quantization(model, config, filter_fn, strict=strict)
    before = state_bytes(model)
    _apply(plan)
    hugepages.advise_model(model)  # the decode GEMVs stream these weights: on huge pages (lowbit.kernels.hugepages)
    line = "quantize_: " + plan.describe(before=before, after=state_bytes(model))
    if plan.notable:
        warnings.warn(line, UserWarning, stacklevel=2)
    else:
        _log.info(line)
    return model


class _Snapshot:
    """A module's class and attributes (its parameter/buffer/child dicts copied), to put back."""

    def __init__(self, module: nn.Module):
        self.module, self.cls = module, type(module)
        self.state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}

    def restore(self) -> None:
        self.module.__class__ = self.cls
        self.module.__dict__.clear()
        self.module.__dict__.update(self.state)


def _apply(plan: QuantizePlan) -> None:
    """Run the handlers; on any exception restore every module touched (the snapshots hold the
    original weights until the end), then re-raise."""
    saved: list[_Snapshot] = []
    try:
        for step in plan.steps:
            saved += [_Snapshot(step.module), *(_Snapshot(m) for _, m in step.shares)]
            before = step.module._parameters.get("weight")
            try:
                get_handler(step.config)(step.module, step.config, step.fqn)
            except ValueError as e:
                if step.fqn and step.fqn not in str(e):
                    raise ValueError(f"module {step.fqn!r}: {e}") from e
                raise
            weight = step.module._parameters.get("weight")
            if step.shares and weight is not before:  # one quantized tensor serves every module that shared it
                for _, m in step.shares:
                    m.weight = weight
                    if isinstance(weight, QuantizedTensor):
                        mark_quantized(m, step.config)
    except BaseException:
        for snap in reversed(saved):
            snap.restore()
        raise
