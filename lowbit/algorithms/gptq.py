"""GPTQ for one weight (Frantar et al. 2022): columns quantized in order, each one's rounding
error fed back into the columns not yet quantized through the inverse Hessian of the layer's
inputs, so that ``X W^T`` changes as little as the grid allows.

For a linear ``y = x W^T`` (W: (N, K)) seen on calibration inputs X (n, K), the Hessian of the
output error is ``H = 2 X^T X / n`` (:class:`Hessian`, accumulated in float32). With
``U = chol(H_damped^-1)`` (upper), quantizing column j to ``q_j`` sets
``err = (w_j - q_j) / U[j, j]`` and updates ``W[:, j+1:] -= err U[j, j+1:]``: the optimal brain
surgeon update with H's inverse restricted to the columns left, all rows at once. Columns go in
blocks of ``block_size`` ("lazy batch"): updates inside a block are applied column by column,
those to later columns once per block, which is the same arithmetic regrouped.

Every code is made by the primitives with the config's spec: a group's qparams are
``choose_qparams_affine`` on the group's columns as updated so far (or the clip of its min/max
with the least ``diag(H)``-weighted rounding error, ``qparams="search"``), each column is
``quantize_affine`` / ``dequantize_affine``'d with its group's qparams. The solver runs in
float64 (the primitives compute in float32 as always), so blocking changes no code.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from lowbit.primitives.affine import (
    _dequantize_from_float,
    _min_max,
    _quantize_to_float,
    choose_qparams_affine,
    choose_qparams_affine_from_min_max,
    fake_quantize_affine,
)
from lowbit.spec import QuantSpec

__all__ = ["gram", "Hessian", "GPTQResult", "gptq_quantize", "check_options", "damped_inverse_cholesky", "output_sqnr",
           "output_sqnrs", "searched_qparams"]

_log = logging.getLogger("lowbit")

DAMP_FACTOR = 10.0  # damping is multiplied by this when the factorization fails
MIN_RETRY_DAMP = 1e-4  # the first retry from damp=0 uses this


# clip search (qparams="search"): each block's min and max shrunk toward 0 by these factors. Down to
# 0.90: on 12 SmolLM2 linears (layers 0/10/20, int4 g64, act_order) output SQNR +0.19 dB over min/max;
# down to 0.70 it was 0.10 dB below min/max (the clipped range cannot hold the error feedback's updates)
SEARCH_SHRINKS = tuple(1.0 - i / 100 for i in range(11))  # 1.00, 0.99, ..., 0.90
QPARAMS = ("minmax", "search")


GRAM_BLOCKS = 4  # X^T X by row blocks of the upper triangle: 10/16 of the full product's flops


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for a 2-D ``x`` (rows, K), as ``GRAM_BLOCKS`` products of the upper triangle's
    row blocks, each mirrored below the diagonal (exactly symmetric; same dtype as ``x``)."""
    k = x.shape[1]
    blocks = max(1, min(GRAM_BLOCKS, k))
    out = torch.empty(k, k, dtype=x.dtype, device=x.device)
    edges = [k * i // blocks for i in range(blocks + 1)]
    for a, b in zip(edges, edges[1:]):
        row = x[:, a:b].t() @ x[:, a:]
        out[a:b, a:] = row
        out[a:, a:b] = row.t()
        diag = row[:, : b - a]  # the block on the diagonal: its upper triangle, mirrored
        out[a:b, a:b] = diag.triu() + diag.triu(1).t()
    return out


class Hessian:
    """``2 X^T X / n`` of a linear's inputs, accumulated in float32 over calibration batches.

    Args:
        in_features: K, the inputs' last dim.
        device: where the (K, K) sum lives.

    Example:
        >>> h = Hessian(64); h.add(x); H = h.value()
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (any leading dims, last dim K): ``sum += X^T X`` in float32."""
        k = self.sum.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"x has last dim {x.shape[-1]}, the Hessian is over {k} features")
        x2 = x.reshape(-1, k).to(self.sum.dtype)
        self.add_product(gram(x2), x2.shape[0])

    def add_product(self, xtx: torch.Tensor, rows: int) -> None:
        """Add an already computed ``X^T X`` (float32, (K, K)) of ``rows`` rows (shared inputs)."""
        self.sum += xtx
        self.count += rows

    def value(self) -> torch.Tensor:
        """``2 X^T X / n`` in float32.

        Raises:
            ValueError: no rows were added, or the sum holds NaN or inf.
        """
        if self.count == 0:
            raise ValueError("the Hessian has seen no inputs: no calibration batch reached this linear")
        if not bool(torch.isfinite(self.sum).all()):
            raise ValueError("the Hessian holds NaN or inf: a calibration input was not finite")
        return self.sum * (2.0 / self.count)


