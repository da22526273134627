"""A random-weight, sharded Llama checkpoint written tensor by tensor, for memory and speed measurements.

Random weights say nothing about accuracy (use ``lowbit.eval.models`` for that); they are for
measuring the streaming quantizer's peak memory and kernels' speed on checkpoints of any size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["write_random_llama"]


def write_random_llama(path: str | Path, *, hidden: int, intermediate: int, layers: int, vocab: int,
                       shard_bytes: int = 2**30, seed: int = 0) -> dict:
    """Write a float32 ``LlamaForCausalLM`` checkpoint (config.json, safetensors shards, an index).

    Tensors are drawn one at a time (``randn / sqrt(fan_in)``, norms ``randn``) and written when a
    shard fills, so writing never holds more than one shard. Heads of 64 dims, ``hidden // 256``
    KV heads (at least 1), untied head.

    Returns:
        ``{"total_bytes", "layer_bytes" (one decoder layer), "largest_bytes" (the largest tensor)}``.

    Raises:
        ImportError: transformers is missing (it writes config.json).
    """
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
        max_position_embeddings=4096, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    config.save_pretrained(path)
    kv = config.num_key_value_heads * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen)
        if len(shape) == 2:
            t /= math.sqrt(shape[1])
        nbytes = t.numel() * 4
        if size + nbytes > shard_bytes:
            flush()
        shard[key] = t
        size += nbytes
        total += nbytes
    flush()
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    layer_bytes = sum(math.prod(s) * 4 for k, s in shapes.items() if k.startswith("model.layers.0."))
    return {"total_bytes": total, "layer_bytes": layer_bytes, "largest_bytes": max(math.prod(s) * 4 for s in shapes.values())}
