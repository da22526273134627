"""``QATConfig(base_config, step)``: quantization-aware training through ``quantize_``.

    quantize_(model, QATConfig(Int4WeightOnlyConfig(group_size=32), step="prepare"))
    ...train...
    quantize_(model, QATConfig(Int4WeightOnlyConfig(group_size=32), step="convert"))

``prepare`` makes every selected ``nn.Linear`` (or ``nn.Embedding`` named in a mapping) compute
with the fake-quant mirror of ``base_config`` (``lowbit.qat.fake_quant``); ``convert`` turns the
modules back into float modules and applies ``base_config`` itself. The prepared model's output
equals the converted model's with ``KernelPreference.REFERENCE`` bit for bit (tested per config
and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from lowbit.configs import QuantConfig
from lowbit.configs.base import get_handler, register_handler
from lowbit.qat.distributed import is_sharded, quantize_sharded_weight
from lowbit.qat.fake_quant import fake_quant_for
from lowbit.qat.modules import prepare_module, unprepare_module

__all__ = ["QATConfig"]


@dataclass(frozen=True, repr=False)
class QATConfig(QuantConfig):
    """Wraps a PTQ config for QAT.

    Args:
        base_config: the PTQ config to train for; it must have a QAT mirror
            (``lowbit.qat.qat_configs()``).
        step: "prepare" (fake-quantize) or "convert" (apply ``base_config`` to the trained weights).
    """

    base_config: QuantConfig
    step: str = "prepare"

    def __post_init__(self):
        if self.step not in ("prepare", "convert"):
            raise ValueError(f"QATConfig(step={self.step!r}); allowed: 'prepare', 'convert'")
        if not isinstance(self.base_config, QuantConfig) or isinstance(self.base_config, QATConfig):
            raise ValueError(f"QATConfig(base_config={self.base_config!r}) must be a PTQ config")
        fake_quant_for(self.base_config)  # raises TypeError naming a config without a mirror

    def for_weight(self, shape):
        """``base_config.for_weight(shape)`` wrapped (QuantConfig.for_weight): prepare and convert fall back alike."""
        base = self.base_config.for_weight(shape)
        return self if base == self.base_config else replace(self, base_config=base)

    def act_spec(self):
        """The base config's activation spec (a tied embedding can't share a weight that has one)."""
        return self.base_config.act_spec()


@register_handler(QATConfig)
def _(module: nn.Module, config: QATConfig, fqn: str) -> None:
    if config.step == "prepare":
        prepare_module(module, config.base_config)
        return
    if getattr(module, "qat_config", None) is None:
        raise TypeError(f"module {fqn or '<root>'!r} ({type(module).__name__}) was never prepared for QAT; "
                        "run quantize_(model, QATConfig(base_config, step='prepare')) and train first")
    if module.qat_config != config.base_config:
        raise ValueError(f"module {fqn or '<root>'!r} was prepared for {module.qat_config!r}, "
                         f"not {config.base_config!r}")
    unprepare_module(module)
    if is_sharded(module.weight):  # FSDP2: this rank's rows of the quantized weight, as a DTensor
        quantize_sharded_weight(module, config.base_config, fqn)
        return
    get_handler(config.base_config)(module, config.base_config, fqn)
