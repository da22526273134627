"""calibration_batches: fixed-length windows from token ids or text."""

import pytest
import torch

from lowbit.algorithms import calibration_batches
from lowbit.eval import glassllm_tokenizer


def test_windows_are_slices_of_the_stream_and_seeded():
    ids = torch.arange(1000)
    a = calibration_batches(ids, n_samples=16, seq_len=32, seed=3)
    assert a.shape == (16, 32) and a.dtype == torch.int64
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, -1))  # consecutive tokens
    assert int(a.min()) >= 0 and int(a.max()) <= 999
    assert torch.equal(a, calibration_batches(ids, n_samples=16, seq_len=32, seed=3))
    assert not torch.equal(a, calibration_batches(ids, n_samples=16, seq_len=32, seed=4))


def test_a_window_as_long_as_the_stream():
    ids = torch.arange(8)
    assert torch.equal(calibration_batches(ids, n_samples=2, seq_len=8), ids.expand(2, -1))


def test_text_with_a_tokenizer():
    tok = glassllm_tokenizer()  # an object with .encode only
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20
    out = calibration_batches(text, tok, n_samples=4, seq_len=16)
    ids = torch.tensor(tok.encode(text))
    for row in out:
        starts = [i for i in range(ids.numel() - 15) if torch.equal(ids[i : i + 16], row)]
        assert starts
    hf_like = lambda s: {"input_ids": tok.encode(s)}  # noqa: E731  (a transformers tokenizer's call)
    assert torch.equal(calibration_batches(text, hf_like, n_samples=4, seq_len=16), out)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(tokens_or_text="abc"), ValueError, "pass tokenizer="),
    (dict(tokens_or_text=torch.arange(10), tokenizer=str.split), ValueError, "tokenizer= must be None"),
    (dict(tokens_or_text=torch.rand(10)), TypeError, "must be integers"),
    (dict(tokens_or_text=torch.arange(10).view(2, 5)), ValueError, "must be 1-D"),
    (dict(tokens_or_text=[1, 2, 3]), TypeError, "must be a str or a 1-D integer tensor"),
    (dict(tokens_or_text=torch.arange(10), seq_len=11), ValueError, "10 tokens, fewer than seq_len=11"),
    (dict(tokens_or_text=torch.arange(10), n_samples=0), ValueError, "n_samples=0"),
    (dict(tokens_or_text=torch.arange(10), seq_len=True), ValueError, "seq_len=True"),
    (dict(tokens_or_text=torch.arange(10), seed=1.5), ValueError, "seed=1.5"),
])
def test_errors(kwargs, err, match):
    kwargs.setdefault("seq_len", 4)
    with pytest.raises(err, match=match):
        calibration_batches(**kwargs)