@dataclass
class GPTQResult:
    """One weight's GPTQ codes, qparams and what they stand for, in the canonical column order.

    Attributes:
        qdata: (N, K) codes in ``spec.dtype.storage`` (unpacked).
        scale, zero_point: the qparams, shaped as ``choose_qparams_affine(weight, spec)``'s.
        dequantized: (N, K) float32, ``dequantize_affine`` of each column as the solver made it.
        damp: the damping used, relative to the mean of H's diagonal.
        tries: factorizations tried (1: the first damping worked).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    dequantized: torch.Tensor
    damp: float
    tries: int


@contextlib.contextmanager
def _one_thread():
    """torch ops on one intra-op thread inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def damped_inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + d * mean(diag H) * I)^-1``, raising ``d`` on failure.

    ``d`` starts at ``damp`` and is multiplied by ``DAMP_FACTOR`` (from ``MIN_RETRY_DAMP`` when it
    was 0) each time a factorization fails, at most ``retries`` times.

    Returns:
        ``(U, d, tries)``.

    Raises:
        ValueError: every damping failed (the message lists them).
    """
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    flipped = h.flip(0, 1)  # J H J, J the order-reversing permutation
    d, tried = damp, []
    for attempt in range(retries + 1):
        tried.append(d)
        # J H_d J = L L^T  =>  H_d^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a
        # positive diagonal: it is the upper Cholesky factor of H_d^-1. One factorization and one triangular
        # inverse, instead of a factorization, an explicit inverse and a second factorization (3x faster
        # here; the factor agrees to ~1e-15 relative).
        lower, info = torch.linalg.cholesky_ex(flipped + (d * mean_diag) * eye)
        if int(info) == 0:
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(upper).all()):
                return upper, d, attempt + 1
        d = max(d * DAMP_FACTOR, MIN_RETRY_DAMP)
    raise ValueError(f"the damped Hessian is not positive definite with damp={tried} x mean(diag H) "
                     f"({mean_diag:.3g}); more calibration data or a larger damp is needed")


def _block_sums(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    r, c = x.shape
    return x.reshape(r // block[0], block[0], c // block[1], block[1]).sum(dim=(1, 3))


def searched_qparams(w: torch.Tensor, col_weight: torch.Tensor, spec: QuantSpec,
                     shrinks: tuple[float, ...] = SEARCH_SHRINKS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per block of ``spec`` over ``w`` (R, C): the qparams of the block's min and max shrunk by the
    factor in ``shrinks`` that gives the least ``sum_j col_weight[j] (w_ij - fq(w_ij))^2`` (``fq``:
    ``fake_quantize_affine`` with those qparams). With ``col_weight = diag(H)`` this is the output
    error of rounding to nearest, H's off-diagonal terms dropped. Ties keep the earlier factor, so
    with ``shrinks[0] == 1`` the result is never worse than ``choose_qparams_affine``'s by this
    measure. Qparams come from ``choose_qparams_affine_from_min_max`` (the one rule of numerics)."""
    block = spec.block_size(tuple(w.shape))
    mn, mx = _min_max(w, block)
    best = scale = zp = None
    for p in shrinks:
        s, z = choose_qparams_affine_from_min_max(mn * p, mx * p, spec)
        err = _block_sums((w - fake_quantize_affine(w, spec, s, z)).square_().mul_(col_weight), block)
        if best is None:
            best, scale, zp = err, s, z
            continue
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zp = None if zp is None else torch.where(better, z, zp)
    return scale, zp


