"""Calibration-free int4 qparams rules on SmolLM2-135M-Instruct: perplexity of each (issue 16's search).

Every ``nn.Linear`` but the tied ``lm_head`` gets int4 weights through fake quantization
(``quantize_affine`` then ``dequantize_affine`` with a rule's ``(scale, zero_point)``), with the
group sizes ``benchmarks/algorithms.py`` gets from ``quantize_``'s plan (``--groups 128``: 128 where
it divides in_features, i.e. ``down_proj``, 64 elsewhere). Evaluation as ``benchmarks/algorithms.py``:
16 x 256 tokens from the start of ``pydoc_data.topics``. With the same qparams this gives the
perplexities of ``quantize_`` (checked: RTN int zero point g64 25.245, HQQ float zero point 23.599).

Rules (``--rules``; each a function ``(w, spec) -> (scale, zero_point)``, no data):

* ``rtn``: ``choose_qparams_affine`` (the spec's min/max);
* ``hqq``, ``hqq-scale``, ``hqq-group-lp``, ``hqq-scale-group-lp``: ``hqq_qparams`` with its
  default selection (tensor-l1 for a float zero point), the scale fitted too, the group-lp selection;
* ``grid-l2``, ``grid-l1``, ``grid-absw``, ``grid-sq``, ``grid-l2-lloyd``: a per-group search over
  ranges anchored at the group minimum (``(max - min) / t`` for t in 14.0, 14.1, ..., 16.0, the
  idea of llama.cpp's k-quant search), each refitted by (weighted) least squares, the best kept by
  the weighted l_p error of what would be stored; weights 1 (l2, l1), ``rms + |w|`` (absw),
  ``w^2`` (sq); lloyd: then 10 rounds of re-rounding and refitting;
* ``noclip-l2``, ``noclip-p07``: ranges that cover ``[min, max]`` (scale x 1..1.2, the slack
  split 9 ways), the best by l2 / l_0.7 error;
* ``unbiased-normw*``: ``unbiased-round`` with the error sum weighted per input column by the
  feeding RMSNorm's gain (signed, or |g|^p for p = 0.5, 1, 2, 3, 4);
* ``unbiased``, ``unbiased-round``, ``unbiased-expand``: float zero point moved until each
  group's error sum is zero (unrounded start, rounded start, scale x 1..1.1 chosen by l2);
* ``int-sum1``, ``int-l2``: int zero point; scales ``r/15 * f`` (f 0.90..1.10) with
  ``round(-min/s) +- 1``, the best by ``sum e^2 + (sum e)^2`` or ``sum e^2``.

Usage::

    python benchmarks/hqq_variants.py --rules rtn,hqq --domain float --groups 64,128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit import Int4WeightOnlyConfig  # noqa: E402
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, quantize_affine  # noqa: E402
from lowbit.primitives.hqq import hqq_qparams  # noqa: E402


def _groups(w, spec):
    (n, k), (br, bc) = w.shape, spec.block_size(w.shape)
    return w.float().reshape(n // br, br, k // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)


def _error(x, wt, s, z, qmax, domain, p):
    q = torch.clamp(torch.round(x / s) + z if domain == "int" else torch.round(x / s + z), 0, qmax)
    return (wt * (x - (q - z) * s).abs().pow(p)).sum(-1, keepdim=True)


def _keep(state, cand):
    """state, cand: (objective, scale, zero) per group; the better per group."""
    if state is None:
        return cand
    b = cand[0] < state[0]
    return tuple(torch.where(b, c, s) for c, s in zip(cand, state))


def _fit(x, wt, q):
    """Weighted least squares x ~ a q + b per group."""
    sw, sx, sq = wt.sum(-1, keepdim=True), (wt * x).sum(-1, keepdim=True), (wt * q).sum(-1, keepdim=True)
    sqq, sxq = (wt * q * q).sum(-1, keepdim=True), (wt * x * q).sum(-1, keepdim=True)
    d = sw * sqq - sq * sq
    a, b = (sw * sxq - sx * sq) / d, (sqq * sx - sq * sxq) / d
    return a, b, (d > 0) & torch.isfinite(a) & (a > 1e-12)


def grid(weighting="l2", p=2.0, lloyd=0):
    def rule(w, spec):
        x = _groups(w, spec)
        wt = {"l2": torch.ones_like(x), "absw": x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs(),
              "sq": x.pow(2)}[weighting]
        s0, z0 = choose_qparams_affine(w, spec)
        qmax, dom = spec.qmax, spec.zero_point_domain
        mn, mx = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        if dom == "int":
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        r = (mx - mn).clamp_min(1e-12)
        s = r / qmax
        z = -mn / s if dom == "float" else torch.clamp(-torch.round(mn / s), 0, qmax)
        best = (_error(x, wt, s, z, qmax, dom, p), s, z)
        for t in [qmax - 1 + 0.1 * i for i in range(21)]:
            st = r / t
            q = torch.clamp(torch.round((x - mn) / st), 0, qmax)
            if dom == "float":
                a, b, ok = _fit(x, wt, q)
                s2, z2 = torch.where(ok, a, st), torch.where(ok, -b / a, -mn / st)
                best = _keep(best, (_error(x, wt, s2, z2, qmax, dom, p), s2, z2))
            else:
                for dz in (-1, 0, 1):
                    zc = torch.clamp(-torch.round(mn / st) + dz, 0, qmax)
                    qz = torch.clamp(torch.round(x / st) + zc, 0, qmax) - zc
                    a = (wt * x * qz).sum(-1, keepdim=True) / (wt * qz * qz).sum(-1, keepdim=True)
                    s2 = torch.where(torch.isfinite(a) & (a > 1e-12), a, st)
                    best = _keep(best, (_error(x, wt, s2, zc, qmax, dom, p), s2, zc))
        for _ in range(lloyd if dom == "float" else 0):
            q = torch.clamp(torch.round(x / best[1] + best[2]), 0, qmax)
            a, b, ok = _fit(x, wt, q)
            s2, z2 = torch.where(ok, a, best[1]), torch.where(ok, -b / a, best[2])
            best = _keep(best, (_error(x, wt, s2, z2, qmax, dom, p), s2, z2))
        return best[1].reshape(s0.shape).float(), best[2].reshape(z0.shape).to(z0.dtype)
    return rule


def noclip(p=2.0):
    def rule(w, spec):
        x, (s0, z0) = _groups(w, spec), choose_qparams_affine(w, spec)
        qmax, dom = spec.qmax, spec.zero_point_domain
        mn, mx = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        if dom == "int":
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        r, one = (mx - mn).clamp_min(1e-12), torch.ones_like(x)
        best = None
        for e in (1.0, 1.02, 1.05, 1.1, 1.15, 1.2):
            st = r / qmax * e
            for i in range(9):
                z = (-(mn - (st * qmax - r) * i / 8)) / st
                z = torch.clamp(torch.round(z), 0, qmax) if dom == "int" else z
                best = _keep(best, (_error(x, one, st, z, qmax, dom, p), st, z))
        return best[1].reshape(s0.shape).float(), best[2].reshape(z0.shape).to(z0.dtype)
    return rule


def unbiased(expand=(1.0,), round_start=False, iters=10):
    """Float zero point: z <- mean(q - x/s) until the group's error sum is ~0 (best |sum e| kept)."""
    def rule(w, spec):
        x, (s0, z0) = _groups(w, spec), choose_qparams_affine(w, spec)
        qmax = spec.qmax
        mn, mx = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        r, best = (mx - mn).clamp_min(1e-12), None
        for e in expand:
            s = r / qmax * e
            z = -mn / s - (e - 1) * qmax / 2 / e
            z = torch.round(z) if round_start else z
            kept = None
            for _ in range(iters + 1):
                q = torch.clamp(torch.round(x / s + z), 0, qmax)
                kept = _keep(kept, ((x - (q - z) * s).sum(-1, keepdim=True).abs(), s, z))
                z = (q - x / s).mean(-1, keepdim=True)
            z = kept[2]
            best = _keep(best, (_error(x, torch.ones_like(x), s, z, qmax, "float", 2.0), s, z))
        return best[1].reshape(s0.shape).float(), best[2].reshape(z0.shape).float()
    return rule


