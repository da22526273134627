"""Accuracy metrics."""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr"]


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