def check_options(block_size: int, damp: float, act_order: bool, damp_retries: int, qparams: str = "minmax") -> None:
    """Raise ValueError naming the first bad GPTQ option."""
    if qparams not in QPARAMS:
        raise ValueError(f"qparams={qparams!r}; allowed: {', '.join(map(repr, QPARAMS))}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < float("inf"):
        raise ValueError(f"damp={damp!r} must be a finite float >= 0")
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order={act_order!r} must be a bool")
    if isinstance(damp_retries, bool) or not isinstance(damp_retries, int) or damp_retries < 0:
        raise ValueError(f"damp_retries={damp_retries!r} must be an int >= 0")


def _check(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D floating tensor (out, in), got {_describe(weight)}")
    n, k = weight.shape
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (k, k) or not hessian.is_floating_point():
        raise ValueError(f"hessian must be a floating ({k}, {k}) tensor for weight {tuple(weight.shape)}, got "
                         f"{_describe(hessian)}")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hessian).all()):
        raise ValueError("weight or hessian holds NaN or inf")
    if not isinstance(spec, QuantSpec) or spec.dtype.is_float:
        raise ValueError(f"spec must be an integer QuantSpec, got {spec!r}")
    rows, cols = spec.block_size((n, k))
    if rows not in (1, n):
        raise NotImplementedError(f"GPTQ quantizes column by column: a spec whose blocks span {rows} of {n} rows "
                                  f"({spec.granularity!r}) is not supported (rows must be 1 or all)")
    return rows, cols


