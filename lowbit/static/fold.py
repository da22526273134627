"""Fold per-input-channel scales into the op that produces a linear's input.

SmoothQuant (and AWQ) rewrite a linear ``y = x W^T`` as ``(x / s) (W * s)^T`` with a positive
per-input-channel ``s``. The ``x / s`` costs nothing at run time when the op that makes ``x`` is
linear per channel and feeds nothing else:

* an RMSNorm: its weight becomes ``weight / s`` (q/k/v share ``input_layernorm``, gate/up share
  ``post_attention_layernorm``, so their ``s`` must be one vector);
* ``v_proj`` for ``o_proj``: attention mixes tokens, never channels, so ``o_proj``'s input channel
  ``(h, d)`` is ``v_proj``'s output row ``(h // repeats, d)`` scaled (GQA: each key/value head
  serves ``repeats = num_heads / num_kv_heads`` query heads, whose ``s`` must then be equal);
  ``v_proj``'s rows (and bias) become ``/ s``;
* ``up_proj`` for ``down_proj``: ``down_proj`` reads ``act(gate_proj(x)) * up_proj(x)``, linear in
  ``up_proj``'s output, whose rows become ``/ s``.

Which op feeds which linear is not traced: it comes from ``FOLD_TABLE``, keyed by the class of
a container module (a decoder layer; glassllm's top level for its final norm), and every entry is
checked against the modules it matches (classes, shapes, head counts) before anything changes.
transformers' final norm is not folded into ``lm_head``: its output is also returned to the user
(``last_hidden_state``). Anything the table does not cover keeps ``1 / s`` as a per-linear
pre-scale (the quantized weight's ``act_pre_scale``, applied in float32 at run time).

Classes are matched by their qualified names, so this module imports neither transformers nor
``lowbit.eval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.tensors.base import QuantizedTensor

__all__ = ["FoldGroup", "FoldReport", "FOLD_TABLE", "find_fold_groups", "fold_scales"]


_TF = "transformers.models"
_LLAMA_STYLE = ("llama.modeling_llama.Llama", "mistral.modeling_mistral.Mistral", "qwen2.modeling_qwen2.Qwen2")
_GLASS = "lowbit.eval.glassllm."

# RMSNorms whose forward is ``weight * normalized(x)``: the weight is a per-channel factor.
_RMS_NORMS = frozenset(
    [f"{_TF}.{p}RMSNorm" for p in _LLAMA_STYLE] + [_GLASS + "_RMSNorm", "torch.nn.modules.normalization.RMSNorm"]
)
# attention blocks: o_proj(attention(q_proj(x), k_proj(x), v_proj(x))), query head h reads key/value head h // repeats
_ATTENTIONS = frozenset([f"{_TF}.{p}Attention" for p in _LLAMA_STYLE] + [_GLASS + "_Attention"])
# gated MLPs: down_proj(act(gate_proj(x)) * up_proj(x))
_GATED_MLPS = frozenset([f"{_TF}.{p}MLP" for p in _LLAMA_STYLE] + [_GLASS + "_SwiGLU"])


@dataclass(frozen=True)
class _Edge:
    """``absorber`` (a path relative to the container) computes the input of ``consumers`` and of
    nothing else; ``via`` is the block holding the consumers, whose class (one of ``via_classes``)
    vouches for that; ``heads``: read the attention heads from ``via`` (v_proj -> o_proj)."""

    absorber: str
    consumers: tuple[str, ...]
    via: str | None = None
    via_classes: frozenset = frozenset()
    heads: bool = False


def _layer(norm1, norm2, attn, mlp):
    return (
        _Edge(norm1, tuple(f"{attn}.{p}_proj" for p in "qkv"), attn, _ATTENTIONS),
        _Edge(norm2, (f"{mlp}.gate_proj", f"{mlp}.up_proj"), mlp, _GATED_MLPS),
        _Edge(f"{attn}.v_proj", (f"{attn}.o_proj",), attn, _ATTENTIONS, heads=True),
        _Edge(f"{mlp}.up_proj", (f"{mlp}.down_proj",), mlp, _GATED_MLPS),
    )


# qualified class name of a container module -> the folds inside it (paths relative to it)
FOLD_TABLE: dict[str, tuple[_Edge, ...]] = {
    **{f"{_TF}.{p}DecoderLayer": _layer("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
       for p in _LLAMA_STYLE},
    _GLASS + "_Block": _layer("norm1", "norm2", "attn", "mlp"),
    _GLASS + "GlassLLM": (_Edge("norm", ("lm_head",)),),  # GlassLLM.forward returns lm_head(norm(x)) only
}


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


@dataclass(frozen=True)
class FoldGroup:
    """One place scales can fold into: ``absorber``'s output is exactly the input of ``consumers``.

    Attributes:
        absorber: fqn of the norm (``kind="norm"``) or producer linear (``kind="linear"``).
        consumers: fqns of the linears that read it; folding needs one ``s`` for all of them.
        kind: ``"norm"`` (its weight becomes ``weight / s``) or ``"linear"`` (its rows become ``/ s``).
        heads: ``(num_kv_heads, repeats, head_dim)`` when the consumer is ``o_proj`` after ``v_proj``:
            ``s`` must be equal across the ``repeats`` query heads of each key/value head; else None.
        reason: None when the group can fold; otherwise why not (the table matched, a check failed).
        via: fqn of the block holding the consumers (the attention for q/k/v and o_proj, the MLP for
            gate/up and down_proj), whose output AWQ measures; None where the table names none.
    """

    absorber: str
    consumers: tuple[str, ...]
    kind: str
    heads: tuple[int, int, int] | None = None
    reason: str | None = None
    via: str | None = None

    def tie(self, v: torch.Tensor) -> torch.Tensor:
        """A per-input-channel statistic ``(K,)`` made equal across tied heads (their max); identity
        when nothing is tied. SmoothQuant ties its activation and weight ranges with this."""
        if self.heads is None:
            return v
        kv, rep, hd = self.heads
        return v.reshape(kv, rep, hd).amax(dim=1, keepdim=True).expand(kv, rep, hd).reshape(-1)

    def is_tied(self, s: torch.Tensor) -> bool:
        """Whether ``s`` (``(K,)``) is equal across the tied heads (always True with no heads)."""
        if self.heads is None:
            return True
        kv, rep, hd = self.heads
        v = s.reshape(kv, rep, hd)
        return bool(torch.equal(v, v[:, :1].expand_as(v)))

    def row_factor(self, s: torch.Tensor) -> torch.Tensor:
        """For a linear absorber: the factor per output row of the absorber (``(N_absorber,)``)."""
        if self.heads is None:
            return s
        kv, rep, hd = self.heads
        return s.reshape(kv, rep, hd)[:, 0].reshape(-1)


@dataclass
class FoldReport:
    """What ``fold_scales`` did.

    Attributes:
        folded: consumer fqn -> the absorber its ``1 / s`` went into.
        prescaled: consumer fqn -> why its ``1 / s`` could not be folded; the caller must multiply
            the linear's input by ``1 / s`` (the quantized weight's ``act_pre_scale``).
        scales: consumer fqn -> the ``s`` its weight columns were multiplied by (float32, ``(K,)``).
            Equal to the given ``s``, except behind a norm whose new weight ``weight / s`` was
            rounded to a low-precision dtype: there it is ``weight / new_weight``, so the product
            norm x linear is unchanged up to float32 rounding.
    """

    folded: dict[str, str] = field(default_factory=dict)
    prescaled: dict[str, str] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line: how many linears were folded and how many kept a pre-scale."""
        return (f"{len(self.folded)} linear(s) folded into the preceding norm or linear, "
                f"{len(self.prescaled)} kept a pre-scale")


