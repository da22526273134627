"""GGUF (llama.cpp's single-file format) both ways for Llama-family models: export a lowbit-quantized
transformers model as a complete GGUF (weights, config metadata, tokenizer) and import one into
lowbit tensors.

Which weights map exactly (Q8_0, Q4_0, Q4_1 <-> Int8Tensor, Int4Tensor at group 32) and how float16
rounds the scales: ``lowbit.formats.gguf_blocks``. Everything else:

* float weights (norms, embeddings, linears left float, e.g. glassllm's 341-wide down_proj) are
  written as Q8_0 where every value is exactly on llama.cpp's Q8_0 grid (an embedding imported
  from Q8_0 goes back as the same blocks), else F16 where every value is exactly a float16, else
  F32; 1-D tensors always F32;
* a tied output head (``lm_head`` sharing the embedding) is not written: llama.cpp and
  transformers tie when ``output.weight`` is absent;
* q_proj/k_proj rows are reordered into llama.cpp's layout (each head's rotate-half pairs
  interleaved), moving whole rows, so quantized rows keep their scales;
* import: F16/F32 tensors are plain float32; tensors of other GGUF types (k-quants, Q5_x, BF16,
  ...) and a quantized embedding are dequantized to float32 by the gguf package (llama.cpp's
  reference arithmetic), with one ``UserWarning`` naming the types and tensors. They are not
  refused: lowbit has no tensor for k-quant super-blocks, and llama.cpp's usual files mix types
  (Q4_K_M holds Q4_K and Q6_K), so refusing would refuse them; float keeps the file's values. A
  type the installed gguf package cannot dequantize is refused (``ValueError`` naming it).

Only ``general.architecture == "llama"`` is read or written (transformers' ``LlamaForCausalLM``);
``gguf`` and ``transformers`` are imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.formats.gguf_blocks import QUANT_TYPES, decode_weight, encode_weight, q8_0_if_exact, type_config
from lowbit.formats.gguf_vocab import copy_tokenizer_metadata, tokenizer_metadata
from lowbit.tensors.base import QuantizedTensor

__all__ = ["is_gguf_file", "export_gguf", "load_gguf", "gguf_tokenizer", "gguf_config", "GGUF_TYPES"]

_log = logging.getLogger(__name__)

GGUF_TYPES = QUANT_TYPES  # the GGUF types lowbit writes and imports as lowbit tensors
_MAGIC = b"GGUF"
_ARCH = "llama"
# a written weight whose float16 scales move it below this SQNR (vs lowbit's own weight) is warned about
_WARN_SQNR_DB = 40.0

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}


def _gguf_name(key: str) -> str | None:
    if key in _GLOBAL:
        return _GLOBAL[key]
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    return None


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_BACK:
        return f"model.layers.{parts[1]}.{_LAYER_BACK[parts[2]]}"
    return None


def _rope_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k layout: GGUF row ``i`` is transformers' row ``idx[i]`` (within each
    head, the rotate-half pairs ``(j, j + hd/2)`` become adjacent rows ``2j, 2j + 1``)."""
    hd = n_rows // heads
    return torch.arange(n_rows).reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)


def _heads_for(key_or_name: str, config) -> int | None:
    if "q_proj" in key_or_name or ".attn_q." in key_or_name:
        return config.num_attention_heads
    if "k_proj" in key_or_name or ".attn_k." in key_or_name:
        return config.num_key_value_heads
    return None


# --- public helpers -------------------------------------------------------------------------------


