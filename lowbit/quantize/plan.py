"""What ``quantize_`` (and the streaming ``quantize_pretrained``) will do to a model, decided and
checked before anything changes: which module gets which config, group-size fallbacks, tied
weights, and what stays float. Works on a model on ``meta`` (it reads shapes only)."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Union

from torch import nn

from lowbit.configs.base import QuantConfig, float_weight, get_handler
from lowbit.tensors.base import QuantizedTensor

__all__ = ["ConfigMapping", "QuantizePlan", "Step", "plan_quantization", "check_config", "resolve", "state_bytes"]

ConfigMapping = Mapping[str, Union[QuantConfig, None]]
_SHOWN = 3  # names listed per item of the summary line


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def resolve(mapping: ConfigMapping, fqn: str) -> tuple[bool, QuantConfig | None]:
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


@dataclasses.dataclass
class Step:
    """One weight to quantize: ``module`` (at ``fqn``) runs ``config``'s handler; ``shares`` are the
    other modules holding the same weight tensor, which get the quantized tensor too."""

    fqn: str
    module: nn.Module
    config: QuantConfig  # what the module gets (``asked.for_weight(shape)``)
    asked: QuantConfig  # what the config / mapping said
    shares: list[tuple[str, nn.Module]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class QuantizePlan:
    """The checked plan; ``describe`` is the one summary line."""

    steps: list[Step]
    skipped: list[str]  # selected modules left float on purpose (None, no matching key, skip)
    unfit: dict[str, str]  # module -> why no variant of its config fits it: left float
    tied: dict[str, list[str]]  # module -> the modules sharing its weight: left float (default policy)
    unhandled: dict[str, tuple[int, ...]]  # "module.param" -> shape: 3-D+ float parameters left float

    @property
    def fallbacks(self) -> list[Step]:
        """Steps whose config changed to fit the weight (a smaller group)."""
        return [s for s in self.steps if s.config != s.asked]

    @property
    def notable(self) -> bool:
        """Whether the outcome differs from "every selected module got its config"."""
        return bool(self.fallbacks or self.unfit or self.tied or self.unhandled or not self.steps)

    def describe(self, before: tuple[int, int] | None = None, after: tuple[int, int] | None = None) -> str:
        """One line: modules quantized, smaller groups, what stays float and why, bytes."""
        n = len(self.steps) + sum(len(s.shares) for s in self.steps)
        parts = [f"{n} module(s) quantized"]
        if self.fallbacks:
            counts: dict[str, int] = {}
            for s in self.fallbacks:
                counts[repr(s.config)] = counts.get(repr(s.config), 0) + 1
            parts.append(f"{len(self.fallbacks)} got a smaller group size (in_features not divisible by theirs: "
                         + ", ".join(f"{c} x {k}" for c, k in counts.items()) + ")")
        float_parts = []
        if self.unfit:
            why = next(iter(self.unfit.values()))
            float_parts.append(f"{len(self.unfit)} that no allowed group fits ({_names(self.unfit)}; {why})")
        if self.tied:
            pairs = [f"{k} = {', '.join(v)}" for k, v in self.tied.items()]
            float_parts.append(f"{len(self.tied)} tied weight(s), kept float and tied ({_names(pairs)}; name the "
                               "module in a mapping to quantize the weight once for all its users)")
        if self.unhandled:
            float_parts.append(f"{len(self.unhandled)} parameter(s) of 3+ dims outside nn.Linear, e.g. fused MoE "
                               f"experts ({_names([f'{k} {list(v)}' for k, v in self.unhandled.items()])})")
        parts.append("left float: " + ("; ".join(float_parts) if float_parts else "0"))
        if before is not None and after is not None:
            parts.append(f"state {_mb(before[0])} float + {_mb(before[1])} quantized -> "
                         f"{_mb(after[0])} float + {_mb(after[1])} quantized")
        return "; ".join(parts)


def _names(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def state_bytes(model: nn.Module) -> tuple[int, int]:
    """``(float bytes, quantized bytes)`` of ``model``'s parameters and buffers, each storage counted once
    (tied weights, views); a quantized tensor counts its inner tensors (data, scales, zero points); a
    DTensor counts this rank's local part."""
    seen: set = set()
    totals = [0, 0]
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if hasattr(t, "device_mesh") and hasattr(t, "to_local"):  # a DTensor (FSDP2, tensor parallel): this rank's part
            t = t.to_local()
        quantized = isinstance(t, QuantizedTensor)
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if quantized else [t]
        for x in inner:
            storage = x.untyped_storage()
            key = (x.device, storage.data_ptr()) if storage.data_ptr() else id(x)
            if key not in seen:
                seen.add(key)
                totals[quantized] += storage.nbytes()
    return totals[0], totals[1]


