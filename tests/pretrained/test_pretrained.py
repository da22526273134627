"""lowbit checkpoints of transformers models: save_pretrained / from_pretrained / quantize_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit
from lowbit import (
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    PerGroup,
    quantize_,
)
from lowbit.quantize import state_bytes
from lowbit.pretrained import checkpoint_info, from_pretrained, is_lowbit_checkpoint, quantize_pretrained, save_pretrained
from lowbit.serialization import FORMAT_VERSION
from lowbit.tensors.base import QuantizedTensor

transformers = pytest.importorskip("transformers")

MB = 2**20
# the bound: peak RSS <= quantized size + 2 layers + 500 MB
PEAK_ALLOWANCE_BYTES = 500 * MB
MIXED = {"re:.*mlp.*": Int4WeightOnlyConfig(group_size=32), "re:.*self_attn.[qk]_proj": Int8DynamicActivationInt8WeightConfig(),
         "re:.*": Int8WeightOnlyConfig()}


def _ids(n=2, t=12, vocab=96, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load_float(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("config", [Int8WeightOnlyConfig(), MIXED], ids=["int8wo", "mixed"])
def test_streaming_equals_quantize_in_memory(tmp_path, hf, tie, config):
    """quantize_pretrained (tensor by tensor from disk) == quantize_ on the loaded model, bit for bit."""
    hf.write_tiny_llama(tmp_path / "src", tie=tie, max_shard_size="40KB")  # several source shards
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    summary = quantize_pretrained(tmp_path / "src", tmp_path / "q", config, progress=False)
    streamed = from_pretrained(tmp_path / "q")
    ref = quantize_(_load_float(tmp_path / "src"), config)
    ids = _ids()
    assert torch.equal(_logits(streamed, ids), _logits(ref, ids))
    _assert_same_quantized_modules(streamed, ref)
    # a tied head stays float by default, tied to the float embedding (one tensor, read and written once)
    assert len(summary.configs) == (2 * 7 if tie else 2 * 7 + 1) and not summary.skipped
    assert summary.left_float == ({"lm_head": "tied to model.embed_tokens"} if tie else {})
    assert not isinstance(streamed.model.embed_tokens.weight, QuantizedTensor)
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tie
    if tie:
        assert "1 tied weight(s), kept float and tied (lm_head = model.embed_tokens" in summary.message
        assert summary.source_bytes == sum(p.numel() * 4 for p in _load_float(tmp_path / "src").parameters())


def _assert_same_quantized_modules(got_model, ref_model):
    """The same modules carry the same configs and bit-identical quantized weights in both models."""
    configs = {n: m.lowbit_config for n, m in ref_model.named_modules() if hasattr(m, "lowbit_config")}
    assert configs == {n: m.lowbit_config for n, m in got_model.named_modules() if hasattr(m, "lowbit_config")}
    for name in configs:
        got, ref = got_model.get_submodule(name).weight, ref_model.get_submodule(name).weight
        assert type(got) is type(ref) and torch.equal(got.dequantize(), ref.dequantize()), name
        names, _ = ref.__tensor_flatten__()
        assert all(torch.equal(getattr(got, n), getattr(ref, n)) for n in names), name


def test_streaming_tied_head_named_is_quantized_once_for_both(tmp_path, hf):
    """A mapping naming the tied head: one quantized tensor, read once, written once, shared by the embedding on
    load; equal to quantize_ in memory bit for bit."""
    hf.write_tiny_llama(tmp_path / "src", tie=True)
    config = {"lm_head": Int4WeightOnlyConfig(group_size=32), "re:.*": Int8WeightOnlyConfig()}
    summary = quantize_pretrained(tmp_path / "src", tmp_path / "q", config, progress=False)
    ref = quantize_(_load_float(tmp_path / "src"), config)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    streamed = from_pretrained(tmp_path / "q")
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # the tie is restored: one tensor
    assert isinstance(streamed.lm_head.weight, QuantizedTensor)
    assert repr(streamed.model.embed_tokens.lowbit_config) == "Int4WeightOnlyConfig(group_size=32)"
    ids = _ids()
    assert torch.equal(_logits(streamed, ids), _logits(ref, ids))
    _assert_same_quantized_modules(streamed, ref)
    float_bytes = sum(p.numel() * 4 for p in _load_float(tmp_path / "src").parameters())
    assert summary.source_bytes == float_bytes  # the tied tensor was read once
    info = checkpoint_info(tmp_path / "q")
    head = ref.lm_head.weight
    # the quantized bytes on disk are the in-memory model's, where the shared tensor counts once
    assert summary.quantized_bytes == info["quantized_bytes"] == state_bytes(ref)[1]
    assert "model.embed_tokens.weight" not in {k for k in _stored_keys(tmp_path / "q") if ":" not in k}
    assert sum(k.startswith(("lm_head.weight:", "model.embed_tokens.weight:")) for k in _stored_keys(tmp_path / "q")) \
        == len(head.__tensor_flatten__()[0])  # stored once
    # save_pretrained of the in-memory model stores it once too, and loads back tied
    save_pretrained(ref, tmp_path / "saved")
    again = from_pretrained(tmp_path / "saved")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(_logits(again, ids), _logits(ref, ids))


def _stored_keys(out_dir):
    from safetensors import safe_open

    keys = []
    for f in sorted(out_dir.glob("lowbit-*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            keys += list(sf.keys())
    return keys


def test_streaming_group_fallback_and_strict(tmp_path, hf):
    """hidden 96: q/k/v/gate/up/lm_head (96 inputs) can't take groups of 64 and get 32, as in quantize_; strict raises
    before anything is written."""
    hf.write_tiny_llama(tmp_path / "src", tie=False, hidden_size=96)
    config = Int4WeightOnlyConfig(group_size=64)
    with pytest.raises(ValueError, match=r"strict=True: 11 module\(s\).*'model.layers.0.self_attn.q_proj'.*"
                       r"Int4WeightOnlyConfig\(group_size=64\) would fall back to Int4WeightOnlyConfig\(group_size=32\)"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", config, strict=True, progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.warns(UserWarning, match=r"quantize_pretrained: 15 module\(s\) quantized; 11 got a smaller group size"):
        summary = quantize_pretrained(tmp_path / "src", tmp_path / "q", config, progress=False)
    assert len(summary.fallback) == 11
    assert summary.fallback["model.layers.1.mlp.up_proj"] == \
        "Int4WeightOnlyConfig(group_size=64) -> Int4WeightOnlyConfig(group_size=32)"
    assert summary.configs["model.layers.1.mlp.down_proj"] == "Int4WeightOnlyConfig(group_size=64)"
    with pytest.warns(UserWarning, match="11 got a smaller group size"):
        ref = quantize_(_load_float(tmp_path / "src"), config)
    streamed = from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(streamed, _ids()), _logits(ref, _ids()))
    _assert_same_quantized_modules(streamed, ref)


def test_skip_keeps_tied_head_float_and_tied(tmp_path, hf):
    hf.write_tiny_llama(tmp_path / "src", tie=True)
    summary = quantize_pretrained(tmp_path / "src", tmp_path / "q", Int4WeightOnlyConfig(group_size=32),
                                  skip=["lm_head"], progress=False)
    assert summary.skipped == ["lm_head"]
    model = from_pretrained(tmp_path / "q")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # stored once, shared
    ref = quantize_(_load_float(tmp_path / "src"), {"lm_head": None, "re:.*": Int4WeightOnlyConfig(group_size=32)})
    assert torch.equal(_logits(model, _ids()), _logits(ref, _ids()))


def test_skip_regex_and_dtype(tmp_path, hf):
    hf.write_tiny_llama(tmp_path / "src", tie=False)
    s = quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), skip="re:.*down_proj",
                            dtype="bfloat16", progress=False)
    assert s.dtype == "bfloat16" and sorted(s.skipped) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = from_pretrained(tmp_path / "q")
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    ref = quantize_(_load_float(tmp_path / "src", torch.bfloat16), {"re:.*down_proj": None, "re:.*": Int8WeightOnlyConfig()})
    assert torch.equal(_logits(model, _ids()), _logits(ref, _ids()))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "bfloat16"


def test_save_pretrained_round_trip_and_generate(tmp_path, hf):
    model = hf.write_tiny_llama(tmp_path / "src", tie=True)
    quantize_(model, {"lm_head": Float8WeightOnlyConfig(), "re:.*": Int8WeightOnlyConfig(PerGroup(32))})
    out = save_pretrained(model, tmp_path / "q", max_shard_bytes=30_000)  # several shards
    shards = sorted(p.name for p in out.glob("lowbit-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"lowbit-00001-of-{len(shards):05d}.safetensors"
    assert not list(out.glob(".lowbit-part-*"))
    loaded = from_pretrained(out)
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert repr(loaded.lm_head.lowbit_config) == "Float8WeightOnlyConfig()"
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids[:1], **kw), model.generate(ids[:1], **kw))
    assert is_lowbit_checkpoint(out) and not is_lowbit_checkpoint(tmp_path / "src")
    # transformers' own loader must not take it for a float checkpoint
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)


def test_checkpoint_info_reads_metadata_only(tmp_path, hf):
    hf.write_tiny_llama(tmp_path / "src", tie=False)
    s = quantize_pretrained(tmp_path / "src", tmp_path / "q", MIXED, skip=["lm_head"], progress=False)
    info = checkpoint_info(tmp_path / "q")
    assert info["format_version"] == FORMAT_VERSION and info["lowbit_version"] == lowbit.__version__
    assert info["model_type"] == "llama" and info["dtype"] == "float32"
    assert info["configs"] == {"Int4WeightOnlyConfig(group_size=32)": 6, "Int8DynamicActivationInt8WeightConfig()": 4,
                               "Int8WeightOnlyConfig()": 4}
    assert info["bytes"] == s.output_bytes == info["quantized_bytes"] + info["float_bytes"]
    assert "lm_head" not in info["modules"] and info["quantization"]["skip"] == ["lm_head"]
    one = tmp_path / "one.safetensors"
    lowbit.save(from_pretrained(tmp_path / "q"), one)
    assert checkpoint_info(one)["configs"] == info["configs"]


def test_tokenizer_and_other_files_are_copied(tmp_path, glassllm_dir):
    quantize_pretrained(glassllm_dir, tmp_path / "q", Int8WeightOnlyConfig(), progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "q" / name).read_bytes() == (glassllm_dir / name).read_bytes()
    assert not (tmp_path / "q" / "model.safetensors").exists()


# --- errors -------------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path, hf):
    hf.write_tiny_llama(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_pretrained(tmp_path / "nope", tmp_path / "q", Int8WeightOnlyConfig())
    with pytest.raises(TypeError, match="config must be a lowbit config"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", "int8")
    with pytest.raises(ValueError, match=r"dtype='fp32'; allowed"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), dtype="fp32")
    with pytest.raises(ValueError, match="every linear is skipped"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), skip="re:.*")
    with pytest.raises(ValueError, match=r"names modules that do not exist: \['lm_haed'\]"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), skip="lm_haed")
    with pytest.raises(ValueError, match="not a valid regex"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), skip="re:(")
    with pytest.raises(ValueError, match="is the source directory"):
        quantize_pretrained(tmp_path / "src", tmp_path / "src", Int8WeightOnlyConfig())
    quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig())
    quantize_pretrained(tmp_path / "src", tmp_path / "q", Int4WeightOnlyConfig(group_size=32), overwrite=True, progress=False)
    assert len(list((tmp_path / "q").glob("lowbit-*.safetensors"))) == 1
    with pytest.raises(ValueError, match="already a lowbit checkpoint"):
        quantize_pretrained(tmp_path / "q", tmp_path / "q2", Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        from_pretrained(tmp_path / "src")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_a_newer_format_version_or_missing_shard_is_refused(tmp_path, hf):
    hf.write_tiny_llama(tmp_path / "src")
    quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), progress=False)
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lowbit"]["format_version"] = FORMAT_VERSION + 1
    cfg_path.write_text(json.dumps(cfg))
    for fn in (from_pretrained, checkpoint_info):
        with pytest.raises(ValueError, match=f"format_version={FORMAT_VERSION + 1}.*upgrade lowbit"):
            fn(tmp_path / "q")
    cfg["lowbit"]["format_version"] = FORMAT_VERSION
    cfg_path.write_text(json.dumps(cfg))
    next((tmp_path / "q").glob("lowbit-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lacks shard file"):
        from_pretrained(tmp_path / "q")


def test_checkpoint_must_match_the_model_of_its_config(tmp_path, hf):
    hf.write_tiny_llama(tmp_path / "src", tie=False)
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the model now expects a layer the weights lack
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.layers.2.*which the checkpoint lacks"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig())
    cfg["num_hidden_layers"] = 1  # now the weights have a layer the model lacks
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.layers.1.* have no place"):
        quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*convert them"):
        quantize_pretrained(tmp_path / "bin", tmp_path / "q", Int8WeightOnlyConfig())


def test_a_model_without_linears_is_refused(tmp_path):
    """GPT-2's blocks use transformers' Conv1D, not nn.Linear; GPT2Model has no head either."""
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     architectures=["GPT2Model"])
    transformers.GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"model type 'gpt2' \(GPT2Model\) has no nn.Linear modules.*Conv1D"):
        quantize_pretrained(tmp_path / "gpt2", tmp_path / "q", Int8WeightOnlyConfig())


# --- memory -------------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, transformers  # noqa: F401  (imported before the baseline is read)
    from lowbit import Int8WeightOnlyConfig
    from lowbit.pretrained import quantize_pretrained

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def peak():  # VmHWM: this process image's high-water mark (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    # warm-up on a tiny checkpoint: imports transformers' llama code and loads lowbit's kernels
    quantize_pretrained(sys.argv[4], sys.argv[5], Int8WeightOnlyConfig(), progress=False)
    base = rss()
    s = quantize_pretrained(sys.argv[1], sys.argv[2], Int8WeightOnlyConfig(), progress=False,
                            max_shard_bytes=int(sys.argv[3]))
    print(json.dumps({"peak": peak(), "base": base,
                      "output": s.output_bytes, "source": s.source_bytes, "shards": len(s.shards)}))
""")


