"""Other projects' checkpoint formats, both ways and exact: compressed-tensors (what vLLM and SGLang
load) and GGUF (llama.cpp, ollama).

* :func:`export` writes a quantized model (in memory, or any checkpoint :func:`from_pretrained`
  reads) in one of :data:`FORMATS`. Only layers whose lowbit numerics the format states exactly
  are written; anything else is refused with one error that lists the layers, never re-quantized.
* :func:`from_pretrained` loads a lowbit checkpoint directory, a compressed-tensors directory or
  a GGUF file into a transformers model whose linears hold lowbit tensors (``Int4Tensor``,
  ``Int8Tensor``, ``Float8Tensor``) with the file's own integer codes and scales, so the model
  runs on lowbit's kernels, saves with ``lowbit.save_pretrained`` and exports again.
* :func:`detect_format` says which of those a path is.

The format modules (``compressed_tensors``, ``gguf``) import their packages and transformers only
inside functions: lowbit imports without them.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lowbit.kernels import hugepages

__all__ = ["FORMATS", "SOURCE_KINDS", "detect_format", "export", "from_pretrained", "describe"]

FORMATS = ("compressed-tensors", "gguf")
# what detect_format returns
SOURCE_KINDS = ("lowbit", "compressed-tensors", "gguf", "transformers")
_GGUF_MAGIC = b"GGUF"


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def detect_format(path) -> str:
    """Which kind of checkpoint ``path`` is: one of :data:`SOURCE_KINDS`.

    ``"gguf"``: a file starting with the GGUF magic (or a directory without ``config.json`` that
    holds exactly one ``.gguf`` file); ``"lowbit"``: a directory whose config.json has a
    ``"lowbit"`` entry; ``"compressed-tensors"``: one whose ``quantization_config`` has
    ``quant_method == "compressed-tensors"``; ``"transformers"``: any other directory with a
    config.json (a float checkpoint, or another tool's quantization that lowbit does not read).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file that is not GGUF, or a directory that is none of the above.
    """
    from lowbit.formats.compressed_tensors_load import is_compressed_tensors_checkpoint
    from lowbit.pretrained import is_lowbit_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if _is_gguf(p):
            return "gguf"
        raise ValueError(f"{p} is a file but not a GGUF file (no 'GGUF' magic); lowbit reads a GGUF file or a "
                         "directory (lowbit, compressed-tensors or transformers checkpoint)")
    if is_lowbit_checkpoint(p):
        return "lowbit"
    if is_compressed_tensors_checkpoint(p):
        return "compressed-tensors"
    if (p / "config.json").is_file():
        return "transformers"
    ggufs = sorted(q for q in p.glob("*.gguf") if _is_gguf(q))
    if len(ggufs) == 1:
        return "gguf"
    found = f"{len(ggufs)} GGUF files ({', '.join(q.name for q in ggufs[:4])}): name one" if ggufs else "no config.json"
    raise ValueError(f"{p} is not a checkpoint lowbit reads: {found}")


def _gguf_file(p: Path) -> Path:
    return p if p.is_file() else next(q for q in sorted(p.glob("*.gguf")) if _is_gguf(q))


def from_pretrained(path, *, device="cpu"):
    """Load a quantized checkpoint as a transformers model holding lowbit tensors (eval mode).

    ``path`` is a lowbit checkpoint directory (``lowbit.save_pretrained`` / ``quantize_pretrained``),
    a compressed-tensors directory (llm-compressor, GPTQModel and AutoAWQ exports, ``lowbit.export``)
    or a GGUF file. Quantized weights keep the file's codes and scales: nothing is re-quantized.
    The tokenizer loads with ``AutoTokenizer.from_pretrained(path)`` (a GGUF file:
    ``lowbit.formats.gguf.gguf_tokenizer(path)``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a float transformers checkpoint (quantize it first), or a file / directory none
            of the readers accepts; the readers' own errors (unsupported scheme or tensor type, ...).
        ImportError: transformers (or compressed-tensors' / gguf's package where needed) is missing.
    """
    p = Path(path)
    kind = detect_format(p)
    if kind == "lowbit":
        from lowbit.pretrained import from_pretrained as load_lowbit

        return load_lowbit(p, device=device)
    if kind == "compressed-tensors":
        from lowbit.formats.compressed_tensors_load import load_compressed_tensors

        model = load_compressed_tensors(p, device=device)
        hugepages.advise_model(model)  # as quantize_ does (lowbit.kernels.hugepages)
        return model
    if kind == "gguf":
        from lowbit.formats.gguf import load_gguf

        model = load_gguf(_gguf_file(p), device=device)
        hugepages.advise_model(model)
        return model
    raise ValueError(f"{p} is a float transformers checkpoint, not a quantized one: load it with transformers' "
                     "from_pretrained, or quantize it first (lowbit.quantize_pretrained / lowbit quantize)")


def export(model_or_path, out, format: str = "compressed-tensors", *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a quantized model in another project's format.

    Args:
        model_or_path: a transformers model whose linears hold lowbit tensors (after ``quantize_``,
            an algorithm or :func:`from_pretrained`), or a path :func:`from_pretrained` reads (a
            lowbit, compressed-tensors or GGUF checkpoint: so formats convert into each other).
        out: the output: a directory for ``"compressed-tensors"``, a ``.gguf`` file for ``"gguf"``.
        format: one of :data:`FORMATS`.
        tokenizer: the tokenizer to write with the model; default: the source directory's
            tokenizer files (when ``model_or_path`` is a path), else none.
        overwrite: replace an existing output.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown ``format``; layers the format cannot state exactly (one error that
            lists them and says why); an existing output without ``overwrite``.
        TypeError: ``model_or_path`` is neither a module nor a path.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; allowed: {', '.join(repr(f) for f in FORMATS)}")
    source_dir = None
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)):
        src = Path(model_or_path)
        kind = detect_format(src)
        model = from_pretrained(src)
        if kind == "gguf":
            if tokenizer is None and format == "gguf":
                source_dir = _gguf_file(src)  # its tokenizer.* / general.* entries copied as llama.cpp wrote them
            elif tokenizer is None:
                from lowbit.formats.gguf import gguf_tokenizer

                tokenizer = gguf_tokenizer(_gguf_file(src))
        else:
            source_dir = src
    else:
        raise TypeError(f"model_or_path must be an nn.Module or a checkpoint path, got {type(model_or_path).__name__}")
    if format == "compressed-tensors":
        from lowbit.formats.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, out, source_dir=source_dir, tokenizer=tokenizer, overwrite=overwrite)
    from lowbit.formats.gguf import export_gguf

    return export_gguf(model, out, source_dir=source_dir, tokenizer=tokenizer, overwrite=overwrite)


def describe(model: nn.Module) -> dict:
    """``{"modules": {fqn: config repr}, "configs": {config repr: count}, "quantized_bytes", "float_bytes"}``
    of a loaded model: what ``lowbit info`` prints for a compressed-tensors or GGUF source."""
    from lowbit.pretrained import summarize_configs
    from lowbit.tensors import QuantizedTensor

    modules = {fqn: repr(m.lowbit_config) for fqn, m in model.named_modules() if getattr(m, "lowbit_config", None) is not None}
    quantized = plain = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, QuantizedTensor):
            quantized += sum(getattr(t, n).nbytes for n in t.tensor_data_names)
            quantized += sum(getattr(t, n).nbytes for n in t.optional_tensor_data_names if getattr(t, n) is not None)
        else:
            plain += t.nbytes
    return {"modules": modules, "configs": summarize_configs(modules), "quantized_bytes": quantized, "float_bytes": plain}
