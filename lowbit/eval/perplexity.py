"""Perplexity of a causal language model over non-overlapping windows of a token stream."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["perplexity"]


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name}={value!r} must be {allowed}")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    *,
    batch_size: int = 8,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood, in float64.

    Window ``w`` feeds ``token_ids[w*L : (w+1)*L]`` and scores the same span shifted by one
    token, so windows never overlap and every scored token sees only its own window as context.
    ``model(ids: (B, L)) -> logits (B, L, vocab)``; log-softmax runs on the logits in float64.

    Args:
        model: a causal LM taking a LongTensor ``(B, L)``; run under ``torch.no_grad``.
        token_ids: 1-D integer tensor with at least ``seq_len + 1`` tokens.
        seq_len: tokens per window (``L``).
        max_windows: use only the first this many windows; None for all ``(N - 1) // L``.
        batch_size: windows per forward pass (does not change the result beyond float rounding).

    Returns:
        The perplexity, a float >= 1.

    Raises:
        TypeError: ``token_ids`` is not an integer tensor.
        ValueError: ``token_ids`` is not 1-D or is shorter than ``seq_len + 1``; ``seq_len``,
            ``max_windows`` or ``batch_size`` is not a positive int; logits of the wrong shape.

    Example:
        >>> ppl = perplexity(model, torch.tensor(tokenizer.encode(text)), seq_len=128, max_windows=8)
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
        got = f"{token_ids.dtype} tensor" if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise TypeError(f"token_ids must be a 1-D integer tensor, got {got}")
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    _positive_int("seq_len", seq_len)
    _positive_int("max_windows", max_windows, allow_none=True)
    _positive_int("batch_size", batch_size)
    n_windows = (token_ids.numel() - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"token_ids has {token_ids.numel()} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)

    param = next(model.parameters(), None)
    device = param.device if param is not None else token_ids.device
    ids = token_ids.long().to(device)
    inputs = ids[: n_windows * seq_len].view(n_windows, seq_len)
    targets = ids[1 : n_windows * seq_len + 1].view(n_windows, seq_len)

    total_nll = 0.0
    for start in range(0, n_windows, batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        logits = model(x)
        if logits.shape[:2] != x.shape or logits.dim() != 3:
            expected = f"({x.shape[0]}, {seq_len}, vocab)"
            raise ValueError(f"model returned logits of shape {tuple(logits.shape)}; expected {expected}")
        logp = logits.double().log_softmax(dim=-1)
        total_nll -= logp.gather(-1, y.unsqueeze(-1)).sum().item()
    return math.exp(total_nll / (n_windows * seq_len))