@pytest.mark.slow
def test_streaming_peak_memory_is_bounded(tmp_path, hf):
    """A ~560 MB float32 sharded checkpoint quantized in a fresh process: peak RSS within the issue's bound
    (quantized size + 2 layers + 500 MB), and the growth over the process's start is far below the float size."""
    sizes = hf.write_synthetic_llama(tmp_path / "src", hidden=1024, intermediate=4096, layers=8, vocab=12000,
                                     shard_bytes=128 * MB)
    hf.write_tiny_llama(tmp_path / "tiny", tie=False)
    shard = 64 * MB
    args = [tmp_path / "src", tmp_path / "q", shard, tmp_path / "tiny", tmp_path / "tiny-q"]
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *map(str, args)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["source"] == sizes["total_bytes"] > 500 * MB
    assert r["shards"] > 1
    assert r["peak"] <= r["output"] + 2 * sizes["layer_bytes"] + PEAK_ALLOWANCE_BYTES, r
    # what streaming holds: one float tensor and its quantization temporaries, one output shard
    growth = r["peak"] - r["base"]
    assert growth <= shard + 4 * sizes["largest_bytes"] + 64 * MB, r
    assert growth < r["source"] / 2, r


# --- compatibility ------------------------------------------------------------------------------------

# logits of the kept checkpoint vs the logits stored when it was written (a later kernel may round
# differently; the weights themselves must dequantize exactly)
COMPAT_LOGITS_SQNR_DB = 40.0