COLW = {"w": None}


def unbiased_w(signed=True, iters=10, power=1.0):
    """unbiased-round with column weights c = |g|^power, g the gain of the RMSNorm feeding the linear (q/k/v,
    gate/up; others c = 1, as ``unbiased-round``): sum_j c_j e_j -> 0 per group. Data-free: the gain
    stands in for the input channel's magnitude. A group whose weights nearly cancel keeps c = 1."""
    def rule(w, spec):
        x, (s0, z0) = _groups(w, spec), choose_qparams_affine(w, spec)
        qmax = spec.qmax
        n, k = w.shape
        bc = spec.block_size(w.shape)[1]
        c = COLW["w"]
        if c is None:
            c = torch.ones(k)
        c = c.float() if signed else c.float().abs().pow(power)
        cw = c.reshape(1, k // bc, bc).expand(n, -1, -1).reshape(-1, bc)
        den = cw.sum(-1, keepdim=True)
        ok = den.abs() > 0.05 * cw.abs().sum(-1, keepdim=True)
        cw = torch.where(ok, cw, torch.ones_like(cw)); den = cw.sum(-1, keepdim=True)
        mn, mx = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        s = (mx - mn).clamp_min(1e-12) / qmax
        z = torch.round(-mn / s)
        kept = None
        for _ in range(iters + 1):
            q = torch.clamp(torch.round(x / s + z), 0, qmax)
            kept = _keep(kept, ((cw * (x - (q - z) * s)).sum(-1, keepdim=True).abs(), s, z))
            z = (cw * (q - x / s)).sum(-1, keepdim=True) / den
        return kept[1].reshape(s0.shape).float(), kept[2].reshape(z0.shape).float()
    return rule


def int_search(lam):
    def rule(w, spec):
        x, (s0, z0) = _groups(w, spec), choose_qparams_affine(w, spec)
        qmax = spec.qmax
        mn = x.min(-1, keepdim=True).values.clamp(max=0)
        r, best = (x.max(-1, keepdim=True).values.clamp(min=0) - mn).clamp_min(1e-12), None
        for f in [1.0, *(0.9 + 0.01 * i for i in range(21))]:
            s = r / qmax * f
            for dz in ((0,) if f == 1.0 else (-1, 0, 1)):
                z = torch.clamp(-torch.round(mn / s) + dz, 0, qmax)
                e = x - (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s
                best = _keep(best, (e.pow(2).sum(-1, keepdim=True) + lam * e.sum(-1, keepdim=True).pow(2), s, z))
        return best[1].reshape(s0.shape).float(), best[2].reshape(z0.shape).to(z0.dtype)
    return rule


RULES = {
    "rtn": choose_qparams_affine,
    "hqq": hqq_qparams,
    "hqq-scale": lambda w, s: hqq_qparams(w, s, optimize_scale=True, selection="tensor-l1"),
    "hqq-group-lp": lambda w, s: hqq_qparams(w, s, optimize_scale=False, selection="group-lp"),
    "hqq-scale-group-lp": lambda w, s: hqq_qparams(w, s, optimize_scale=True, selection="group-lp"),
    "hqq-tensor-l1": lambda w, s: hqq_qparams(w, s, selection="tensor-l1"),
    "hqq-tensor-l1-zero": lambda w, s: hqq_qparams(w, s, selection="tensor-l1", optimize_scale=False),
    "grid-l2": grid("l2"), "grid-l1": grid("l2", p=1.0), "grid-absw": grid("absw"), "grid-sq": grid("sq", lloyd=10),
    "grid-l2-lloyd": grid("l2", lloyd=10),
    "noclip-l2": noclip(2.0), "noclip-p07": noclip(0.7),
    "unbiased": unbiased(), "unbiased-round": unbiased(round_start=True),
    "unbiased-expand": unbiased(expand=(1.0, 1.02, 1.05, 1.1)),
    "unbiased-normw": unbiased_w(True), "unbiased-normw-abs": unbiased_w(False),
    "unbiased-normw-sqrt": unbiased_w(False, power=0.5), "unbiased-normw-sq": unbiased_w(False, power=2.0),
    "unbiased-normw-p3": unbiased_w(False, power=3.0), "unbiased-normw-p4": unbiased_w(False, power=4.0),
    "int-sum1": int_search(1.0), "int-l2": int_search(0.0),
}


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="rtn,hqq", help=f"comma-separated, of: {', '.join(RULES)}")
    ap.add_argument("--domain", choices=["int", "float"], default="float", help="the zero point's domain")
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rules = [r.strip() for r in args.rules.split(",")]
    if unknown := [r for r in rules if r not in RULES]:
        sys.exit(f"--rules: unknown {unknown}; allowed: {list(RULES)}")
    from lowbit.eval import eval_text, perplexity, tokenize_for_perplexity
    from lowbit.eval.models import load_smollm2

    model, tok = load_smollm2()
    model = model.float().eval()
    text = tokenize_for_perplexity(tok, eval_text())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    orig = {n: m.weight.detach().clone() for n, m in linears}

    def ppl():
        with torch.no_grad():
            return perplexity(_Logits(model), text.ids, 256, 16, prefix=text.prefix)

    ref = ppl()
    print(f"float32 {ref:.3f}; load {open('/proc/loadavg').read().split()[0]}", flush=True)
    for g in [int(x) for x in args.groups.split(",")]:
        for rule in rules:
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, m in linears:
                    w = orig[n]
                    spec = Int4WeightOnlyConfig(group_size=g if w.shape[1] % g == 0 else 64,
                                                zero_point_domain=args.domain).weight_spec()
                    parent, _, leaf = n.rpartition(".")
                    layer = model.get_submodule(parent.rpartition(".")[0])
                    norm = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
                            "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}.get(leaf)
                    COLW["w"] = None if norm is None else getattr(layer, norm).weight.detach()
                    s, z = RULES[rule](w, spec)
                    m.weight.copy_(dequantize_affine(quantize_affine(w, s, z, spec), s, z, spec, torch.float32))
            value = ppl()
            for n, m in linears:
                m.weight.data.copy_(orig[n])
            print(f"g{g} {args.domain:5} {rule:20} ppl {value:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
