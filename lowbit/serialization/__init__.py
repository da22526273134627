"""Saving and loading quantized models.

Two routes:

* ``torch.save(model.state_dict(), path)`` then ``torch.load(path, weights_only=True)``: every
  lowbit tensor class, spec, granularity, enum and config is registered as a safe global when
  ``lowbit`` is imported, so the safe unpickler accepts them. Load into a model built on the
  ``meta`` device with ``model.load_state_dict(sd, assign=True)``.
* ``save(model, path)`` / ``load(model, path)``: a safetensors file of plain tensors (a quantized
  tensor ``w`` is stored as ``w:qdata``, ``w:scale``, ...) with JSON metadata holding the format
  version, each quantized tensor's entry (class, shape, dtype, specs, parts) and each module's
  config. No pickle is involved. ``load`` works on a float model or one built on ``meta``.

The format is a contract, not a dump of Python attributes:

* ``schema``: per tensor class, the fields, allowed dtypes, the shape of every part as a function
  of the logical shape and the specs, allowed specs and group sizes, and the value checks of
  scales and zero points; checked before any tensor is built, with part shapes compared to the
  sizes the file declares (so a declared size never allocates);
* ``codec``: JSON values (dtypes, specs, granularities, configs) through allow-lists of class
  names, field names, field types and dtype names;
* run-time choices (``KernelPreference``) are not part of a file; loaded tensors and configs get
  the default;
* ``migrate``: older versions are rewritten into the current one on load, saying so in the log;
  it also gives a tensor that ``torch.save`` pickled in an older lowbit the fields it lacks when
  ``torch.load`` restores it.

Every problem with a file is one :class:`CheckpointError` (a ``ValueError``) naming the file, the
tensor or module key and what is allowed.

Format versions: 1 (lowbit 0.1: kernel preference stored, no weight spec on tensors) and 2 (this
one). A file with a newer version raises; old versions stay loadable (``tests/data`` keeps a
checkpoint of every version).
"""

from __future__ import annotations

import torch

from lowbit.configs.base import config_classes
from lowbit.dtypes import QDType
from lowbit.kernels.preference import KernelPreference
from lowbit.serialization.codec import GRANULARITIES, CheckpointError, decode_config, encode_config
from lowbit.serialization.files import (
    FORMAT_VERSION,
    apply_state,
    check_format_version,
    file_header,
    flatten_tensor,
    load,
    read_header,
    read_headers,
    read_state,
    save,
    tensor_identity,
)
from lowbit.serialization.migrate import upgrade_pickled_state
from lowbit.serialization.schema import TENSOR_CLASSES
from lowbit.spec import QuantSpec
from lowbit.tensors.base import register_state_upgrader

__all__ = [
    "save",
    "load",
    "FORMAT_VERSION",
    "CheckpointError",
    "register_safe_globals",
    "flatten_tensor",
    "file_header",
    "read_header",
    "read_headers",
    "read_state",
    "apply_state",
    "check_format_version",
    "encode_config",
    "decode_config",
    "tensor_identity",
]


def register_safe_globals() -> None:
    """Allow lowbit's classes in ``torch.load(..., weights_only=True)``."""
    torch.serialization.add_safe_globals(
        [*TENSOR_CLASSES.values(), QuantSpec, QDType, *GRANULARITIES, KernelPreference, *config_classes()]
    )


register_safe_globals()
register_state_upgrader(upgrade_pickled_state)