def _float_weight(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, QuantizedTensor) or not w.is_floating_point():
        return None
    return w


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    if hasattr(attn, "n_kv_heads"):  # glassllm
        return int(attn.n_heads), int(attn.n_kv_heads), int(attn.head_dim)
    cfg = attn.config  # transformers
    return int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(attn.head_dim)


def _check_edge(container: nn.Module, edge: _Edge, full) -> tuple[str, tuple[int, int, int] | None, str | None]:
    """(kind, heads, reason): reason None when the modules are what the table says; ``full`` makes
    a relative path an fqn (for the reasons)."""
    try:
        absorber = container.get_submodule(edge.absorber)
        consumers = [container.get_submodule(c) for c in edge.consumers]
        via = None if edge.via is None else container.get_submodule(edge.via)
    except AttributeError as e:
        return "", None, f"module missing ({e})"
    kind = "linear" if isinstance(absorber, nn.Linear) else "norm"
    if via is not None and _qualname(via) not in edge.via_classes:
        return kind, None, f"{full(edge.via)} is a {_qualname(via)}, not one of the known blocks {sorted(edge.via_classes)}"
    for name, c in zip(edge.consumers, consumers):
        if not isinstance(c, nn.Linear):
            return kind, None, f"consumer {full(name)} is a {type(c).__name__}, not an nn.Linear"
        if _float_weight(c) is None:
            return kind, None, f"consumer {full(name)}'s weight is already quantized"
    k = consumers[0].in_features
    if any(c.in_features != k for c in consumers):
        return kind, None, f"consumers of {full(edge.absorber)} disagree on in_features"
    w = _float_weight(absorber)
    if w is None:
        return kind, None, f"{full(edge.absorber)}'s weight is quantized or missing"
    if kind == "norm":
        if _qualname(absorber) not in _RMS_NORMS:
            return kind, None, f"{full(edge.absorber)} is a {_qualname(absorber)}, not a known RMSNorm"
        if w.shape != (k,):
            return kind, None, f"{full(edge.absorber)}.weight has shape {tuple(w.shape)}, consumers read {k} channels"
        return kind, None, None
    heads = None
    if edge.heads:
        n_heads, n_kv, hd = _heads(via)
        if n_kv <= 0 or n_heads % n_kv or absorber.out_features != n_kv * hd or k != n_heads * hd:
            return kind, None, (f"heads do not match: {n_heads} query / {n_kv} key-value heads of {hd}, "
                                f"{full(edge.absorber)} has {absorber.out_features} rows, consumer reads {k}")
        heads = (n_kv, n_heads // n_kv, hd)
    elif absorber.out_features != k:
        return kind, None, f"{full(edge.absorber)} has {absorber.out_features} rows, consumers read {k}"
    return kind, heads, None


def find_fold_groups(model: nn.Module) -> list[FoldGroup]:
    """The groups of ``FOLD_TABLE`` found in ``model``, each checked against its modules.

    Args:
        model: any module; containers whose class is not in ``FOLD_TABLE`` contribute nothing.

    Returns:
        One ``FoldGroup`` per table entry matched, with ``reason`` set where a check failed.
    """
    groups = []
    for prefix, container in model.named_modules():
        edges = FOLD_TABLE.get(_qualname(container))
        if edges is None:
            continue
        full = (lambda p: f"{prefix}.{p}") if prefix else (lambda p: p)
        for edge in edges:
            kind, heads, reason = _check_edge(container, edge, full)
            groups.append(FoldGroup(full(edge.absorber), tuple(full(c) for c in edge.consumers), kind, heads, reason,
                                    None if edge.via is None else full(edge.via)))
    return groups


def _check_scales(model: nn.Module, scales: dict) -> dict[str, torch.Tensor]:
    if not isinstance(scales, dict):
        raise TypeError(f"scales must be a dict {{linear fqn: s}}, got {type(scales).__name__}")
    out = {}
    for fqn, s in scales.items():
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"scales names {fqn!r}, which is not a module of the model") from None
        if not isinstance(module, nn.Linear) or _float_weight(module) is None:
            raise ValueError(f"scales[{fqn!r}]: {fqn} must be an nn.Linear with a float weight, got {type(module).__name__}")
        if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.shape != (module.in_features,):
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"scales[{fqn!r}] must be a float tensor of shape ({module.in_features},), got {shape}")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"scales[{fqn!r}] must be finite and > 0 (min {float(s.min())}, max {float(s.max())})")
        out[fqn] = s.detach().float()
    return out


