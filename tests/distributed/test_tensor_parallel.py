"""Tensor parallel quantized linears on 2 gloo ranks against 1 process (lowbit.tensor_parallel):
colwise and rowwise per config, a group-straddling rowwise split refused, and glassllm's greedy tokens."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.eval import sqnr
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.quantize import quantize_
from lowbit.tensor_parallel import allowed_shard_counts, shard_bounds

sys.path.insert(0, str(Path(__file__).parent))
import lowbit_dist_harness as harness  # noqa: E402

# 2 ranks vs 1 in float32: the same quantized values, only the order of the final sum differs
MIN_TP_SQNR_DB = 60.0

CONFIGS = {
    "int8-wo": Int8WeightOnlyConfig(),
    "int8-wo-tensor": Int8WeightOnlyConfig(granularity=PerTensor()),  # one scale: replicated
    "int8-wo-g32": Int8WeightOnlyConfig(granularity=PerGroup(32)),
    "int8-w8a8": Int8DynamicActivationInt8WeightConfig(),
    "int8-static": Int8StaticActivationInt8WeightConfig(act_scale=0.05),  # act_scale replicated
    "int4-wo-g32": Int4WeightOnlyConfig(group_size=32),
    "8da4w-g32": Int8DynamicActivationInt4WeightConfig(group_size=32),
    "float8-wo-row": Float8WeightOnlyConfig(),
    "float8-wo-tensor": Float8WeightOnlyConfig(granularity=PerTensor()),
    "float8-dyn-row": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    "float8-dyn-tensor": Float8DynamicActivationFloat8WeightConfig(),
}
# (measured 130-135 dB for all: the dynamic activation configs' rowwise layer all-reduces each
# token's min/max, without which they measured 30-44 dB)


def _mlp(config):
    """Linear(128, 192) -> Linear(192, 64), quantized; the same on every rank (192 = 6 groups of 32:
    2 ranks take 3 each)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192, bias=True), nn.Linear(192, 64, bias=True))
    quantize_(model, config)
    return model


