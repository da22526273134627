"""Write an algorithm's codes and qparams as the very tensor ``quantize_`` makes for a config."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.configs.base import QuantConfig, get_handler, mark_quantized, swap_weight
from lowbit.primitives.packing import pack_int4
from lowbit.spec import QuantSpec
from lowbit.tensors.int4_tensor import Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["integer_weight_spec", "write_weight"]

_DTYPES = ("int4", "uint4", "int8")


def integer_weight_spec(config: QuantConfig, fqn: str, algorithm: str) -> QuantSpec:
    """The config's weight spec, checked to be one an algorithm can fill: int4/uint4/int8 values
    whose qparams come from the spec alone (the "minmax" scale rule).

    Raises:
        TypeError: the config states no weight spec.
        NotImplementedError: a float8 weight, or a scale rule other than the spec's min/max
            (``Float8DynamicActivationInt4WeightConfig``'s fp8-then-int4 rule).
    """
    try:
        spec = config.weight_spec()
    except NotImplementedError:
        raise TypeError(f"{algorithm}: module {fqn!r} has config {config!r}, which states no weight spec") from None
    if spec.dtype.name not in _DTYPES:
        raise NotImplementedError(f"{algorithm} makes int4/int8 weights; module {fqn!r} has config {config!r}, whose "
                                  f"weight is {spec.dtype.name}")
    rule = getattr(config, "scale_rule", "minmax")
    if rule != "minmax":
        raise NotImplementedError(f"{algorithm}: module {fqn!r} has config {config!r}, whose scale rule {rule!r} "
                                  "is not the weight spec's own (min/max); only 'minmax' configs are supported")
    return spec


def write_weight(module: nn.Module, fqn: str, config: QuantConfig, shares, qdata: torch.Tensor,
                 scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
    """Give ``module`` (and the modules in ``shares``, ``[(fqn, module)]``, that hold the same
    weight) the tensor ``config``'s handler makes, holding ``qdata`` (unpacked codes in the
    spec's storage dtype), ``scale`` and ``zero_point`` instead of round-to-nearest's.

    The handler runs first on the float weight, so every field other than the codes and qparams
    (spec, activation spec and static activation qparams, kernel, dtype) is exactly the one
    ``quantize_`` would give; then the three tensors are replaced, checked against it.

    Raises:
        NotImplementedError: the handler makes a tensor other than ``Int4Tensor``/``Int8Tensor``.
        ValueError: codes or qparams whose shape or dtype differ from the handler's.
    """
    saved = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    try:
        _write(module, fqn, config, qdata, scale, zero_point)
    except BaseException:
        module.__dict__.clear()
        module.__dict__.update(saved)  # the float weight and no config, as before
        raise
    for _, other in shares:
        other.weight = module.weight
        mark_quantized(other, config)


def _write(module, fqn, config, qdata, scale, zero_point) -> None:
    get_handler(config)(module, config, fqn)
    made = module.weight
    if type(made) not in (Int4Tensor, Int8Tensor):
        raise NotImplementedError(f"module {fqn!r}: {config!r} makes a {type(made).__name__}, not an Int4Tensor or "
                                  "Int8Tensor an algorithm can fill")
    packed = pack_int4(qdata) if isinstance(made, Int4Tensor) else qdata
    new = {"qdata": packed, "scale": scale.float(), "zero_point": zero_point}
    for name, t in new.items():
        old = getattr(made, name)
        if (old is None) != (t is None) or t is not None and (t.shape != old.shape or t.dtype != old.dtype):
            got = None if t is None else (tuple(t.shape), t.dtype)
            want = None if old is None else (tuple(old.shape), old.dtype)
            raise ValueError(f"module {fqn!r}: {name} {got} does not match {config!r}'s tensor {want}")
    device = made.qdata.device
    swap_weight(module, made._replace(**{k: None if v is None else v.to(device) for k, v in new.items()}), config)
