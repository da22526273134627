import math

import pytest
import torch

from lowbit.eval.metrics import classifier_agreement, embedding_cosine, sqnr


def test_known_value():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert sqnr(ref, ref + torch.tensor([0.05, 0.0])) == pytest.approx(40.0)  # 20 log10(100)


def test_equal_and_zero_signal():
    x = torch.randn(8)
    assert sqnr(x, x.clone()) == math.inf
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf


def test_mixed_dtypes_and_shape_error():
    x = torch.randn(16)
    assert sqnr(x, x.bfloat16()) > 40
    with pytest.raises(ValueError, match="shape"):
        sqnr(torch.zeros(3), torch.zeros(4))


# --- embedding_cosine, classifier_agreement -----------------------------------------------------

def test_embedding_cosine_known_values():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    act = torch.tensor([[2.0, 0.0], [0.0, -1.0], [4.0, -3.0]])  # cosines 1, -1, 0
    assert embedding_cosine(ref, act) == pytest.approx(0.0, abs=1e-12)
    assert embedding_cosine(ref, act, reduction="min") == -1.0
    expected = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    assert torch.equal(embedding_cosine(ref, act, reduction="none"), expected)
    assert embedding_cosine(ref, ref.bfloat16()) == pytest.approx(1.0, abs=1e-3)  # mixed dtypes, float64 math


def test_embedding_cosine_rows_and_zeros():
    x = torch.randn(2, 3, 8)
    per_row = embedding_cosine(x, -x, reduction="none")
    assert per_row.shape == (2, 3) and torch.allclose(per_row, -torch.ones(2, 3, dtype=torch.float64))
    assert embedding_cosine(torch.zeros(1, 4), torch.ones(1, 4)) == 0.0  # a zero row scores 0, not NaN
    assert embedding_cosine(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])) == pytest.approx(1.0)  # 1-D: one row


def test_embedding_cosine_errors():
    with pytest.raises(ValueError, match=r"reference shape \(2, 3\) != actual shape \(2, 4\)"):
        embedding_cosine(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-empty"):
        embedding_cosine(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-empty"):
        embedding_cosine(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="reduction='sum'"):
        embedding_cosine(torch.ones(2, 3), torch.ones(2, 3), reduction="sum")
    with pytest.raises(TypeError, match="actual must be a real-valued tensor"):
        embedding_cosine(torch.ones(2, 3), [[1.0] * 3] * 2)
    with pytest.raises(TypeError, match="complex"):
        embedding_cosine(torch.ones(2, 3, dtype=torch.complex64), torch.ones(2, 3, dtype=torch.complex64))


def test_classifier_agreement_known_values():
    ref = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    act = torch.tensor([[0.2, 0.8], [0.1, 0.9], [0.0, 1.0], [0.9, 0.1]])  # argmax 1,1,1,0 vs 1,0,1,0
    assert classifier_agreement(ref, act) == 0.75
    assert classifier_agreement(ref, ref.bfloat16()) == 1.0
    assert classifier_agreement(torch.randn(2, 3, 5), torch.randn(2, 3, 5)) in {i / 6 for i in range(7)}
    tie = torch.tensor([[1.0, 1.0]])  # ties go to the first class on both sides
    assert classifier_agreement(tie, torch.tensor([[2.0, 1.0]])) == 1.0


def test_classifier_agreement_errors():
    with pytest.raises(ValueError, match=r"ref_logits shape \(4, 10\) != logits shape \(4, 9\)"):
        classifier_agreement(torch.zeros(4, 10), torch.zeros(4, 9))
    with pytest.raises(ValueError, match=r"\(N, C\)"):  # labels, not logits
        classifier_agreement(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
    with pytest.raises(ValueError, match="non-empty"):
        classifier_agreement(torch.zeros(0, 10), torch.zeros(0, 10))
    with pytest.raises(TypeError, match="ref_logits must be a real-valued tensor"):
        classifier_agreement(None, torch.zeros(1, 2))
