"""quantize_: apply a config (or a per-layer mapping of configs) to a model, in place."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Union

from torch import nn

import lowbit.configs  # noqa: F401  (registers every config's handler)
from lowbit.configs.base import QuantConfig, get_handler

__all__ = ["quantize_"]

ConfigMapping = Mapping[str, Union[QuantConfig, None]]


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _resolve(mapping: ConfigMapping, fqn: str):
    """(matched, config) for ``fqn``: an exact key first, then ``"re:..."`` keys in order."""
    if fqn in mapping:
        return True, mapping[fqn]
    for key, config in mapping.items():
        if key.startswith("re:") and re.fullmatch(key[3:], fqn):
            return True, config
    return False, None


def check_config(config) -> None:
    """Raise TypeError unless ``config`` is a config with a handler or a ``{name or "re:...": config or None}``
    mapping of them."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            if not isinstance(key, str):
                raise TypeError(f"config mapping key {key!r} must be a module name or 're:<regex>'")
            if value is not None and not isinstance(value, QuantConfig):
                raise TypeError(f"config mapping value for {key!r} must be a config or None, got {value!r}")
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a lowbit config or a mapping of them, got {type(config).__name__}")
    else:
        get_handler(config)


def quantize_(
    model: nn.Module,
    config: QuantConfig | ConfigMapping,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Quantize ``model``'s modules in place and return it.

    Args:
        model: the model (its weights are replaced; modules stay).
        config: one config for every selected module, or a mapping ``{fqn or "re:<regex>":
            config or None}`` for per-layer choices: an exact module name wins, then the first
            regex (``re.fullmatch`` on the name) in order; ``None`` skips the module; modules
            that match no key are left alone.
        filter_fn: ``fn(module, fqn) -> bool`` selecting modules. Default: every ``nn.Linear``.

    Returns:
        ``model``.

    Raises:
        TypeError: a config with no handler, or a non-module ``model``.
        ValueError: an exact mapping key naming no module; a selected module without a float
            weight or with a shape the config's granularity can't split (the error names it).

    Example:
        >>> quantize_(model, {"re:.*mlp.*": Int8WeightOnlyConfig(), "lm_head": None})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    filter_fn = filter_fn or _is_linear
    check_config(config)
    if isinstance(config, Mapping):
        names = {n for n, _ in model.named_modules()}
        missing = [k for k in config if not k.startswith("re:") and k not in names]
        if missing:
            raise ValueError(f"config mapping names modules that do not exist: {missing}")

    todo = []
    for fqn, module in model.named_modules():
        if not filter_fn(module, fqn):
            continue
        if isinstance(config, Mapping):
            matched, chosen = _resolve(config, fqn)
            if not matched or chosen is None:
                continue
        else:
            chosen = config
        todo.append((fqn, module, chosen))
    for fqn, module, chosen in todo:
        try:
            get_handler(chosen)(module, chosen, fqn)
        except ValueError as e:
            if fqn and fqn not in str(e):
                raise ValueError(f"module {fqn!r}: {e}") from e
            raise
    return model
