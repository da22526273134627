"""Writes llama_tiny_v1/ (a lowbit checkpoint directory of format version 1, by ``save_pretrained``) and
llama_tiny_v1_io.safetensors (input ids, the logits, every quantized module's dequantized weight), kept
so later versions prove they still load it. Run once from the repo root: python tests/data/make_llama_tiny_v1.py"""

import shutil

import torch
import transformers
from safetensors.torch import save_file

from lowbit import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    PerGroup,
    PerTensor,
    quantize_,
)
from lowbit.pretrained import save_pretrained

# one config per projection kind, so that every tensor class and most attributes are in the file
CONFIGS = {
    "lm_head": None,  # tied to the embedding, stays float: stored once, as an alias
    "re:.*0.self_attn.q_proj": Int8WeightOnlyConfig(),
    "re:.*0.self_attn.k_proj": Int8WeightOnlyConfig(PerGroup(32)),
    "re:.*0.self_attn.v_proj": Int8DynamicActivationInt8WeightConfig(act_symmetric=False),
    "re:.*0.self_attn.o_proj": Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=3),
    "re:.*0.mlp.gate_proj": Int4WeightOnlyConfig(group_size=32),
    "re:.*0.mlp.up_proj": Int4WeightOnlyConfig(group_size=64, symmetric=True),
    "re:.*0.mlp.down_proj": Int8DynamicActivationInt4WeightConfig(group_size=32),
    "re:.*1.self_attn.q_proj": Float8WeightOnlyConfig(),
    "re:.*1.self_attn.k_proj": Float8WeightOnlyConfig(PerTensor(), dtype=torch.float8_e5m2),
    "re:.*1.self_attn.v_proj": Float8DynamicActivationFloat8WeightConfig(),
    "re:.*1.self_attn.o_proj": Float8StaticActivationFloat8WeightConfig(act_scale=0.01),
    "re:.*1.mlp.gate_proj": Float8DynamicActivationInt4WeightConfig(group_size=32),
    "re:.*1.mlp.up_proj": Int4WeightOnlyConfig(group_size=128),
    "re:.*1.mlp.down_proj": Int8WeightOnlyConfig(PerTensor()),
}

if __name__ == "__main__":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    quantize_(model, CONFIGS)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    shutil.rmtree("tests/data/llama_tiny_v1", ignore_errors=True)
    save_pretrained(model, "tests/data/llama_tiny_v1")
    dequant = {f"dequant:{n}": m.weight.dequantize() for n, m in model.named_modules() if hasattr(m, "lowbit_config")}
    save_file({"input_ids": ids, "logits": logits, **dequant}, "tests/data/llama_tiny_v1_io.safetensors")
