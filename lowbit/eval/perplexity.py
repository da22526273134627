"""Perplexity of a causal language model over non-overlapping windows of a token stream.

One convention for special tokens everywhere perplexity is measured (``lowbit eval``, the demo,
``benchmarks/accuracy.py``, sensitivity reports and ``autoquant``): :func:`tokenize_for_perplexity`
tokenizes the text without special tokens and records what the tokenizer itself puts before
every sequence (a BOS for Llama 3, Gemma, ...); :func:`perplexity_windows` puts that prefix in
front of every window and never scores it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TokenizedText", "tokenize_for_perplexity", "perplexity_windows", "perplexity"]

# Tokenized with and without special tokens to learn what a tokenizer adds around a text.
_PROBE = "The quick brown fox jumps over the lazy dog."
_ROLES = ("bos", "cls", "eos", "sep", "pad", "unk")  # first match names a special token


@dataclass(frozen=True)
class TokenizedText:
    """A text's tokens for perplexity and the special tokens its tokenizer puts before every sequence.

    Attributes:
        ids: ``(N,)`` int64, the text's tokens without any special token.
        prefix: token ids put before every window (the tokenizer's BOS, say); never scored.
        note: what was prepended, for the output ("each window prefixed with BOS '<s>' (id 1),
            as the tokenizer does" or "no special token prepended: the tokenizer adds none").
    """

    ids: torch.Tensor
    prefix: tuple[int, ...]
    note: str


def _token_name(tokenizer, token_id: int) -> str:
    """``"BOS '<s>' (id 1)"``: the token's role (when the tokenizer names one), text and id."""
    role = next((r.upper() for r in _ROLES if getattr(tokenizer, f"{r}_token_id", None) == token_id), "token")
    text = None
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        text = convert(token_id)
    return f"{role} {text!r} (id {token_id})" if text is not None else f"{role} (id {token_id})"


def _hf_ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return [int(i) for i in ids]


def tokenize_for_perplexity(tokenizer, text: str) -> TokenizedText:
    """Tokenize ``text`` for :func:`perplexity`, following the tokenizer's own special-token convention.

    A transformers tokenizer is asked what it adds: a short probe is tokenized with and without
    ``add_special_tokens``; what comes before the plain tokens is the prefix every window gets
    (what ``tokenizer("text")`` prepends: Llama 3's ``<|begin_of_text|>``, BERT's ``[CLS]``; none
    for SmolLM2 or GPT-2). What it appends (an EOS, BERT's ``[SEP]``) is not used: a window's end
    is not the end of the text; the note says so. A tokenizer with only ``encode(str) -> list[int]``
    (glassllm's) adds nothing.

    Args:
        tokenizer: a transformers tokenizer (called as ``tokenizer(text, add_special_tokens=...)``)
            or an object with ``encode(text) -> list[int]``.
        text: the text to score.

    Returns:
        A :class:`TokenizedText`: the text's ids (no special tokens), the prefix and a note.

    Raises:
        TypeError: ``text`` is not a str; ``tokenizer`` is neither kind.
        ValueError: the tokenizer's special tokens do not surround the plain tokens (it changes the
            text's own tokens when adding them), so no prefix can be read off.

    Example:
        >>> tt = tokenize_for_perplexity(tokenizer, load_text("pydoc"))
        >>> print(tt.note)
        >>> ppl = perplexity(model, tt.ids, seq_len=256, max_windows=16, prefix=tt.prefix)
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if callable(tokenizer):
        plain = _hf_ids(tokenizer, _PROBE, add_special_tokens=False)
        full = _hf_ids(tokenizer, _PROBE, add_special_tokens=True)
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
        if start is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} adds special tokens inside the text "
                             f"({full} with them, {plain} without, for {_PROBE!r}): no prefix to prepend")
        prefix, suffix = tuple(full[:start]), full[start + len(plain):]
        ids = _hf_ids(tokenizer, text, add_special_tokens=False)
    elif callable(getattr(tokenizer, "encode", None)):
        prefix, suffix = (), []
        ids = [int(i) for i in tokenizer.encode(text)]
    else:
        raise TypeError(f"tokenizer must be a transformers tokenizer or have encode(str) -> list[int], "
                        f"got {type(tokenizer).__name__}")
    if prefix:
        note = f"each window prefixed with {', '.join(_token_name(tokenizer, i) for i in prefix)}, as the tokenizer does"
    else:
        note = "no special token prepended: the tokenizer adds none"
    if suffix:
        note += (f"; the {', '.join(_token_name(tokenizer, i) for i in suffix)} it appends is left out "
                 "(a window's end is not the text's end)")
    return TokenizedText(torch.tensor(ids, dtype=torch.long), prefix, note)


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name}={value!r} must be {allowed}")


def _prefix_tensor(prefix) -> torch.Tensor:
    if isinstance(prefix, torch.Tensor):
        ok = prefix.dim() == 1 and not prefix.is_floating_point() and not prefix.is_complex()
        values = prefix.tolist() if ok else None
    else:
        values = list(prefix) if isinstance(prefix, Sequence) and not isinstance(prefix, str) else None
        ok = values is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok or any(v < 0 for v in values):
        raise TypeError(f"prefix must be a sequence of non-negative int token ids (e.g. (bos_id,) or ()), got {prefix!r}")
    return torch.tensor(values, dtype=torch.long)


def perplexity_windows(
    token_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    *,
    prefix: Sequence[int] | torch.Tensor = (),
    name: str = "token_ids",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model inputs and scored targets of every window; targets align with the LAST ``seq_len`` logits.

    Each window scores ``seq_len`` text tokens; what comes before the first of them is its context:

    * no prefix: window ``w`` feeds ``ids[w*L : (w+1)*L]`` and scores ``ids[w*L+1 : (w+1)*L+1]``
      (the stream's first token is context only); ``(N - 1) // L`` windows;
    * a prefix ``p`` (k tokens): window ``w`` feeds ``p + ids[w*L : (w+1)*L - 1]`` and scores
      ``ids[w*L : (w+1)*L]``, so the first text token is predicted from the prefix alone and no
      prefix token is ever a target; ``N // L`` windows, each ``k + L - 1`` tokens long (``L`` for
      a single BOS).

    Args:
        token_ids: 1-D integer tensor, the text's tokens (no special tokens).
        seq_len: scored tokens per window (``L``).
        max_windows: use only the first this many windows; None for all.
        prefix: token ids put before every window (:attr:`TokenizedText.prefix`).
        name: what to call ``token_ids`` in error messages.

    Returns:
        ``(inputs, targets)``: int64 ``(n, k + L - 1)`` (``(n, L)`` without a prefix) and ``(n, L)``.

    Raises:
        TypeError: ``token_ids`` is not an integer tensor; ``prefix`` is not a sequence of ints.
        ValueError: ``token_ids`` is not 1-D or too short for one window; ``seq_len`` or
            ``max_windows`` is not a positive int.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
        got = f"{token_ids.dtype} tensor" if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise TypeError(f"{name} must be a 1-D integer tensor, got {got}")
    if token_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(token_ids.shape)}")
    _positive_int("seq_len", seq_len)
    _positive_int("max_windows", max_windows, allow_none=True)
    p = _prefix_tensor(prefix)
    context = 0 if p.numel() else 1  # text tokens used as context only (the stream's first, without a prefix)
    n = (token_ids.numel() - context) // seq_len
    if n == 0:
        why = " (each window's first token is scored from the prefix)" if p.numel() else ""
        raise ValueError(f"{name} has {token_ids.numel()} tokens; seq_len={seq_len} needs at least "
                         f"{seq_len + context}{why}")
    if max_windows is not None:
        n = min(n, max_windows)
    ids = token_ids.long()
    targets = ids[context : context + n * seq_len].view(n, seq_len)
    if not p.numel():
        return ids[: n * seq_len].view(n, seq_len), targets
    p = p.to(ids.device)
    return torch.cat([p.expand(n, -1), targets[:, :-1]], dim=1), targets


def _check_logits(logits: torch.Tensor, inputs: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != inputs.shape:
        expected = f"({inputs.shape[0]}, {inputs.shape[1]}, vocab)"
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}; expected {expected}")


def _nll(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` under the last ``targets.shape[1]`` logits, float64."""
    _check_logits(logits, inputs)
    logp = logits[:, -targets.shape[1]:].double().log_softmax(dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).sum().item()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    *,
    batch_size: int = 8,
    prefix: Sequence[int] | torch.Tensor = (),
) -> float:
    """``exp`` of the mean next-token negative log-likelihood, in float64.

    The windows are :func:`perplexity_windows`': non-overlapping, ``seq_len`` scored tokens each,
    every scored token seeing only its own window (and the prefix) as context. Pass the
    tokenizer's prefix (:func:`tokenize_for_perplexity`): a model trained with a BOS at the start
    of every sequence scores several times worse without it. ``model(ids: (B, T)) -> logits
    (B, T, vocab)``; log-softmax runs on the logits in float64.

    Args:
        model: a causal LM taking a LongTensor ``(B, T)``; run under ``torch.no_grad``.
        token_ids: 1-D integer tensor, the text's tokens (at least ``seq_len + 1``; ``seq_len``
            with a prefix).
        seq_len: scored tokens per window (``L``).
        max_windows: use only the first this many windows; None for all.
        batch_size: windows per forward pass (does not change the result beyond float rounding).
        prefix: token ids put before every window and never scored (default none).

    Returns:
        The perplexity, a float >= 1.

    Raises:
        TypeError: ``token_ids`` is not an integer tensor; ``prefix`` is not a sequence of ints.
        ValueError: ``token_ids`` is not 1-D or too short for one window; ``seq_len``,
            ``max_windows`` or ``batch_size`` is not a positive int; logits of the wrong shape.

    Example:
        >>> tt = tokenize_for_perplexity(tokenizer, text)
        >>> ppl = perplexity(model, tt.ids, seq_len=128, max_windows=8, prefix=tt.prefix)
    """
    inputs, targets = perplexity_windows(token_ids, seq_len, max_windows, prefix=prefix)
    _positive_int("batch_size", batch_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else token_ids.device
    inputs, targets = inputs.to(device), targets.to(device)
    total_nll = 0.0
    for start in range(0, inputs.shape[0], batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        total_nll += _nll(model(x), x, y)
    return math.exp(total_nll / targets.numel())