def _why_not(group: FoldGroup, scales: dict[str, torch.Tensor]) -> str | None:
    if group.reason is not None:
        return group.reason
    missing = [c for c in group.consumers if c not in scales]
    if missing:
        return f"{group.absorber} also feeds {missing}, which have no scale"
    first = scales[group.consumers[0]]
    if any(not torch.equal(scales[c], first) for c in group.consumers[1:]):
        return f"the linears reading {group.absorber} have different scales (folding needs one)"
    if not group.is_tied(first):
        return "s differs across the query heads that share a key/value head"
    return None


def fold_scales(model: nn.Module, scales: dict[str, torch.Tensor], groups: list[FoldGroup] | None = None) -> FoldReport:
    """Multiply each listed linear's weight columns by ``s`` and fold ``1 / s`` where the model allows.

    After the call the model computes what it computed before, up to float32 rounding (and the
    rounding of the new weights to their dtype), provided the caller multiplies the input of every
    linear in ``report.prescaled`` by ``1 / s``. Nothing changes when it raises.

    Args:
        model: the float model (changed in place: new weight tensors, never in-place writes, so a
            weight shared with another module, e.g. a tied embedding, is left as it was).
        scales: ``{linear fqn: s}`` with ``s`` float, ``(in_features,)``, finite and > 0.
        groups: the fold structure; default ``find_fold_groups(model)``; ``[]`` folds nothing.

    Returns:
        A ``FoldReport``: which linears were folded into what, which keep a pre-scale and why,
        and the ``s`` applied to each weight.

    Raises:
        TypeError: ``scales`` is not a dict.
        ValueError: a key is not a float ``nn.Linear`` of ``model``; an ``s`` of the wrong shape,
            not finite or not positive; a new weight would overflow its dtype.

    Example:
        >>> report = fold_scales(model, {"layers.0.self_attn.o_proj": s})
        >>> report.folded
        {'layers.0.self_attn.o_proj': 'layers.0.self_attn.v_proj'}
    """
    scales = _check_scales(model, scales)
    groups = find_fold_groups(model) if groups is None else groups
    report = FoldReport()
    col = dict(scales)  # linear -> factor on its input columns
    row: dict[str, torch.Tensor] = {}  # linear absorber -> divisor of its output rows
    norms: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}  # norm absorber -> (divisor of its weight, consumers)
    by_consumer = {c: g for g in groups for c in g.consumers}
    for group in groups:
        if not any(c in scales for c in group.consumers):
            continue
        reason = _why_not(group, scales)
        if reason is not None:
            report.prescaled.update({c: reason for c in group.consumers if c in scales})
            continue
        s = scales[group.consumers[0]]
        if group.kind == "norm":
            norms[group.absorber] = (s, group.consumers)
        else:
            row[group.absorber] = group.row_factor(s)
        report.folded.update({c: group.absorber for c in group.consumers})
    for fqn in scales:
        if fqn not in by_consumer:
            report.prescaled[fqn] = "no norm or linear in the fold table produces its input"
    # new tensors first (norms before linears: a norm's rounding sets its consumers' effective s),
    # checked, then assigned: nothing changes when a new weight overflows its dtype
    updates = []  # (module, attribute, new tensor)
    for name, (s, consumers) in norms.items():
        norm = model.get_submodule(name)
        w = norm.weight.detach()
        new = (w.float() / s.to(w.device)).to(w.dtype)
        ok = (new != 0) & (w != 0)
        s_eff = torch.where(ok, w.float() / torch.where(ok, new, 1).float(), s.to(w.device))
        updates.append((norm, "weight", new))
        col.update(dict.fromkeys(consumers, s_eff))
    for name in dict.fromkeys([*col, *row]):
        lin = model.get_submodule(name)
        w = lin.weight.detach().float()
        if name in col:
            w = w * col[name].to(w.device)
        if name in row:
            r = row[name].to(w.device)
            w = w / r[:, None]
            if lin.bias is not None:
                updates.append((lin, "bias", (lin.bias.detach().float() / r).to(lin.bias.dtype)))
        updates.append((lin, "weight", w.to(lin.weight.dtype)))
    for module, attr, new in updates:
        if not bool(torch.isfinite(new).all()):
            name = next(n for n, m in model.named_modules() if m is module)
            raise ValueError(f"scales make {name}.{attr} overflow {new.dtype} (s too large or too small for it)")
    for module, attr, new in updates:
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    report.scales = {fqn: col[fqn] for fqn in scales}
    return report
