"""HQQ (Badri & Shaji 2023): calibration-free qparams that minimize ``sum |W - dequant(quant(W))|^p``
per group, with ``p < 1`` so that a few large errors (outliers) cost less than many small ones.

Half-quadratic splitting introduces the error ``W_e`` as its own variable and alternates, for all
groups at once:

* ``q = clamp(round(W / s + z), qmin, qmax)`` with the current scale ``s`` and zero point ``z``;
* ``W_e = shrink_p(W - (q - z) s, beta)``: the l_p proximal step, which keeps only errors too
  large to be worth fitting (``shrink_p(x) = sign(x) relu(|x| - |x|^(p-1) / beta)``);
* the closed-form least-squares fit of ``W - W_e ~ (q - z) s``: ``z = mean(q - (W - W_e) / s)``
  for the zero point alone; with the scale too, the line fit of ``W - W_e`` against ``q``;
  the scale alone (symmetric specs) ``s = <W - W_e, q - z> / |q - z|^2``;
* ``beta *= kappa``.

Starting point: the spec's own min/max qparams (round-to-nearest's). Each group keeps the best
qparams seen, judged by the objective of what would be stored (the int zero point rounded and
clamped to ``[qmin, qmax]``, computed with the primitives), so the objective never increases and
the result is never worse than round-to-nearest's qparams.

That is ``selection="group-lp"``. ``selection="tensor-l1"`` keeps the hqq package's rule instead
(rounded starting zero point, stop when the whole tensor's mean ``|W - W_r|`` stops falling), which
the configs use for a float zero point (``hqq_optimize``'s docstring has the measurement).

Configs select it with their ``qparams="hqq"`` field (``weight_qparams`` below); the codes are
still made by ``quantize_affine`` with the chosen qparams, so QAT and PTQ quantize identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from lowbit.spec import QuantSpec

__all__ = ["HQQResult", "hqq_optimize", "hqq_qparams", "QPARAMS_RULES", "SELECTIONS", "weight_qparams"]

# how a weight's qparams are chosen (a config's ``qparams`` field): "minmax", the spec's own rule
# (``choose_qparams_affine``: round-to-nearest over each block's range); "hqq", :func:`hqq_qparams`
# with its defaults (no calibration data)
QPARAMS_RULES = ("minmax", "hqq")
# which HQQ iterate is kept (``hqq_optimize``'s ``selection``)
SELECTIONS = ("auto", "group-lp", "tensor-l1")


@dataclass
class HQQResult:
    """HQQ's qparams for one weight and the objective's history.

    Attributes:
        scale, zero_point: as ``choose_qparams_affine(w, spec)`` returns them (zero point None
            for a symmetric signed spec).
        objective: ``sum |W - dequant(quant(W))|^p`` over the tensor with the best qparams so far,
            before the first iteration (round-to-nearest's qparams) and after each one.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    objective: list[float] = field(default_factory=list)


def _groups(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(N, K) -> (groups, elements per group), groups in the order of the qparams' elements."""
    (n, k), (br, bc) = x.shape, block
    return x.reshape(n // br, br, k // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The l_p proximal ("shrinkage") step of half-quadratic splitting."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1.0) / beta)


def _check(w, spec, iters, p, beta, kappa, optimize_scale):
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        what = f"{w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a non-empty 2-D floating tensor (out, in), got {what}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or inf")
    if not isinstance(spec, QuantSpec) or spec.dtype.is_float:
        raise ValueError(f"spec must be an integer QuantSpec, got {spec!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters!r} must be an int >= 0")
    for name, v, ok, allowed in (("p", p, lambda v: 0 < v <= 1, "in (0, 1]"), ("beta", beta, lambda v: v > 0, "> 0"),
                                 ("kappa", kappa, lambda v: v >= 1, ">= 1")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name}={v!r} must be a finite float {allowed}")
    if optimize_scale is not None and not isinstance(optimize_scale, bool):
        raise ValueError(f"optimize_scale={optimize_scale!r} must be None or a bool")


@torch.no_grad()
def hqq_optimize(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool | None = None,
    selection: str = "auto",
) -> HQQResult:
    """HQQ's qparams for ``w`` under ``spec`` and the objective after each iteration (module docstring).

    Args:
        w: (N, K) float weight.
        spec: an integer spec (a config's ``weight_spec()``); asymmetric: the zero point is
            optimized (int domain: rounded into ``[qmin, qmax]`` at the end; float domain: kept
            unrounded); symmetric: the scale.
        iters: solver iterations (0: round-to-nearest's qparams).
        p: the error norm's exponent, in (0, 1].
        beta, kappa: the shrinkage's initial weight and its growth per iteration.
        optimize_scale: fit the scale as well as the zero point. None: yes, except for a float
            zero point (HQQ's own setting: min/max scale, free float zero point). An integer zero
            point alone rarely moves (it stays within 0.5 of round-to-nearest's and rounds back),
            and a symmetric spec has only its scale.
        selection: which iterate is kept. "group-lp": every group keeps its best qparams by the
            l_p objective over all ``iters`` (never worse than round-to-nearest's by that
            objective). "tensor-l1": the hqq package's rule: the float zero point starts rounded,
            and the iterations stop at the first one whose whole-tensor mean ``|W - W_r|`` does
            not improve, keeping the last improving qparams (``objective`` then holds that mean
            per kept iterate; ``kappa`` is not used). "auto" (default): "tensor-l1" for a float zero point fitted alone,
            else "group-lp". On SmolLM2 int4 g64 (float zero point) "tensor-l1" gave perplexity
            23.60 against "group-lp"'s 24.26 (RTN 25.25, the hqq package 23.60).

    Returns:
        :class:`HQQResult`.

    Raises:
        ValueError: bad arguments, NaN/inf in ``w``, ``optimize_scale=False`` with a symmetric
            spec (nothing to optimize), a spec whose blocks do not divide ``w``.
    """
    _check(w, spec, iters, p, beta, kappa, optimize_scale)
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; allowed: {SELECTIONS}")
    free_zero = not spec.symmetric
    fit_scale = spec.zero_point_domain != "float" if optimize_scale is None else optimize_scale
    if not (free_zero or fit_scale):
        raise ValueError(f"optimize_scale=False with a symmetric spec ({spec.dtype.name}): HQQ would have nothing "
                         "to optimize (no zero point)")
    if selection == "auto":
        selection = "tensor-l1" if free_zero and not fit_scale and spec.zero_point_domain == "float" else "group-lp"
    if selection == "tensor-l1":
        return _tensor_l1(w, spec, iters, p, beta, kappa, fit_scale)
    block = spec.block_size(w.shape)
    scale0, zp0 = choose_qparams_affine(w, spec)
    shape = scale0.shape
    wg = _groups(w.detach().float(), block)
    qmin, qmax = spec.qmin, spec.qmax

    def stored_zero(z):
        if zp0 is None:
            return None
        if spec.zero_point_domain == "int":
            z = torch.clamp(torch.round(z), qmin, qmax)
        return z.reshape(shape).to(spec.zero_point_dtype)

    def objective(s, z):  # per group, of what would be stored, through the primitives
        s2, z2 = s.reshape(shape).to(spec.scale_dtype), stored_zero(z)
        err = w.float() - dequantize_affine(quantize_affine(w, s2, z2, spec), s2, z2, spec, torch.float32)
        return _groups(err, block).abs().pow(p).sum(-1)

    s = scale0.float().reshape(-1, 1)
    z = torch.zeros_like(s) if zp0 is None else zp0.float().reshape(-1, 1)
    best_s, best_z, best = s.clone(), z.clone(), objective(s, z)
    history = [float(best.double().sum())]
    for _ in range(iters):
        q = torch.clamp(torch.round(wg / s + z), qmin, qmax)
        target = wg - _shrink(wg - (q - z) * s, beta, p)
        if free_zero and fit_scale:  # least-squares line target ~ a q + b: s = a, z = -b / a
            qc = q - q.mean(-1, keepdim=True)
            a = (qc * target).sum(-1, keepdim=True) / (qc * qc).sum(-1, keepdim=True)
            ok = torch.isfinite(a) & (a > spec.eps)
            b = target.mean(-1, keepdim=True) - a * q.mean(-1, keepdim=True)
            s, z = torch.where(ok, a, s), torch.where(ok, -b / a, z)
        elif free_zero:
            z = (q - target / s).mean(-1, keepdim=True)
        else:
            qz = q - z
            a = (qz * target).sum(-1, keepdim=True) / (qz * qz).sum(-1, keepdim=True)
            s = torch.where(torch.isfinite(a) & (a > spec.eps), a, s)
        beta *= kappa
        current = objective(s, z)
        better = current < best
        best = torch.where(better, current, best)
        best_s = torch.where(better[:, None], s, best_s)
        best_z = torch.where(better[:, None], z, best_z)
        history.append(float(best.double().sum()))
    return HQQResult(best_s.reshape(shape).to(spec.scale_dtype), stored_zero(best_z), history)


def _tensor_l1(w, spec, iters, p, beta, kappa, fit_scale) -> HQQResult:
    """The hqq package's selection (see ``hqq_optimize``'s ``selection``): same updates, a rounded
    starting zero point, stop at the first iterate whose tensor mean ``|W - W_r|`` is not lower;
    ``beta`` stays fixed (``kappa`` unused), as in the package's default optimizer."""
    block = spec.block_size(w.shape)
    scale0, zp0 = choose_qparams_affine(w, spec)
    shape = scale0.shape
    wg = _groups(w.detach().float(), block)
    qmin, qmax = spec.qmin, spec.qmax
    s = scale0.float().reshape(-1, 1)
    z = torch.zeros_like(s) if zp0 is None else zp0.float().reshape(-1, 1)
    if zp0 is not None and spec.zero_point_domain == "float":
        z = torch.round(z)
    best_s, best_z, history = s, z, []
    for _ in range(iters + 1):
        if zp0 is not None and spec.zero_point_domain == "int":
            z = torch.clamp(torch.round(z), qmin, qmax)  # judged and updated as it would be stored
        q = torch.clamp(torch.round(wg / s + z), qmin, qmax)
        err = wg - (q - z) * s
        current = float(err.abs().double().mean())
        if history and current >= history[-1]:
            break
        best_s, best_z = s, z
        history.append(current)
        target = wg - _shrink(err, beta, p)
        if fit_scale:
            qz = q - z
            a = (qz * target).sum(-1, keepdim=True) / (qz * qz).sum(-1, keepdim=True)
            s = torch.where(torch.isfinite(a) & (a > spec.eps), a, s)
        if zp0 is not None:
            z = (q - target / s).mean(-1, keepdim=True)
    zero = None if zp0 is None else best_z.reshape(shape).to(spec.zero_point_dtype)
    return HQQResult(best_s.reshape(shape).to(spec.scale_dtype), zero, history)


def hqq_qparams(w: torch.Tensor, spec: QuantSpec, *, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                kappa: float = 1.01, optimize_scale: bool | None = None,
                selection: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero_point)`` for ``w`` under ``spec`` by HQQ: see :func:`hqq_optimize` (same arguments).

    The pair goes to ``quantize_affine(w, scale, zero_point, spec)`` like ``choose_qparams_affine``'s.

    Example:
        >>> spec = Int4WeightOnlyConfig(group_size=64).weight_spec()
        >>> scale, zp = hqq_qparams(linear.weight, spec)
    """
    r = hqq_optimize(w, spec, iters=iters, p=p, beta=beta, kappa=kappa, optimize_scale=optimize_scale,
                     selection=selection)
    return r.scale, r.zero_point


def weight_qparams(w: torch.Tensor, spec: QuantSpec, rule: str = "minmax") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero_point)`` of a weight under ``spec``, chosen by ``rule`` (one of ``QPARAMS_RULES``).

    Args:
        w: the float weight; 2-D (out, in) for "hqq".
        spec: an integer spec (a config's ``weight_spec()``).
        rule: "minmax" (``choose_qparams_affine(w, spec)``) or "hqq" (``hqq_qparams(w, spec)``).

    Raises:
        ValueError: an unknown rule, or what the chosen function raises.
    """
    if rule == "minmax":
        return choose_qparams_affine(w, spec)
    if rule == "hqq":
        return hqq_qparams(w, spec)
    raise ValueError(f"rule={rule!r}; allowed: {QPARAMS_RULES}")
