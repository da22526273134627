"""Quantization configs; importing this package registers every config's handler."""

from lowbit.configs.base import QuantConfig, get_handler, register_handler, registered_configs
from lowbit.configs.int8 import (
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)

__all__ = [
    "QuantConfig",
    "register_handler",
    "get_handler",
    "registered_configs",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8StaticActivationInt8WeightConfig",
]
