"""HQQ (the solver, ``lowbit.primitives.hqq``, re-exported by ``lowbit.algorithms``): the objective
never increases, never beats the exact optimum of a tiny group, and the qparams are the spec's own
kind (int zero point in range, float zero point unrounded). The configs' ``qparams="hqq"`` field:
tests/configs/test_qparams.py."""

import dataclasses

import pytest
import torch

import lowbit.algorithms
import lowbit.primitives.hqq
from lowbit.algorithms.hqq import hqq_optimize, hqq_qparams
from lowbit.configs import Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig, Int8WeightOnlyConfig
from lowbit.granularity import PerGroup
from lowbit.primitives.affine import choose_qparams_affine, dequantize_affine, quantize_affine

SPECS = {
    "int4-asym": Int4WeightOnlyConfig(group_size=32).weight_spec(),
    "int4-floatzp": Int4WeightOnlyConfig(group_size=32, zero_point_domain="float").weight_spec(),
    "8da4w": Int8DynamicActivationInt4WeightConfig(group_size=32).weight_spec(),
    "int8-g32": Int8WeightOnlyConfig(PerGroup(32)).weight_spec(),
}
P = 0.7
# HQQ's objective relative to round-to-nearest's qparams on Gaussian weights with outliers, at
# least this much lower (measured 2.4-2.9% lower for int4, 1.0% for int8)
MIN_GAIN = {"int4-asym": 0.015, "int4-floatzp": 0.015, "8da4w": 0.015, "int8-g32": 0.005}


def _weight(n=16, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.02] *= 8  # a few outliers: where p < 1 matters
    return w


def _objective(w, scale, zp, spec):
    return float((w - dequantize_affine(quantize_affine(w, scale, zp, spec), scale, zp, spec)).abs().pow(P).sum())


@pytest.mark.parametrize("name", list(SPECS))
def test_objective_never_increases_and_beats_round_to_nearest(name):
    spec = SPECS[name]
    w = _weight()
    r = hqq_optimize(w, spec, iters=30, p=P, selection="group-lp")
    hist = torch.tensor(r.objective, dtype=torch.float64)
    assert len(r.objective) == 31
    assert bool((hist[1:] <= hist[:-1]).all()), r.objective
    assert r.objective[0] == pytest.approx(_objective(w, *choose_qparams_affine(w, spec), spec), rel=1e-6)
    assert r.objective[-1] == pytest.approx(_objective(w, r.scale, r.zero_point, spec), rel=1e-6)
    assert r.objective[-1] <= (1 - MIN_GAIN[name]) * r.objective[0]


def test_qparams_kind_and_range():
    w = _weight()
    s, z = hqq_qparams(w, SPECS["int4-asym"])
    s0, z0 = choose_qparams_affine(w, SPECS["int4-asym"])
    assert s.shape == s0.shape and s.dtype == torch.float32 and z.dtype == z0.dtype == torch.int8
    assert int(z.min()) >= 0 and int(z.max()) <= 15
    s, z = hqq_qparams(w, SPECS["int4-floatzp"])
    assert z.dtype == torch.float32 and not torch.equal(z, z.round())  # unrounded
    s, z = hqq_qparams(w, SPECS["8da4w"])
    assert z is None and (s > 0).all()
    s, z = hqq_qparams(w, SPECS["int4-asym"], iters=0)
    assert torch.equal(s, s0) and torch.equal(z, z0)  # no iteration: round-to-nearest's own


def _candidates_zero_only(w, s, spec):
    """Every zero point where the float-domain objective can be minimal (it is continuous and
    concave between these points): a value exactly on the grid, or on a rounding boundary."""
    u = (w.double() / s.double()).flatten()
    ks = torch.arange(spec.qmin - 1, spec.qmax + 2, dtype=torch.float64)
    return torch.cat([(ks[:, None] - u[None, :]).flatten(), (ks[:, None] + 0.5 - u[None, :]).flatten()])


def _candidates_scale(w, m_lo, m_hi):
    """Every scale where the objective can be minimal for codes ``q - zp`` in [m_lo, m_hi]: a value
    exactly on the grid (``w / m``) or on a rounding boundary (``w / (m + 0.5)``)."""
    m = torch.arange(m_lo - 1, m_hi + 2, dtype=torch.float64)
    m = torch.cat([m[m != 0], m + 0.5])
    c = (w.double().flatten()[None, :] / m[:, None]).flatten()
    return c[c > 0]


def _batched_objective(w, scales, zps, spec):
    """Objective of one group (1, g) for each candidate (scale, zero point), by the primitives."""
    c = scales.numel()
    wc = w.expand(c, -1).contiguous()
    s = scales.reshape(c, 1).float()
    z = None if zps is None else zps.reshape(c, 1).to(spec.zero_point_dtype)
    return (wc - dequantize_affine(quantize_affine(wc, s, z, spec), s, z, spec)).abs().pow(P).sum(-1).double()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["int-zero", "int-zero-and-scale", "float-zero", "symmetric-scale"])
