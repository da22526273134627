import math

import pytest
import torch
from torch import nn

from lowbit.eval.perplexity import perplexity


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
