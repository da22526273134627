"""glassllm-en as a torch module: a tiny real Llama-style decoder for accuracy tests and the demo.

The weights, tokenizer and config come from the ``glassllm`` package (the ``dev`` extra); the
model definition is ours, so every projection is an ``nn.Linear`` that ``quantize_`` finds.
glassllm stores projections as ``(in, out)``; ``nn.Linear`` holds ``(out, in)``, so each is
transposed on load. RoPE rotates ADJACENT pairs ``(x[2i], x[2i+1])``, as glassllm does, so the
q/k rows need no reordering. Embeddings and the output head are tied (one parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlassConfig", "GlassLLM", "load_glassllm", "glassllm_tokenizer", "eval_text"]

_LANG = "en"


def _require_glassllm():
    try:
        import glassllm  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the glassllm model needs the 'glassllm' package: pip install 'lowbit[dev]'") from e
    return resources.files("glassllm") / "weights"


@dataclass(frozen=True)
class GlassConfig:
    """Hyperparameters of a glassllm checkpoint (the fields of its ``__config__``)."""

    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_len: int = 128
    rope_base: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return int(8 * self.d_model / 3)  # glassllm's SwiGLU width: 341 for d_model 128


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair ``(x[2i], x[2i+1])`` of ``x: (B, H, T, D)`` by angle ``m * theta_i``."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


_ATTENTION = ("sdpa", "eager")


class _Attention(nn.Module):
    def __init__(self, cfg: GlassConfig, attention: str):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.attention = attention
        if attention == "eager":  # scores -> nn.Softmax module -> @ v: a softmax lowbit.static can quantize
            self.softmax = nn.Softmax(dim=-1)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        # GQA: query head h reads KV head h // repeats (np.repeat order, as glassllm).
        repeats = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            out = self.softmax(scores.masked_fill(~causal, float("-inf"))) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _SwiGLU(nn.Module):
    def __init__(self, cfg: GlassConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)  # glassllm W1
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)  # glassllm W3
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)  # glassllm W2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, cfg: GlassConfig, attention: str):
        super().__init__()
        self.norm1 = _RMSNorm(cfg.d_model, cfg.eps)
        self.attn = _Attention(cfg, attention)
        self.norm2 = _RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = _SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class GlassLLM(nn.Module):
    """The glassllm decoder: embedding, ``n_layers`` pre-norm blocks, final RMSNorm, tied head.

    Args:
        cfg: the hyperparameters.
        attention: ``"sdpa"`` (default, ``F.scaled_dot_product_attention``) or ``"eager"``
            (explicit scores, an ``nn.Softmax`` module, then ``@ v``: same math, and a softmax
            module that static quantization can replace).

    Example:
        >>> model = load_glassllm()
        >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
        torch.Size([1, 8, 1024])
    """

    def __init__(self, cfg: GlassConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in _ATTENTION:
            raise ValueError(f"attention={attention!r}; allowed: {list(_ATTENTION)}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg, attention) for _ in range(cfg.n_layers))
        self.norm = _RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: quantize_ keeps it float unless a mapping names lm_head
        # Angles in float64, as glassllm computes them: (max_len, head_dim / 2). The buffers take
        # the model's dtype with .to(dtype) (float32 cos/sin would cap a float64 model at ~1e-7).
        theta = cfg.rope_base ** (-2.0 * torch.arange(cfg.head_dim // 2, dtype=torch.float64) / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.max_len, dtype=torch.float64), theta)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)``, position 0 at the first token.

        Raises:
            TypeError: ``input_ids`` is not an integer tensor.
            ValueError: ``input_ids`` is not 2-D, is empty or longer than ``max_len``, or holds ids
                outside ``[0, vocab_size)``.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer tensor (B, T), got {_describe(input_ids)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (B, T) with T >= 1, got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"input_ids has T={t} tokens; glassllm allows at most max_len={self.cfg.max_len}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size}), got values in [{lo}, {hi}]")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


def _describe(x) -> str:
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def load_glassllm(dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> GlassLLM:
    """Build :class:`GlassLLM` from the fp16 weights shipped in the ``glassllm`` package.

    Args:
        dtype: floating dtype of the parameters (the fp16 weights are widened exactly to float32
            first, then cast).
        attention: ``"sdpa"`` or ``"eager"`` (see :class:`GlassLLM`).

    Returns:
        The model in eval mode (852,608 parameters for glassllm-en).

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
        ImportError: ``glassllm`` (or numpy) is not installed.

    Example:
        >>> model = load_glassllm()
        >>> logits = model(torch.tensor([glassllm_tokenizer().encode("It is a truth")]))
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    import numpy as np

    with resources.as_file(_require_glassllm() / f"{_LANG}.npz") as path, np.load(path) as data:
        fields = json.loads(str(data["__config__"]))
        cfg = GlassConfig(**{k: v for k, v in fields.items() if k in GlassConfig.__dataclass_fields__})
        arrays = {name: torch.from_numpy(data[name].astype(np.float32)) for name in data.files if name != "__config__"}

    state = {"embed.weight": arrays.pop("E"), "norm.weight": arrays.pop("norm_f.gamma")}
    rename = {
        "attn.W_Q": "attn.q_proj", "attn.W_K": "attn.k_proj", "attn.W_V": "attn.v_proj", "attn.W_O": "attn.o_proj",
        "ffn.W1": "mlp.gate_proj", "ffn.W3": "mlp.up_proj", "ffn.W2": "mlp.down_proj",
    }
    for i in range(cfg.n_layers):
        for src, dst in rename.items():  # glassllm's (in, out) -> nn.Linear's (out, in)
            state[f"blocks.{i}.{dst}.weight"] = arrays.pop(f"blocks.{i}.{src}").t().contiguous()
        for norm in ("norm1", "norm2"):
            state[f"blocks.{i}.{norm}.weight"] = arrays.pop(f"blocks.{i}.{norm}.gamma")
    assert not arrays, f"unmapped glassllm arrays: {sorted(arrays)}"

    model = GlassLLM(cfg, attention)
    state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def glassllm_tokenizer():
    """The glassllm-en BPE tokenizer (``glassllm.tokenizer.Tokenizer``: ``encode(str) -> list[int]``).

    Raises:
        ImportError: ``glassllm`` is not installed.
    """
    from glassllm.tokenizer import Tokenizer

    with resources.as_file(_require_glassllm() / f"{_LANG}.tokenizer.json") as path:
        return Tokenizer.load(path)


def eval_text() -> str:
    """A real English evaluation text: Python's own ``pydoc_data.topics`` help pages (~465k chars).

    glassllm ships no text of its own, and this one is always present in the standard library.
    It is technical prose, unlike glassllm's Austen-like training text, so perplexity on it runs
    higher than glassllm's own validation (about 123 there).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))