def is_gguf_file(path) -> bool:
    """True when ``path`` is a file that starts with GGUF's magic bytes (``b"GGUF"``)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except (OSError, TypeError):
        return False


def gguf_config(type_name: str):
    """The lowbit config whose ``quantize_`` output exports to GGUF ``type_name`` without re-quantizing.

    ``"Q4_0"``: ``Int4WeightOnlyConfig(group_size=32, symmetric=True)``; ``"Q4_1"``:
    ``Int4WeightOnlyConfig(group_size=32, zero_point_domain="float")`` (GGUF's own min/max rule);
    ``"Q8_0"``: ``Int8WeightOnlyConfig(granularity=PerGroup(32))``. A layer whose in_features is not a
    multiple of 32 is left float by ``quantize_`` and exported as float.

    Raises:
        ValueError: another ``type_name`` (the message lists the allowed ones).

    Example:
        >>> quantize_(model, gguf_config("Q4_0"))
        >>> export_gguf(model, "model.Q4_0.gguf", tokenizer=tokenizer)
    """
    if type_name not in GGUF_TYPES:
        raise ValueError(f"type_name={type_name!r}; allowed: {', '.join(GGUF_TYPES)}")
    return type_config(type_name)


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export and import need the gguf package: pip install gguf") from e
    return gguf


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("GGUF import needs transformers: pip install 'transformers>=5' gguf") from e
    return transformers


# --- export ---------------------------------------------------------------------------------------


def _check_llama(model: nn.Module):
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    if getattr(config, "model_type", None) != _ARCH:
        raise ValueError(f"GGUF export supports Llama-family models (model_type 'llama'), got model_type="
                         f"{getattr(config, 'model_type', None)!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export of Llama models with attention or MLP biases is not supported (llama.cpp's "
                         "llama architecture has none)")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ValueError(f"GGUF export writes default RoPE only, got rope_type={rope_type!r}")
    return config


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _float_array(t: torch.Tensor):
    """F32, or F16 when every value of a 2-D tensor is exactly a float16."""
    t = t.detach().float().cpu()
    if t.dim() >= 2:
        h = t.to(torch.float16)
        if torch.equal(h.float(), t):
            return h.numpy()
    return t.contiguous().numpy()


def _model_tensors(model: nn.Module, config):
    """``(gguf name, numpy array, raw type or None, sqnr or None, hf key)`` for each tensor to write."""
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.get_input_embeddings().weight
    out = []
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        name = _gguf_name(key)
        if name is None:
            raise ValueError(f"model tensor {key!r} has no place in a GGUF llama file (known: embeddings, norms, "
                             "q/k/v/o and gate/up/down projections, lm_head)")
        heads = _heads_for(key, config)
        if isinstance(t, QuantizedTensor):
            type_name, data, sqnr = encode_weight(t, key)
            if heads is not None:
                data = data[_rope_rows(data.shape[0], heads)]
            out.append((name, data.cpu().contiguous().numpy(), type_name, sqnr, key))
        else:
            if not t.is_floating_point():
                raise ValueError(f"model tensor {key!r} has dtype {t.dtype}; GGUF export writes float and lowbit "
                                 "tensors")
            if heads is not None:
                t = t[_rope_rows(t.shape[0], heads)]
            blocks = q8_0_if_exact(t.cpu())
            if blocks is not None:  # lossless: e.g. an embedding imported from Q8_0
                out.append((name, blocks.numpy(), "Q8_0", None, key))
            else:
                out.append((name, _float_array(t), None, None, key))
    return out


def _file_type(gguf, tensors) -> int:
    counts: dict[str, int] = {}
    for _, arr, type_name, _, _ in tensors:
        if type_name in QUANT_TYPES:
            counts[type_name] = counts.get(type_name, 0) + arr.size
    ft = gguf.LlamaFileType
    if not counts:
        return int(ft.ALL_F32)
    return int({"Q8_0": ft.MOSTLY_Q8_0, "Q4_0": ft.MOSTLY_Q4_0, "Q4_1": ft.MOSTLY_Q4_1}[max(counts, key=counts.get)])


def _token_metadata(tokenizer, source_dir, vocab_size: int):
    """What the file says about the tokenizer: from ``tokenizer``, else copied from a GGUF ``source_dir``,
    else from the tokenizer of a transformers ``source_dir``."""
    if tokenizer is not None:
        return tokenizer_metadata(tokenizer, vocab_size)
    if source_dir is None:
        raise ValueError("a GGUF file carries its tokenizer: pass tokenizer= (a transformers tokenizer) or "
                         "source_dir= (a transformers model directory or a .gguf file)")
    if is_gguf_file(source_dir):
        _, reader = _reader(Path(source_dir))
        return copy_tokenizer_metadata(reader, vocab_size, source_dir)
    p = Path(source_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"source_dir {p} is neither a directory nor a GGUF file")
    try:
        tok = _transformers().AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"source_dir {p} holds no tokenizer transformers can load ({type(e).__name__}: "
                         f"{str(e)[:200]}); pass tokenizer=") from None
    return tokenizer_metadata(tok, vocab_size)


def export_gguf(model: nn.Module, out_file, *, source_dir=None, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a (lowbit-quantized) transformers Llama model as one GGUF file llama.cpp and transformers load.

    Quantized linears become Q8_0/Q4_0/Q4_1 blocks (rules and float16 rounding of the scales in
    ``lowbit.formats.gguf_blocks``); float tensors F32/F16; the config becomes llama metadata
    (context length, widths, heads, RoPE base, RMS eps) and the tokenizer GGUF's tokenizer entries
    (``lowbit.formats.gguf_vocab``). The lowest SQNR of a written weight against lowbit's own
    (float16 scale rounding) is logged at INFO, and warned about below 40 dB.

    Args:
        model: a transformers ``LlamaForCausalLM`` (float, or after ``quantize_`` with weight-only
            int8/int4 configs, e.g. :func:`gguf_config`).
        out_file: the ``.gguf`` file to write (written to a temporary name, then renamed).
        source_dir: where the tokenizer comes from when ``tokenizer`` is None: a transformers model
            directory (its tokenizer), or a GGUF file (its ``tokenizer.*`` and descriptive
            ``general.*`` entries, copied unchanged: re-exporting an imported GGUF keeps llama.cpp's
            pre-tokenizer name, the chat template, the model's name and license).
        tokenizer: a transformers tokenizer (BPE: byte-level or sentencepiece-style).
        overwrite: replace an existing ``out_file``.

    Returns:
        ``out_file`` as a Path.

    Raises:
        TypeError: ``model`` is not a transformers model.
        ValueError: not a Llama model (or one with biases or scaled RoPE), a weight GGUF cannot
            hold (activation quantization, int8 with a zero point, blocks not a multiple of 32,
            float8), no tokenizer, a tokenizer GGUF cannot describe; nothing is written then.
        FileExistsError: ``out_file`` exists and ``overwrite`` is False.
        ImportError: ``gguf`` (or, to read a tokenizer from ``source_dir``, transformers) is missing.

    Example:
        >>> quantize_(model, gguf_config("Q8_0"))
        >>> export_gguf(model, "smollm2.Q8_0.gguf", tokenizer=tokenizer)
    """
    config = _check_llama(model)
    if not isinstance(out_file, (str, os.PathLike)):
        raise TypeError(f"out_file must be a str or Path, got {type(out_file).__name__}")
    out = Path(out_file)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    if out.is_dir():
        raise IsADirectoryError(f"out_file {out} is a directory; give a .gguf file name")
    gguf = _gguf()
    tensors = _model_tensors(model, config)
    token_meta = _token_metadata(tokenizer, source_dir, config.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        _write(gguf, tmp, config, tensors, token_meta, getattr(model, "name_or_path", None) or "lowbit model")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    rated = [(sq, key) for _, _, _, sq, key in tensors if sq is not None]
    if rated:
        worst, key = min(rated)
        _log.info("export_gguf: %d quantized weights; float16 scales: lowest SQNR vs lowbit's weights %.1f dB (%s)",
                  len(rated), worst, key)
        if worst < _WARN_SQNR_DB:
            warnings.warn(f"export_gguf: float16 rounding of the scales moves {key} to {worst:.1f} dB SQNR of "
                          "lowbit's weight (scales below float16's normal range?)", stacklevel=2)
    return out


def _write(gguf, path: Path, config, tensors, token_meta, name: str) -> None:
    w = gguf.GGUFWriter(str(path), _ARCH)
    if "general.name" not in token_meta.keys:  # copied from a source GGUF otherwise
        w.add_name(str(name)[:200])
    if "general.type" not in token_meta.keys:
        w.add_type("model")
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(config.num_key_value_heads))
    hd = _head_dim(config)
    if hd * config.num_attention_heads != config.hidden_size:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    w.add_file_type(_file_type(gguf, tensors))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    token_meta.write(w)
    for tname, arr, type_name, _, _ in tensors:
        raw = None if type_name is None else gguf.GGMLQuantizationType[type_name]
        w.add_tensor(tname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- import ---------------------------------------------------------------------------------------


def _check_file(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path to a .gguf file, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_file():
        raise IsADirectoryError(f"{p} is a directory; give the .gguf file inside it")
    if not is_gguf_file(p):
        raise ValueError(f"{p} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return p


def _reader(p: Path):
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError... on damage
        raise ValueError(f"{p} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != _ARCH:
        raise ValueError(f"{p}: general.architecture={arch!r}; lowbit imports GGUF files of architecture 'llama'")
    return gguf, reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _llama_config(tf, reader, p: Path):
    """The ``LlamaConfig`` the file's llama metadata states: the keys and renames of transformers'
    GGUF config mapping for llama (``AutoConfig.from_pretrained(..., gguf_file=...)`` gives the same
    fields, tested), read from the already parsed fields instead of parsing the file a second time."""
    def need(key):
        value = _field(reader, f"{_ARCH}.{key}")
        if value is None:
            raise ValueError(f"{p}: the metadata lacks {_ARCH}.{key}")
        return value

    scaling = _field(reader, f"{_ARCH}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{p}: {_ARCH}.rope.scaling.type={scaling!r}; lowbit imports default RoPE only")
    heads = int(need("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{_ARCH}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    hidden = int(need("embedding_length"))
    kwargs = dict(
        max_position_embeddings=int(need("context_length")), num_hidden_layers=int(need("block_count")),
        intermediate_size=int(need("feed_forward_length")), hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{_ARCH}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{_ARCH}.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(_field(reader, f"{_ARCH}.rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        architectures=["LlamaForCausalLM"],
    )
    if vocab is not None:
        kwargs["vocab_size"] = int(vocab)
    return tf.LlamaConfig(**kwargs)


def _tensor_state(gguf, reader, config, p: Path):
    """``({hf key: tensor}, {module fqn: config}, {type: [names]})`` for the file's tensors."""
    state, configs, notes = {}, {}, {}
    for t in reader.tensors:
        key = _hf_name(t.name)
        if key is None:
            raise ValueError(f"{p}: tensor {t.name!r} is not part of a transformers LlamaForCausalLM")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        type_name = t.tensor_type.name
        heads = _heads_for(t.name, config)
        is_linear = key.endswith("_proj.weight") or key == "lm_head.weight"
        if type_name in QUANT_TYPES and is_linear:
            data = torch.from_numpy(t.data.copy()).reshape(shape[0], -1)
            if heads is not None:
                data = data[torch.argsort(_rope_rows(shape[0], heads))]
            value, cfg = decode_weight(data, type_name, shape, t.name)
            configs[key.removesuffix(".weight")] = cfg
        else:
            if type_name not in ("F32", "F16"):
                notes.setdefault(type_name, []).append(t.name)
            try:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise ValueError(f"{p}: tensor {t.name!r} has type {type_name}, which the installed gguf package "
                                 "cannot dequantize; lowbit maps only "
                                 f"{', '.join(QUANT_TYPES)} onto its tensors") from None
            value = torch.from_numpy(arr.copy()).float().reshape(shape)
            if heads is not None:
                value = value[torch.argsort(_rope_rows(shape[0], heads))]
        state[key] = value
    return state, configs, notes


def load_gguf(path, *, device="cpu"):
    """Load a llama GGUF file as a transformers ``LlamaForCausalLM`` holding lowbit tensors (eval mode).

    The config is the file's llama metadata under transformers' names (as ``AutoConfig`` with
    ``gguf_file=`` reads it, without parsing the file twice); the model is built without
    initialising weights and the tensors are read with ``gguf.GGUFReader``: Q8_0/Q4_0/Q4_1 linears become ``Int8Tensor``/``Int4Tensor`` at group
    32 with their config (``print(model)`` shows it; ``lowbit.save_pretrained`` saves it); other
    types and quantized embeddings are dequantized to float32 (one ``UserWarning`` names them);
    norms and F16/F32 tensors are float32. No ``output.weight`` means the head is tied to the
    embedding. The tokenizer: :func:`gguf_tokenizer`.

    Args:
        path: the ``.gguf`` file.
        device: where the model's tensors go.

    Returns:
        The model (float32 activations), in eval mode.

    Raises:
        FileNotFoundError / IsADirectoryError: no such file, or a directory.
        ValueError: not a GGUF file, a damaged one, an architecture other than llama, a tensor a
            Llama model does not have, or tensors that do not match the metadata's shapes.
        ImportError: gguf or transformers is missing.

    Example:
        >>> model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    from lowbit.pretrained.checkpoint import _build
    from lowbit.serialization import apply_state

    p = _check_file(path)
    gguf, reader = _reader(p)
    tf = _transformers()
    config = _llama_config(tf, reader, p)
    state, configs, notes = _tensor_state(gguf, reader, config, p)
    model = _build(config, torch.float32, "cpu")
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one tensor for both names
    if notes:
        what = "; ".join(f"{k}: {', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''}"
                         for k, v in sorted(notes.items()))
        warnings.warn(f"load_gguf: dequantized to float32 (lowbit holds Q8_0/Q4_0/Q4_1 linears only): {what}",
                      stacklevel=2)
    apply_state(model, state, configs, where=p)
    return model.to(device).eval()


def gguf_tokenizer(path):
    """The transformers tokenizer a GGUF file describes (``AutoTokenizer`` with ``gguf_file=``).

    Raises:
        FileNotFoundError / ValueError: as :func:`load_gguf` for the file itself.
        ImportError: transformers or gguf is missing.
    """
    p = _check_file(path)
    return _transformers().AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)

