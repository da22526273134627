"""Calibration samples for the algorithms that look at data (GPTQ): fixed-length token windows.

Calibration and evaluation text must differ: a model quantized on the very windows it is then
scored on is fitted to them, and its perplexity says little about any other text. Take the two
from different texts, or from disjoint parts of one (e.g. calibrate on the last tenth of a text
and evaluate on the first ninth).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["calibration_batches"]


def _token_ids(source, tokenizer) -> torch.Tensor:
    if isinstance(source, str):
        if tokenizer is None:
            raise ValueError("tokens_or_text is a str: pass tokenizer= (a transformers tokenizer, or a callable or "
                             "object with .encode returning token ids)")
        if callable(tokenizer):
            out = tokenizer(source)
            ids = out["input_ids"] if hasattr(out, "keys") else out  # a transformers tokenizer's BatchEncoding
        elif hasattr(tokenizer, "encode"):
            ids = tokenizer.encode(source)
        else:
            raise TypeError(f"tokenizer must be callable or have .encode, got {type(tokenizer).__name__}")
        ids = torch.as_tensor(ids)
    elif isinstance(source, torch.Tensor):
        if tokenizer is not None:
            raise ValueError("tokens_or_text is already a token tensor: tokenizer= must be None")
        ids = source
    else:
        raise TypeError("tokens_or_text must be a str or a 1-D integer tensor of token ids, got "
                        f"{type(source).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D (one stream), got shape {tuple(ids.shape)}")
    return ids.long()


def calibration_batches(
    tokens_or_text: torch.Tensor | str,
    tokenizer: Callable | None = None,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive tokens from a token stream, at random starts.

    The starts are drawn uniformly (with ``torch.Generator().manual_seed(seed)``) from every
    position a full window fits at, so the same arguments give the same samples; windows may
    overlap when the text is short. Keep calibration and evaluation text apart (module docstring).

    Args:
        tokens_or_text: a 1-D integer tensor of token ids, or a text (then ``tokenizer`` is required).
        tokenizer: turns the text into ids: a transformers tokenizer (``tok(text)["input_ids"]``)
            or any callable returning ids; an object with only ``.encode`` (glassllm's) works too.
        n_samples: number of windows.
        seq_len: tokens per window.
        seed: seed of the window starts.

    Returns:
        An int64 tensor ``(n_samples, seq_len)``: the ``calibration`` argument of ``gptq``.

    Raises:
        TypeError: a source that is neither text nor integer token ids.
        ValueError: text without a tokenizer (or ids with one), ids not 1-D, a non-positive
            ``n_samples``/``seq_len``, or fewer than ``seq_len`` tokens.

    Example:
        >>> text = load_text("pydoc")
        >>> calib = calibration_batches(text[len(text) * 9 // 10:], tok, n_samples=128, seq_len=256)
    """
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
    ids = _token_ids(tokens_or_text, tokenizer)
    if ids.numel() < seq_len:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}: use a longer text or a "
                         "shorter seq_len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).cpu()
