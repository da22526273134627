"""Fake-quantized modules: ``nn.Linear``/``nn.Embedding`` whose forward runs the QAT mirror of a
PTQ config on their float weights (trainable), so training sees the deployed numerics.

``prepare_module`` turns a float module into its fake-quantized class in place (the module object
stays, so parents, hooks and optimizers keep their references); ``unprepare_module`` turns it back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.configs import QuantConfig
from lowbit.qat.distributed import is_sharded
from lowbit.qat.fake_quant import FakeQuant, fake_quant_for

__all__ = ["FakeQuantizedLinear", "FakeQuantizedEmbedding", "prepare_module", "unprepare_module"]


class _FakeQuantized:
    """Shared state: the PTQ config being mirrored and its fake quantizers."""

    qat_config: QuantConfig
    fake_quant: FakeQuant
    _lowbit_float_class: type

    def extra_repr(self) -> str:
        return f"{self._lowbit_float_class.extra_repr(self)}, qat={self.qat_config!r}"


class FakeQuantizedLinear(_FakeQuantized, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (and activations, when the config quantizes them)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fq = self.fake_quant
        w = fq.weight(self.weight)
        x = input if fq.activation is None else fq.activation(input)
        if fq.float32_linear:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x, w, bias).to(input.dtype)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_float(cls, module: nn.Linear, config: QuantConfig) -> "FakeQuantizedLinear":
        return prepare_module(module, config)

    def to_float(self) -> nn.Linear:
        return unprepare_module(self)


class FakeQuantizedEmbedding(_FakeQuantized, nn.Embedding):
    """``nn.Embedding`` whose table is fake-quantized (weight-only configs)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant.weight(self.weight)
        return F.embedding(input, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    @classmethod
    def from_float(cls, module: nn.Embedding, config: QuantConfig) -> "FakeQuantizedEmbedding":
        return prepare_module(module, config)

    def to_float(self) -> nn.Embedding:
        return unprepare_module(self)


_CLASSES = {nn.Linear: FakeQuantizedLinear, nn.Embedding: FakeQuantizedEmbedding}


def prepare_module(module: nn.Module, config: QuantConfig) -> nn.Module:
    """Make ``module`` (exactly ``nn.Linear`` or ``nn.Embedding``) fake-quantize with ``config``'s mirror.

    Raises:
        TypeError: another module class, a module already prepared, or a config without a mirror.
        ValueError: an embedding with a config that quantizes activations.
    """
    if isinstance(module, _FakeQuantized):
        raise TypeError(f"{type(module).__name__} is already prepared for QAT ({module.qat_config!r})")
    target = _CLASSES.get(type(module))
    if target is None:
        raise TypeError(f"QAT prepares nn.Linear and nn.Embedding, got {type(module).__name__}")
    fq = fake_quant_for(config)
    if target is FakeQuantizedEmbedding and fq.activation is not None:
        raise ValueError(f"{type(config).__name__} quantizes activations; an embedding takes weight-only configs")
    w = getattr(module, "weight", None)
    sharded = is_sharded(w)  # FSDP2 already sharded it: the forward sees the gathered weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or (
            type(w) not in (torch.Tensor, nn.Parameter) and not sharded):
        raise TypeError(f"QAT needs a float weight, got {type(w).__name__}")
    check = w.detach().to_local() if sharded else w.detach()  # a shard keeps every column: groups fit alike
    if check.numel():
        fq.weight(check)  # fail now (e.g. a group size that does not divide the weight), not mid-training
    module._lowbit_float_class = type(module)
    module.__class__ = target
    module.qat_config = config
    module.fake_quant = fq
    return module


def unprepare_module(module: nn.Module) -> nn.Module:
    """Turn a prepared module back into its float class (weights untouched).

    Raises:
        TypeError: ``module`` was never prepared.
    """
    if not isinstance(module, _FakeQuantized):
        raise TypeError(f"{type(module).__name__} was never prepared for QAT (QATConfig(step='prepare'))")
    module.__class__ = module._lowbit_float_class
    for name in ("_lowbit_float_class", "qat_config", "fake_quant"):
        delattr(module, name)
    return module
