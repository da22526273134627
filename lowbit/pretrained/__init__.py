"""Quantized transformers checkpoints on disk: save, load, and quantize a checkpoint by streaming it.

A lowbit checkpoint is a directory:

* ``config.json``: the model's transformers config, with a ``"lowbit"`` entry (format version,
  lowbit version, the float dtype, the shard files, the quantization that made it);
* ``lowbit-00001-of-0000N.safetensors``: shards in lowbit's safetensors format (plain tensors and
  JSON metadata, see ``lowbit.serialization``); each shard's metadata describes the tensors it
  holds and the configs of the modules whose weights it holds;
* the source's other files (tokenizer, generation config, chat template), copied unchanged.

The weight files are deliberately not named ``model.safetensors``: transformers' own
``from_pretrained`` on such a directory fails with "no file named model.safetensors" instead of
loading quantized parts as garbage. Load with :func:`from_pretrained`.

:func:`quantize_pretrained` reads a float checkpoint one tensor at a time (each source shard is
opened, one tensor read, and closed again, so no mapped file stays resident) and writes the
quantized shards as they fill: peak memory is about one layer's float weights plus one output
shard, whatever the model's size.
"""

from lowbit.pretrained.attention import PACKED_GQA_ATTENTION, use_packed_gqa_attention
from lowbit.pretrained.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    checkpoint_info,
    from_pretrained,
    is_lowbit_checkpoint,
    save_pretrained,
    summarize_configs,
)
from lowbit.pretrained.streaming import QuantizeSummary, quantize_pretrained

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "quantize_pretrained",
    "checkpoint_info",
    "is_lowbit_checkpoint",
    "summarize_configs",
    "use_packed_gqa_attention",
    "PACKED_GQA_ATTENTION",
    "QuantizeSummary",
    "DEFAULT_MAX_SHARD_BYTES",
]