def test_kept_v1_checkpoint_directory_still_loads():
    """tests/data/llama_tiny_v1 was written by format version 1 (tests/data/make_llama_tiny_v1.py): every
    config class, an aliased tied head; weights must dequantize bit for bit to what was saved."""
    from pathlib import Path

    from safetensors.torch import load_file

    data = Path(__file__).resolve().parents[1] / "data"
    model = from_pretrained(data / "llama_tiny_v1")
    io_ = load_file(data / "llama_tiny_v1_io.safetensors")
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "lowbit_config")}
    assert len(quantized) == 14 == sum(k.startswith("dequant:") for k in io_)
    for name, m in quantized.items():
        assert torch.equal(m.weight.dequantize(), io_[f"dequant:{name}"]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert repr(model.model.layers[0].self_attn.o_proj.lowbit_config) == (
        "Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=3)")
    with torch.no_grad():
        logits = model(input_ids=io_["input_ids"]).logits
    assert lowbit.sqnr(io_["logits"], logits) >= COMPAT_LOGITS_SQNR_DB
    assert checkpoint_info(data / "llama_tiny_v1")["format_version"] == 1


# --- packed grouped-query attention ---------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_gqa_attention_equals_sdpa_in_decode(hf, compiled):
    """The "lowbit_sdpa" attention gives sdpa's logits over a prompt and 6 decode steps with a static cache
    (equal in eager; compiled: equal to compiled sdpa) and keeps the mask (no mask would read empty slots)."""
    from lowbit.pretrained import use_packed_gqa_attention

    def run(impl, comp):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(hf.tiny_llama_config(True)).to(torch.bfloat16).eval()
        if impl == "lowbit":
            assert use_packed_gqa_attention(model) == "lowbit_sdpa"
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)

        def step(ids, pos):
            return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1]

        fn = torch.compile(step, dynamic=False) if comp else step
        with torch.no_grad():
            outs = [step(_ids(1, 10), torch.arange(10))]
            for i in range(6):
                outs.append(fn(outs[-1].argmax(-1, keepdim=True), torch.tensor([10 + i])))
        return torch.stack(outs)

    assert torch.equal(run("lowbit", compiled), run("sdpa", compiled))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_loaded_weights_are_advised_onto_huge_pages(tmp_path, hf):
    """from_pretrained advises the quantized weights it makes onto 2 MiB pages, as quantize_ does
    (lowbit.kernels.hugepages), before any forward."""
    from lowbit.kernels import hugepages

    if hugepages.advise(torch.zeros(hugepages.MIN_BYTES + hugepages.HUGE_PAGE, dtype=torch.uint8)) == 0:
        pytest.skip("this kernel refuses MADV_HUGEPAGE (no transparent huge pages)")
    hf.write_tiny_llama(tmp_path / "src", num_hidden_layers=1, intermediate_size=98304, dtype=torch.bfloat16)  # 6 MiB int8
    quantize_pretrained(tmp_path / "src", tmp_path / "q", Int8WeightOnlyConfig(), progress=False)
    assert hugepages.advised(from_pretrained(tmp_path / "q").model.layers[0].mlp.gate_proj.weight.qdata)
