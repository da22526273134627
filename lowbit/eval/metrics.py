"""Accuracy metrics."""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr", "embedding_cosine", "classifier_agreement"]


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(||ref|| / ||ref - actual||)``.

    Computed in float64. Returns ``inf`` when the tensors are equal, ``-inf`` when the reference
    is all zeros and ``actual`` is not.

    Raises:
        ValueError: shapes differ.
    """
    if reference.shape != actual.shape:
        raise ValueError(f"reference shape {tuple(reference.shape)} != actual shape {tuple(actual.shape)}")
    ref = reference.detach().double()
    noise = torch.linalg.vector_norm(ref - actual.detach().double()).item()
    signal = torch.linalg.vector_norm(ref).item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


def _check_pair(fn: str, names: tuple[str, str], a, b, min_dim: int, what: str) -> None:
    for name, t in zip(names, (a, b)):
        if not isinstance(t, torch.Tensor) or t.is_complex() or t.dtype == torch.bool:
            got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{fn}: {name} must be a real-valued tensor {what}, got {got}")
    if a.shape != b.shape:
        raise ValueError(f"{fn}: {names[0]} shape {tuple(a.shape)} != {names[1]} shape {tuple(b.shape)}")
    if a.dim() < min_dim or a.numel() == 0:
        raise ValueError(f"{fn}: {names[0]} must be a non-empty tensor {what}, got shape {tuple(a.shape)}")


_REDUCTIONS = ("mean", "min", "none")


def embedding_cosine(reference: torch.Tensor, actual: torch.Tensor, reduction: str = "mean"):
    """Cosine similarity between matching rows of two embedding matrices, in float64.

    Each row (the last dimension; leading dimensions are flattened into rows) of ``actual`` is
    compared with the same row of ``reference``: ``a.b / max(|a| |b|, 1e-12)``, so a row of zeros
    scores 0.

    Args:
        reference: ``(..., d)`` embeddings of the float model.
        actual: the same shape, e.g. from the quantized model.
        reduction: ``"mean"`` (a float), ``"min"`` (the worst row, a float) or ``"none"`` (float64
            tensor of the per-row cosines, shape ``reference.shape[:-1]``).

    Returns:
        A float in [-1, 1], or a tensor for ``reduction="none"``.

    Raises:
        TypeError: an argument is not a real-valued tensor.
        ValueError: shapes differ; a tensor is 0-d or empty; ``reduction`` is not mean/min/none.

    Example:
        >>> embedding_cosine(enc_fp32.embed(sentences), enc_int8.embed(sentences))  # e.g. 0.998
    """
    _check_pair("embedding_cosine", ("reference", "actual"), reference, actual, 1, "(..., d)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"embedding_cosine: reduction={reduction!r}; allowed: {', '.join(_REDUCTIONS)}")
    a, b = reference.detach().double(), actual.detach().double()
    cos = (a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp_min(1e-12)
    if reduction == "none":
        return cos
    return (cos.mean() if reduction == "mean" else cos.min()).item()


def classifier_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of samples whose predicted class (argmax over the last dimension) is the same.

    Args:
        ref_logits: ``(N, C)`` (or ``(..., C)``) scores of the reference model.
        logits: the same shape, e.g. from the quantized model.

    Returns:
        A float in [0, 1]; 1.0 when every prediction agrees. Ties go to the first maximal class.

    Raises:
        TypeError: an argument is not a real-valued tensor.
        ValueError: shapes differ; a tensor is not at least 2-D ``(N, C)`` (class labels are not
            logits) or is empty.

    Example:
        >>> classifier_agreement(model(images), qmodel(images))  # e.g. 0.9988
    """
    _check_pair("classifier_agreement", ("ref_logits", "logits"), ref_logits, logits, 2, "of logits (N, C)")
    same = ref_logits.detach().argmax(-1) == logits.detach().argmax(-1)
    return same.double().mean().item()
