"""A transformers BPE tokenizer as GGUF's tokenizer metadata (``tokenizer.ggml.*``).

GGUF holds a vocabulary, not a ``tokenizer.json``: the tokens in id order, a type per token
(normal, unknown, control, user-defined, unused, byte), the merges, the special ids and whether
BOS/EOS are added. Readers rebuild the tokenizer from these with their own rules per
``tokenizer.ggml.model``:

* ``"gpt2"`` (byte-level BPE: a ``ByteLevel`` pre-tokenizer or decoder in tokenizer.json), with
  ``tokenizer.ggml.pre`` naming the split rule: "smollm" for digits split one by one before the
  byte-level step (SmolLM's tokenizer), else "default" (GPT-2's);
* ``"llama"`` (sentencepiece-style BPE over "\u2581"-marked text) for every other BPE; scores are
  ``-id`` (vocabularies list tokens in merge order), so llama.cpp's score-driven merging follows
  the merges. A custom normalizer or split rule (glassllm's) is not representable: readers apply
  sentencepiece's. The tests measure how often the ids then agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["TokenizerMetadata", "CopiedTokenizerMetadata", "tokenizer_metadata", "copy_tokenizer_metadata"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerMetadata:
    """What a GGUF file says about its tokenizer (one field per ``tokenizer.ggml`` key)."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None

    keys = frozenset()  # no general.* entries of its own

    def write(self, w) -> None:
        """Add the entries to a ``gguf.GGUFWriter``."""
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, i in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(i)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _has(node, pred) -> bool:
    if isinstance(node, dict):
        return pred(node) or any(_has(v, pred) for v in node.values())
    if isinstance(node, list):
        return any(_has(v, pred) for v in node)
    return False


def _adds(tokenizer, token_id) -> tuple[bool, bool]:
    """Whether encoding adds ``token_id`` at the start / end (compared with ``add_special_tokens=False``)."""
    if token_id is None:
        return False, False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) <= len(plain):
        return False, False
    return with_special[0] == token_id, with_special[-1] == token_id


def tokenizer_metadata(tokenizer, vocab_size: int) -> TokenizerMetadata:
    """The GGUF tokenizer entries for a transformers fast tokenizer and a model of ``vocab_size`` rows.

    Ids the tokenizer does not use (a padded embedding) become ``[PAD<i>]`` tokens of type unused.

    Raises:
        ValueError: not a fast (``tokenizers``) tokenizer, not BPE, or more tokens than ``vocab_size``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast transformers tokenizer (a tokenizers backend), got "
                         f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes BPE tokenizers (llama.cpp's 'gpt2' and 'llama' models), got a "
                         f"{model.get('type')!r} tokenizer")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(by_id) + 1 if by_id else 0
    if n > vocab_size:
        raise ValueError(f"the tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}")
    byte_level = _has(spec.get("pre_tokenizer"), lambda d: d.get("type") == "ByteLevel") or \
        _has(spec.get("decoder"), lambda d: d.get("type") == "ByteLevel")
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(tok)
        if i == unk and not byte_level:  # llama.cpp marks a byte-level unk by its added-token kind
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif not byte_level and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    special = {k: int(v) for k, v in special.items() if v is not None}
    add_bos, _ = _adds(tokenizer, special.get("bos"))
    _, add_eos = _adds(tokenizer, special.get("eos"))
    if byte_level:
        digits = _has(spec.get("pre_tokenizer"), lambda d: d.get("type") == "Digits" and d.get("individual_digits"))
        kind, pre, scores, space_prefix = "gpt2", "smollm" if digits else "default", None, False
    else:
        space_prefix = _has(spec.get("pre_tokenizer"), lambda d: d.get("type") == "Metaspace"
                            and d.get("prepend_scheme", "always") != "never") or \
            _has(spec.get("normalizer"), lambda d: d.get("type") == "Prepend")
        kind, pre, scores = "llama", None, [-float(i) for i in range(vocab_size)]
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerMetadata(model=kind, pre=pre, tokens=tokens, types=types, merges=merges, scores=scores,
                             special_ids=special, add_bos=add_bos, add_eos=add_eos, add_space_prefix=space_prefix,
                             chat_template=template if isinstance(template, str) else None)


# general.* entries that describe the file being written, not the model: never copied
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


@dataclass
class CopiedTokenizerMetadata:
    """Another GGUF file's ``tokenizer.*`` (and descriptive ``general.*``) entries, written back
    unchanged (keys, values and types)."""

    entries: list[tuple[str, object, object, object]]  # (key, value, value type, array item type)

    @property
    def keys(self) -> set[str]:
        return {e[0] for e in self.entries}

    def write(self, w) -> None:
        """Add the entries to a ``gguf.GGUFWriter``."""
        for key, value, vtype, sub_type in self.entries:
            w.add_key_value(key, value, vtype, sub_type)


def copy_tokenizer_metadata(reader, vocab_size: int, where) -> CopiedTokenizerMetadata:
    """The ``tokenizer.*`` entries of a parsed GGUF file (``gguf.GGUFReader``), with its descriptive
    ``general.*`` ones (name, license, ...), to write into another: what llama.cpp reads (its
    pre-tokenizer name, scores, chat template) survives as the file has it.

    Raises:
        ValueError: the file has no token list, or one whose length is not ``vocab_size``.
    """
    from gguf import GGUFValueType

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{where} has no tokenizer.ggml.tokens to copy: pass tokenizer=")
    if len(tokens.data) != vocab_size:
        raise ValueError(f"{where} lists {len(tokens.data)} tokens but the model's vocab_size is {vocab_size}")
    entries = []
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.", "general.")) and key not in _OWN_KEYS:
            array = field.types[0] == GGUFValueType.ARRAY
            entries.append((key, field.contents(), field.types[0], field.types[-1] if array else None))
    return CopiedTokenizerMetadata(entries)
