"""Tiny transformers checkpoints written on the fly for the checkpoint and CLI tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_llama_config(tie: bool = True, **overrides):
    import transformers

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tie,
              architectures=["LlamaForCausalLM"])
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def write_tiny_llama(path: Path, tie: bool = True, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides):
    """A random-weight LlamaForCausalLM saved with transformers' own save_pretrained (safetensors);
    ``overrides`` change ``tiny_llama_config``'s fields."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie, **overrides)).to(dtype).eval()
    with torch.no_grad():  # transformers' init gives tiny weights: make the logits informative
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return model


# --- fixtures -----------------------------------------------------------------------------------------

import types  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("transformers")


def _synthetic(path, **kw):
    from lowbit.eval.synthetic import write_random_llama

    return write_random_llama(path, **kw)


@pytest.fixture
def hf():
    """The helpers above, for tests that write their own checkpoints."""
    return types.SimpleNamespace(tiny_llama_config=tiny_llama_config, write_tiny_llama=write_tiny_llama,
                                 write_synthetic_llama=_synthetic)


@pytest.fixture(scope="module")
def glassllm_dir(tmp_path_factory):
    """glassllm-en as a transformers directory (model + tokenizer), written once per module."""
    pytest.importorskip("glassllm")
    from lowbit.eval.models import save_glassllm_hf

    return save_glassllm_hf(tmp_path_factory.mktemp("glassllm") / "glassllm")