def _describe(x) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def output_sqnr(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``10 log10(|X W^T|^2 / |X (W - Q)^T|^2)`` in dB, computed from ``H = 2 X^T X / n`` as
    ``tr(W H W^T) / tr(E H E^T)`` with ``E = W - Q``: the layer's output SQNR on the calibration
    inputs (``inf`` when ``Q == W`` there)."""
    return output_sqnrs(weight, [approx], hessian)[0]


def output_sqnrs(weight: torch.Tensor, approxs: list[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """:func:`output_sqnr` of each approximation in ``approxs`` of one ``weight``, ``tr(W H W^T)``
    computed once. Float32 products and float64 sums: a report, not a code."""
    h = hessian.float()
    w = weight.float()

    def energy(x: torch.Tensor) -> float:  # tr(x H x^T)
        return float(torch.mm(x, h).mul_(x).sum(dtype=torch.float64))

    signal = energy(w)
    out = []
    for a in approxs:
        noise = energy(w - a.float())
        if noise <= 0:
            out.append(float("inf"))
        else:
            out.append(10.0 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    return out


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    damp_retries: int = 4,
    qparams: str = "minmax",
) -> GPTQResult:
    """Quantize one weight with GPTQ under ``spec``.

    Groups: with ``act_order=False`` a group's qparams are chosen when its first column comes up,
    from its columns as updated by the error feedback so far (the lazy block is widened to a
    multiple of the group width so the group's columns are all up to date then). With
    ``act_order=True`` columns go in decreasing order of ``diag(H)`` and every group's qparams
    are chosen first, from the original weight's group ("static groups"): the codes land in
    the canonical layout, no permutation is stored. Per-row and per-tensor qparams are chosen
    from the original weight in both cases (no column has been updated at that point).
    ``qparams="search"`` replaces min/max by :func:`searched_qparams` wherever qparams are chosen.

    A column no calibration input reached (``H[j, j] == 0``) gets ``H[j, j] = 1``: it is
    rounded to nearest and feeds no error forward; its weight is kept.

    Args:
        weight: (N, K) float weight (any float dtype; the solver runs in float64).
        hessian: (K, K) ``2 X^T X / n`` (:class:`Hessian`).
        spec: the config's ``weight_spec()``: int4/uint4/int8, blocks of 1 or N rows.
        block_size: columns per lazy block.
        damp: ``H += damp * mean(diag H) * I``; raised when the factorization fails.
        act_order: quantize the columns with the largest ``diag(H)`` first (static groups).
        damp_retries: how many times the damping may be raised (x ``DAMP_FACTOR``).
        qparams: ``"minmax"``: each block's min/max (``choose_qparams_affine``); ``"search"``:
            :func:`searched_qparams`, the clip (``SEARCH_SHRINKS``) with the least
            ``diag(H)``-weighted rounding error. This one-weight solver defaults to the GPTQ paper's
            min/max; the model-level :func:`lowbit.algorithms.gptq` (and the CLI) default to the search.

    Returns:
        :class:`GPTQResult`.

    Raises:
        ValueError: bad shapes or arguments, NaN/inf, a Hessian no damping makes positive definite.
        NotImplementedError: a spec whose blocks span some but not all rows.
    """
    check_options(block_size, damp, act_order, damp_retries, qparams)
    _, cols = _check(weight, hessian, spec)
    n, k = weight.shape
    w0 = weight.detach().to(torch.float64)
    h = hessian.detach().to(torch.float64, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0

    diag = torch.diagonal(h).clone()

    def choose(w: torch.Tensor, d: torch.Tensor):  # w: (rows, columns), d: the columns' diag(H)
        return choose_qparams_affine(w, spec) if qparams == "minmax" else searched_qparams(w, d, spec)

    grouped = cols < k  # qparams chosen along the way (unless act_order); else once, up front
    if act_order or not grouped:
        scale, zp = choose(w0, diag)
    else:
        scale = torch.empty(n if spec.block_size((n, k))[0] == 1 else 1, k // cols, dtype=spec.scale_dtype,
                            device=w0.device)
        zp = None if not spec.has_zero_point else torch.empty(scale.shape, dtype=spec.zero_point_dtype,
                                                               device=w0.device)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    # transposed working copy: column j of W is row j of wt, contiguous for the per-column ops
    wt = (w0[:, perm] if act_order else w0).t().clone(memory_format=torch.contiguous_format)  # never the caller's
    del w0
    hp = h[perm][:, perm] if act_order else h
    upper, used, tries = damped_inverse_cholesky(hp, float(damp), damp_retries)
    if tries > 1:
        _log.info("GPTQ: damping raised from %g to %g (%d factorizations)", damp, used, tries)

    block = block_size if not grouped or act_order else -(-block_size // cols) * cols
    codes = torch.empty(k, n, dtype=spec.dtype.storage, device=wt.device)
    deq = torch.empty(k, n, dtype=torch.float32, device=wt.device)  # dequantize_affine's float32 values
    order = perm.tolist() if act_order else range(k)
    group_qparams: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = upper[i1:i2, i1:i2]
        with _one_thread():  # ~10 small ops per column: a second thread only adds synchronization
            for i in range(i2 - i1):
                col = order[i1 + i]
                g = col // cols
                if grouped and not act_order and col % cols == 0:
                    s_g, z_g = choose(w1[i:i + cols].t(), diag[col:col + cols])
                    scale[:, g:g + 1] = s_g
                    if zp is not None:
                        zp[:, g:g + 1] = z_g
                if g not in group_qparams:  # the column's qparams, 1-D: one per row (or one for all)
                    group_qparams[g] = (scale[:, g].contiguous(), None if zp is None else zp[:, g].contiguous())
                s_c, z_c = group_qparams[g]
                # quantize_affine / dequantize_affine of one column, minus their argument checks
                # (done once above): the primitives' own arithmetic, so the same bits
                q = _quantize_to_float(w1[i], s_c, z_c, spec, torch.round)[0]
                codes[col] = q.reshape(n)  # integer-valued float32 in [qmin, qmax]: exact in storage
                dq = _dequantize_from_float(q, s_c, z_c).reshape(n)
                deq[col] = dq
                e = (w1[i] - dq).div_(u1[i, i])
                w1[i:].addr_(u1[i, i:], e, alpha=-1.0)  # W[:, j:] -= err U[j, j:]
                err1[i] = e
        wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1, alpha=-1.0)

    return GPTQResult(qdata=codes.t().contiguous(), scale=scale, zero_point=zp, dequantized=deq.t().contiguous(),
                      damp=used, tries=tries)