def plan_quantization(
    model: nn.Module,
    config: QuantConfig | ConfigMapping,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    strict: bool = False,
    skip: Iterable[str] = (),
) -> QuantizePlan:
    """Decide and check what ``quantize_(model, config, filter_fn, strict=strict)`` will do; change nothing.

    ``skip``: module names or ``"re:<regex>"`` patterns left float, winning over ``config`` (the
    streaming quantizer's option). See ``quantize_`` for the policy and the errors raised.
    """
    check_config(config)
    filter_fn = filter_fn or _is_linear
    skip = list(skip)
    mapping = config if isinstance(config, Mapping) else {}
    modules = dict(model.named_modules())
    _check_names(modules, filter_fn, skip, mapping)

    def choose(fqn: str) -> tuple[QuantConfig | None, bool]:  # (config or None, named by an exact key)
        if resolve(dict.fromkeys(skip), fqn)[0]:
            return None, fqn in skip
        if not isinstance(config, Mapping):
            return config, False
        return resolve(config, fqn)[1], fqn in config

    steps: list[Step] = []
    skipped: list[str] = []
    unfit: dict[str, str] = {}
    errors: list[Exception] = []
    explicit: set[str] = set()
    for fqn, module in modules.items():
        if not filter_fn(module, fqn):
            continue
        asked, named = choose(fqn)
        if asked is None:
            skipped.append(fqn)
            continue
        try:
            w = float_weight(module, fqn)
        except (ValueError, TypeError) as e:
            errors.append(e)
            continue
        try:
            given = asked.for_weight(tuple(w.shape))
        except ValueError as e:
            unfit[fqn] = f"{asked!r}: {e}"
            continue
        steps.append(Step(fqn, module, given, asked))
        if named:
            explicit.add(fqn)
    if errors:
        kind = TypeError if all(isinstance(e, TypeError) for e in errors) else ValueError
        raise kind(str(errors[0]) if len(errors) == 1 else
                   f"{len(errors)} selected modules can't be quantized: " + "; ".join(map(str, errors)))
    tied = _resolve_ties(modules, steps, explicit, choose)
    if strict:
        reasons: dict[str, list[str]] = {}  # why -> modules, every one listed
        for s in steps:
            if s.config != s.asked:
                reasons.setdefault(f"{s.asked!r} would fall back to {s.config!r}", []).append(s.fqn)
        for fqn, why in unfit.items():
            reasons.setdefault(why, []).append(fqn)
        if reasons:
            n = sum(map(len, reasons.values()))
            raise ValueError(f"strict=True: {n} module(s) can't take their config as given: "
                             + "; ".join(f"{', '.join(map(repr, names))}: {why}" for why, names in reasons.items()))
    quantized = {id(s.module) for s in steps} | {id(m) for s in steps for _, m in s.shares}
    unhandled = {}
    for fqn, module in modules.items():
        if id(module) in quantized or isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, p in module._parameters.items():
            if p is not None and p.dim() >= 3 and p.is_floating_point() and not isinstance(p, QuantizedTensor):
                unhandled[f"{fqn}.{name}" if fqn else name] = tuple(p.shape)
    return QuantizePlan(steps, skipped, unfit, tied, unhandled)


def _check_names(modules: dict[str, nn.Module], filter_fn, skip: list[str], mapping: ConfigMapping) -> None:
    """Every exact name in ``skip`` and the mapping must name a module that ``filter_fn`` selects."""
    what = "config mapping / skip" if skip else "config mapping"
    names = [k for k in [*skip, *mapping] if not k.startswith("re:")]
    missing = [k for k in names if k not in modules]
    if missing:
        raise ValueError(f"{what} names modules that do not exist: {missing}")
    for k in skip:
        if k.startswith("re:"):
            try:
                re.compile(k[3:])
            except re.error as e:
                raise ValueError(f"skip {k!r} is not a valid regex: {e}") from None
    ignored = [f"{k!r} ({type(modules[k]).__name__})" for k in names if not filter_fn(modules[k], k)]
    if ignored:
        raise ValueError(f"{what} names module(s) that filter_fn does not select, so the key would do nothing: "
                         f"{', '.join(ignored)} (the default filter_fn selects nn.Linear modules only; pass one "
                         "that selects them, or name their linears)")


def _resolve_ties(modules: dict[str, nn.Module], steps: list[Step], explicit: set[str], choose) -> dict[str, list[str]]:
    """Apply the tied-weight policy to ``steps`` in place; returns the tied modules left float.

    A weight held by several modules is quantized once, by the first module an exact mapping key
    names, and shared with the others; with no such key it stays float (and tied).
    """
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for fqn, m in modules.items():
        w = m._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append((fqn, m))
    tied: dict[str, list[str]] = {}
    drop: set[int] = set()
    for key, group in owners.items():
        if len(group) < 2:
            continue
        mine = [s for s in steps if id(s.module.weight) == key]
        if not mine:
            continue
        named = [s for s in mine if s.fqn in explicit]
        others = lambda s: [f for f, _ in group if f != s.fqn]  # noqa: E731
        if not named:
            for s in mine:
                tied[s.fqn] = others(s)
                drop.add(id(s))
            continue
        first = named[0]
        clash = [s for s in named if s.config != first.config]
        if clash:
            raise ValueError(f"modules {first.fqn!r} and {clash[0].fqn!r} share one weight but the mapping gives them "
                             f"different configs ({first.config!r}, {clash[0].config!r}); give them the same one")
        refused = [f for f, _ in group if choose(f) == (None, True)]
        if refused:
            raise ValueError(f"module {first.fqn!r} shares its weight with {refused[0]!r}: the mapping quantizes the "
                             f"first ({first.config!r}) and names the second with None; tied modules get one choice")
        for f, m in group:
            if m is first.module:
                continue
            if not isinstance(m, (nn.Linear, nn.Embedding)):
                raise ValueError(f"module {first.fqn!r} shares its weight with {f!r} ({type(m).__name__}), which "
                                 "can't take a quantized weight (nn.Linear and nn.Embedding can)")
            first.shares.append((f, m))
        drop.update(id(s) for s in mine if s is not first)
    steps[:] = [s for s in steps if id(s) not in drop]
    return tied