def test_never_beats_the_exact_optimum_of_a_tiny_group(mode, seed):
    base = {"int-zero": "int4-asym", "int-zero-and-scale": "int4-asym", "float-zero": "int4-floatzp",
            "symmetric-scale": "8da4w"}[mode]
    spec = dataclasses.replace(SPECS[base], granularity=PerGroup(8))
    w = _weight(n=1, k=8, seed=seed)
    r = hqq_optimize(w, spec, iters=40, p=P, optimize_scale=mode != "int-zero" and mode != "float-zero",
                     selection="group-lp")
    s0, _ = choose_qparams_affine(w, spec)
    if mode == "int-zero":  # the scale is fixed: every integer zero point
        zps = torch.arange(spec.qmin, spec.qmax + 1)
        best = _batched_objective(w, s0.reshape(1).expand(zps.numel()), zps, spec).min()
        assert torch.equal(r.scale, s0)
    elif mode == "float-zero":
        zps = _candidates_zero_only(w, s0, spec)
        best = _batched_objective(w, s0.reshape(1).expand(zps.numel()), zps, spec).min()
    elif mode == "symmetric-scale":
        scales = _candidates_scale(w, spec.qmin, spec.qmax)
        best = _batched_objective(w, scales, None, spec).min()
    else:  # every integer zero point x every scale that can be optimal for it
        best = min(float(_batched_objective(w, sc, torch.full_like(sc, zp), spec).min())
                   for zp in range(spec.qmin, spec.qmax + 1)
                   for sc in [_candidates_scale(w, spec.qmin - zp, spec.qmax - zp)])
    got = _objective(w, r.scale, r.zero_point, spec)
    assert got == pytest.approx(r.objective[-1], rel=1e-6)
    assert got >= float(best) * (1 - 1e-6), (mode, got, float(best))
    assert r.objective[-1] <= r.objective[0]


@pytest.mark.parametrize("kwargs,match", [
    ({"p": 0.0}, "p=0.0"),
    ({"p": 1.5}, "p=1.5"),
    ({"iters": -1}, "iters=-1"),
    ({"beta": 0}, "beta=0"),
    ({"kappa": 0.5}, "kappa=0.5"),
    ({"optimize_scale": "yes"}, "optimize_scale='yes'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hqq_qparams(_weight(), SPECS["int4-asym"], **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D floating"):
        hqq_qparams(torch.zeros(4, 32, dtype=torch.int32), SPECS["int4-asym"])
    with pytest.raises(ValueError, match="NaN or inf"):
        hqq_qparams(torch.full((4, 32), float("nan")), SPECS["int4-asym"])
    with pytest.raises(ValueError, match="nothing to optimize"):
        hqq_qparams(_weight(), SPECS["8da4w"], optimize_scale=False)
    with pytest.raises(ValueError, match="does not divide"):
        hqq_qparams(torch.zeros(4, 48), SPECS["int4-asym"])


def test_algorithms_reexport_the_primitive():
    for name in ("hqq_optimize", "hqq_qparams", "HQQResult"):
        assert getattr(lowbit.algorithms, name) is getattr(lowbit.primitives.hqq, name)


def test_weight_qparams_rule():
    w, spec, rule = _weight(), SPECS["int4-asym"], lowbit.primitives.hqq.weight_qparams
    assert all(torch.equal(a, b) for a, b in zip(rule(w, spec), choose_qparams_affine(w, spec)))
    assert all(torch.equal(a, b) for a, b in zip(rule(w, spec, "hqq"), hqq_qparams(w, spec)))
    with pytest.raises(ValueError, match=r"rule='HQQ'; allowed: \('minmax', 'hqq'\)"):
        rule(w, spec, "HQQ")


@pytest.mark.parametrize("name", list(SPECS))
def test_tensor_l1_selection_stops_when_the_mean_error_stops_falling(name):
    spec = SPECS[name]
    w = _weight(seed=3)
    r = hqq_optimize(w, spec, iters=50, p=P, selection="tensor-l1")
    hist = r.objective
    assert 1 <= len(hist) <= 51 and all(b < a for a, b in zip(hist, hist[1:])), hist
    # the kept qparams give the last (lowest) mean |W - W_r|, through the primitives
    deq = dequantize_affine(quantize_affine(w, r.scale, r.zero_point, spec), r.scale, r.zero_point, spec)
    assert float((w - deq).abs().double().mean()) == pytest.approx(hist[-1], rel=1e-5)
    if spec.zero_point_domain == "float":  # starts from the rounded zero point, stays float after
        assert r.zero_point.dtype == torch.float32
    s0, z0 = choose_qparams_affine(w, spec)
    start = torch.round(z0) if spec.zero_point_domain == "float" else z0
    deq0 = dequantize_affine(quantize_affine(w, s0, start, spec), s0, start, spec)
    assert hist[0] == pytest.approx(float((w - deq0).abs().double().mean()), rel=1e-5)


def test_auto_selection():
    w = _weight()
    for name, want in (("int4-floatzp", "tensor-l1"), ("int4-asym", "group-lp"), ("8da4w", "group-lp")):
        got = hqq_qparams(w, SPECS[name])
        ref = hqq_qparams(w, SPECS[name], selection=want)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, ref)), name
    with pytest.raises(ValueError, match="selection='best'; allowed"):
        hqq_qparams(w, SPECS["int4-asym"], selection="best")