def _linears_worker(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lowbit.tensor_parallel import parallelize_quantized

    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, config in CONFIGS.items():
        model = _mlp(config)
        ref = model(x)
        parallelize_quantized(model, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
        out[name] = (ref, model(x), type(model[0].weight.to_local()).__name__)
    return out, _straddle(mesh, path)


def test_linear_colwise_rowwise_match_one_process(tmp_path):
    from lowbit.serialization import save

    save(_straddle_model(), tmp_path / "straddle.safetensors")
    results, messages = zip(*harness.run(_linears_worker, str(tmp_path / "straddle.safetensors")))
    # a rowwise split through an int4 group, in the model or in a checkpoint: the layer and the counts that work
    for message in [m for pair in messages for m in pair]:
        assert message is not None and message.startswith("1: rowwise"), message
        assert "allowed shard counts for this layer: [1, 3]" in message, message
    for name in CONFIGS:
        for rank, res in enumerate(results):
            ref, tp, local_cls = res[name]
            assert local_cls.endswith("Tensor") and local_cls != "Tensor"
            assert sqnr(ref, tp) >= MIN_TP_SQNR_DB, (name, rank, sqnr(ref, tp))
        assert torch.equal(results[0][name][1], results[1][name][1]), name


def test_allowed_shard_counts_follow_groups():
    w = Int4WeightOnlyConfig(group_size=32)
    model = nn.Sequential(nn.Linear(96, 8))
    quantize_(model, w)
    weight = model[0].weight
    assert allowed_shard_counts(weight, 1) == [1, 3]  # 96 = 3 groups of 32: 2 ranks would split one
    # rows: torch.chunk's split of 8 over 5, 6 or 7 ranks (2 each) leaves the last rank none
    assert allowed_shard_counts(weight, 0) == [1, 2, 3, 4, 8]
    assert shard_bounds(341, 0, 2) == (0, 171) and shard_bounds(341, 1, 2) == (171, 341)


def _straddle_model():
    model = nn.Sequential(nn.Linear(32, 96), nn.Linear(96, 32))
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    return model


def _straddle(mesh, path):
    """The errors of a rowwise plan whose split of in_features=96 (3 int4 groups of 32) over 2 ranks
    would cut the middle group: parallelizing the quantized model, loading its checkpoint by slices."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lowbit.tensor_parallel import load_tensor_parallel, parallelize_quantized

    plan = {"0": ColwiseParallel(), "1": RowwiseParallel()}
    messages = []
    for run in (lambda: parallelize_quantized(_straddle_model(), mesh, plan),
                lambda: load_tensor_parallel(nn.Sequential(nn.Linear(32, 96), nn.Linear(96, 32)), path, mesh, plan)):
        try:
            run()
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


# glassllm: 8da4w g32 on attention (in_features 128), int4 g32 weight-only on gate/up, W8A8 per-row
# on down_proj (in_features 341 = 171 + 170 on 2 ranks: no int4 group size divides it); the tied
# lm_head stays float. The rowwise o_proj and down_proj quantize activations dynamically.
GLASS = {"re:.*down_proj": Int8DynamicActivationInt8WeightConfig(),
         "re:.*self_attn.*": Int8DynamicActivationInt4WeightConfig(group_size=32),
         "re:.*proj": Int4WeightOnlyConfig(group_size=32)}
STEPS = 8


def _llama_plan(model) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        plan.update({p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                     p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                     p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                     p + "mlp.down_proj": RowwiseParallel()})
    return plan


def _greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids, logits


def _glass_model():
    from lowbit.eval import load_glassllm_hf

    model, tok = load_glassllm_hf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied lm_head stays float
        quantize_(model, GLASS)
    return model, torch.tensor([tok.encode("It is a truth universally")])


def _glass_worker(rank, world, path, out):
    """glassllm loaded from a whole lowbit checkpoint into a float model by slices, parallelized,
    8 greedy steps, then saved rank by rank (``save_sharded``) to ``out``."""
    from torch.distributed.device_mesh import init_device_mesh

    from lowbit.distributed import save_sharded
    from lowbit.eval import load_glassllm_hf
    from lowbit.tensor_parallel import load_tensor_parallel

    model, tok = load_glassllm_hf()
    ids = torch.tensor([tok.encode("It is a truth universally")])
    load_tensor_parallel(model, path, init_device_mesh("cpu", (world,)), _llama_plan(model))
    layer = model.model.layers[0]
    locals_ = {n: getattr(layer, a).__getattr__(n).weight.to_local()
               for a, n in [("self_attn", "o_proj"), ("self_attn", "q_proj"), ("mlp", "down_proj")]}
    result = _greedy(model, ids, STEPS) + (locals_,)
    save_sharded(model, out)
    return result


def test_glassllm_tensor_parallel_greedy_tokens_match_one_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("glassllm")
    from lowbit.serialization import save

    model, ids = _glass_model()
    save(model, tmp_path / "glass.safetensors")
    results = harness.run(_glass_worker, str(tmp_path / "glass.safetensors"), str(tmp_path / "tp"))
    ref_ids, ref_logits = _greedy(model, ids, STEPS)
    layer = model.model.layers[0]
    full = {"o_proj": (layer.self_attn.o_proj.weight, 1), "q_proj": (layer.self_attn.q_proj.weight, 0),
            "down_proj": (layer.mlp.down_proj.weight, 1)}
    for rank, (tp_ids, tp_logits, locals_) in enumerate(results):
        assert torch.equal(tp_ids, ref_ids)
        assert sqnr(ref_logits, tp_logits) >= MIN_TP_SQNR_DB
        for name, (w, d) in full.items():  # each rank's slice of the checkpoint is that of the whole weight
            start, stop = shard_bounds(w.shape[d], rank, 2)
            part = w.narrow(d, start, stop - start)
            assert type(locals_[name]) is type(w) and locals_[name].shape == part.shape, name
            for n in ("qdata", "scale", "zero_point"):
                if getattr(w, n, None) is not None:
                    assert torch.equal(getattr(locals_[name], n), getattr(part, n)), (name, n)
    # the tensor-parallel model saved rank by rank loads back (one process) as the whole weights
    from lowbit.distributed import load_sharded
    from lowbit.eval import load_glassllm_hf

    back = load_sharded(load_glassllm_hf()[0], tmp_path / "tp")
    want = model.state_dict()
    for key, t in back.state_dict().items():
        w = want[key]
        assert type(t) is type(w), key
        names = w.__tensor_flatten__()[0] if hasattr(w, "__tensor_flatten__") else None
        for n in names or []:
            assert torch.equal(getattr(t, n), getattr(w, n)), (key, n)
        if names is None:
            assert torch.equal(t, w), key
