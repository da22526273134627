"""How the primitives treat their arguments: every dtype read as float32, no gradient into chosen
qparams, NaN/inf refused unless asked, every entry point checking what it is given.

The float64 values below need more than float32's 24 bits, so a primitive that computed in the
argument's own dtype instead of float32 would return a different number (worked out per case).
"""

import pytest
import torch

from lowbit.granularity import PerRow
from lowbit.primitives.affine import (
    choose_qparams_affine,
    choose_qparams_affine_from_min_max,
    dequantize_affine,
    fake_quantize_affine,
    quantize_affine,
)
from lowbit.primitives.float8 import (
    choose_qparams_float8,
    choose_qparams_float8_from_amax,
    dequantize_float8,
    fake_quantize_float8,
    quantize_float8,
)
from lowbit.primitives.rules import (
    float8_row_scale,
    float8_then_int4,
    float8_then_int4_scale,
    int4_maxabs_group_scale,
)
from lowbit.spec import QuantSpec, spec_key

I32 = torch.int32


def _t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# --- what the qparams carry: no gradient, no NaN -------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("uint4", PerRow(), symmetric=False),
                                  QuantSpec("uint4", symmetric=False, zero_point_domain="float"),
                                  QuantSpec("float8_e4m3fn", PerRow())], ids=lambda s: f"{s.dtype.name}-{s.symmetric}-{s.zero_point_domain}")
def test_chosen_qparams_carry_no_gradient_and_reject_non_finite(spec):
    choose = choose_qparams_float8 if spec.dtype.is_float else choose_qparams_affine
    x = torch.tensor([[-1.0, 0.5], [2.0, 3.0]], requires_grad=True)
    out = choose(x, spec)
    for t in out if isinstance(out, tuple) else (out,):
        assert t is None or (not t.requires_grad and t.grad_fn is None)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or inf"):
            choose(torch.tensor([[1.0, bad], [0.0, 1.0]]), spec)
    # check_finite=False: the block holding NaN gets a NaN scale, the other block a finite one
    s = choose(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), spec, check_finite=False)
    s = s[0] if isinstance(s, tuple) else s
    assert bool(torch.isnan(s.reshape(-1)[0])) and (s.numel() == 1 or bool(torch.isfinite(s.reshape(-1)[-1])))


# --- float32 arithmetic whatever dtype the arguments come in -----------------------------------
# Scale and zero point are read as float32 (as they are made); an input of any float dtype is read as
# float32 too. Values below need more than float32's 24 bits, so computing in float64 would differ.
S64 = 1 + 2.0**-24 - 2.0**-40  # float32: just below the tie between 1 and 1 + 2**-23 -> 1.0


def test_scale_is_read_as_float32():
    spec = QuantSpec("int8")
    s = torch.tensor([S64], dtype=torch.float64)
    x = torch.tensor([1.5, 3.0])
    # s -> 1.0: 1.5 / 1 = 1.5 -> 2 (tie -> even), 3 -> 3. In float64, 1.5 / S64 = 1.49999991 -> 1
    q = quantize_affine(x, s, None, spec)
    assert torch.equal(q, torch.tensor([2, 3], dtype=torch.int8))
    # (q - 0) * 1.0 = 2, 3; in float64 3 * S64 = 3 + 3 * 2**-24 - ... rounds to 3 + 2**-22 in float32
    assert torch.equal(dequantize_affine(q, s, None, spec), _t([2.0, 3.0]))
    assert torch.equal(fake_quantize_affine(x, spec, s), _t([2.0, 3.0]))
    assert torch.equal(fake_quantize_affine(x.clone().requires_grad_(), spec, s).detach(), _t([2.0, 3.0]))
    # float8: 1.1875 / 1.0 is a tie between 1.125 and 1.25 in e4m3 -> even 1.25 (in float64, 1.1875 / S64
    # is just below the tie -> 1.125); q * 1.0 = 1.25, 1.5 (in float64, 1.5 * S64 rounds to 1.5 + 2**-23)
    f8 = QuantSpec("float8_e4m3fn")
    x8 = _t([1.1875, 1.5])
    q8 = quantize_float8(x8, s, f8)
    assert torch.equal(q8.float(), _t([1.25, 1.5]))
    assert torch.equal(dequantize_float8(q8, s, f8), _t([1.25, 1.5]))
    assert torch.equal(fake_quantize_float8(x8, f8, s), _t([1.25, 1.5]))
    assert torch.equal(fake_quantize_float8(x8.clone().requires_grad_(), f8, s).detach(), _t([1.25, 1.5]))


def test_zero_point_is_read_as_float32():
    spec = QuantSpec("uint4", symmetric=False, zero_point_domain="float")
    s = _t([1.0])
    # zp = 0.5 + 2**-23 + 2**-40 reads as 0.5 + 2**-23. quantize: 2 + zp = 2.5 + 2**-23, a tie in float32
    # (ulp 2**-22 at 2.5) -> even 2.5 -> round -> 2. In float64 the sum rounds up to 2.5 + 2**-22 -> 3
    zp = torch.tensor([0.5 + 2.0**-23 + 2.0**-40], dtype=torch.float64)
    q = quantize_affine(_t([2.0]), s, zp, spec)
    assert torch.equal(q, torch.tensor([2], dtype=torch.uint8))
    assert torch.equal(fake_quantize_affine(_t([2.0]).requires_grad_(), spec, s, zp).detach(), _t([1.5 - 2.0**-23]))
    # dequantize: zp = 2**-23 + 2**-49 reads as 2**-23: 3 - 2**-23 is a tie (ulp 2**-22 at 3) -> even: 3.
    # In float64, 3 - 2**-23 - 2**-49 rounds down to 3 - 2**-22
    zp = torch.tensor([2.0**-23 + 2.0**-49], dtype=torch.float64)
    q3 = torch.tensor([3], dtype=torch.uint8)
    assert torch.equal(dequantize_affine(q3, s, zp, spec), _t([3.0]))
    # fake quantize runs the same subtraction out of place: 3 in, round(3 + zp) = 3, (3 - zp) * 1 = 3
    assert torch.equal(fake_quantize_affine(_t([3.0]), spec, s, zp), _t([3.0]))


def test_float64_input_is_read_as_float32():
    spec = QuantSpec("int8")
    s = _t([1.0])
    # 2.5 + 1e-12 is 2.5 in float32 -> 2 (tie -> even); in float64 it would round to 3
    x = torch.tensor([2.5 + 1e-12], dtype=torch.float64)
    assert torch.equal(quantize_affine(x, s, None, spec), torch.tensor([2], dtype=torch.int8))
    fq = fake_quantize_affine(x.clone().requires_grad_(), spec, s)
    assert fq.dtype == torch.float64 and torch.equal(fq.detach(), torch.tensor([2.0], dtype=torch.float64))
    assert torch.equal(fake_quantize_affine(x, spec, s), torch.tensor([2.0], dtype=torch.float64))
    # float8: 1.1875 - 2**-40 is 1.1875 in float32, a tie between 1.125 and 1.25 in e4m3 -> even 1.25
    # (cast from float64 directly it is below the tie: 1.125)
    f8 = QuantSpec("float8_e4m3fn")
    x8 = torch.tensor([1.1875 - 2.0**-40], dtype=torch.float64)
    assert torch.equal(quantize_float8(x8, s, f8).float(), _t([1.25]))
    assert torch.equal(fake_quantize_float8(x8, f8, s), torch.tensor([1.25], dtype=torch.float64))
    assert torch.equal(fake_quantize_float8(x8.clone().requires_grad_(), f8, s).detach(), torch.tensor([1.25], dtype=torch.float64))
    # x = 0x1.b7bf48484e21bp-3 (0.21472031), s = 0x1.72503ep-3 (0.18081711): float32(x) / s = 1.18749988
    # -> e4m3 1.125; the float64 quotient 1.18749994 would round to float32 1.1875, the tie -> 1.25
    x = torch.tensor([float.fromhex("0x1.b7bf48484e21bp-3")], dtype=torch.float64)
    s8 = torch.tensor([float.fromhex("0x1.72503ep-3")])
    assert torch.equal(quantize_float8(x, s8, f8).float(), _t([1.125]))
    assert torch.equal(fake_quantize_float8(x, f8, s8), (_t([1.125]) * s8).double())


def test_every_entry_point_checks_its_arguments():
    asym = QuantSpec("uint8", symmetric=False)
    s = _t([1.0])
    with pytest.raises(ValueError, match="zero_point is None but spec"):
        dequantize_affine(torch.zeros(2, dtype=torch.uint8), s, None, asym)
    with pytest.raises(ValueError, match="zero_point is None but spec"):
        fake_quantize_affine(_t([1.0, 2.0]), asym, s, None)
    with pytest.raises(ValueError, match="float8"):
        dequantize_affine(torch.zeros(2, dtype=torch.float8_e4m3fn), s, None, QuantSpec("float8_e4m3fn"))
    with pytest.raises(ValueError, match="float8"):
        fake_quantize_affine(_t([1.0]), QuantSpec("float8_e4m3fn"), s)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        fake_quantize_affine(torch.tensor([1, 2]), QuantSpec("int8"), s)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        fake_quantize_float8(torch.tensor([1, 2]), QuantSpec("float8_e4m3fn"), s)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        quantize_float8(torch.tensor([1, 2]), s, QuantSpec("float8_e4m3fn"))
    with pytest.raises(ValueError, match="integer format"):
        quantize_float8(_t([1.0]), s, QuantSpec("int8"))
    with pytest.raises(ValueError, match="integer format"):
        dequantize_float8(torch.zeros(1, dtype=torch.int8), s, QuantSpec("int8"))
    with pytest.raises(ValueError, match="integer format"):
        choose_qparams_float8_from_amax(_t([1.0]), QuantSpec("int8"))
    with pytest.raises(TypeError, match="output_dtype=torch.int32 must be a floating dtype"):
        dequantize_affine(torch.zeros(1, dtype=torch.int8), s, None, QuantSpec("int8"), torch.int32)
    with pytest.raises(TypeError, match="output_dtype=torch.int32 must be a floating dtype"):
        dequantize_float8(torch.zeros(1, dtype=torch.float8_e4m3fn), s, QuantSpec("float8_e4m3fn"), torch.int32)
    with pytest.raises(ValueError, match="qdata must have rank >= 1"):
        dequantize_affine(torch.tensor(1, dtype=torch.int8), torch.tensor(1.0), None, QuantSpec("int8"))
    with pytest.raises(ValueError, match="qdata must have rank >= 1"):
        dequantize_float8(torch.tensor(1.0).to(torch.float8_e4m3fn), torch.tensor(1.0), QuantSpec("float8_e4m3fn"))
    with pytest.raises(ValueError, match=r"min_val \(2,\) and max_val \(3,\) differ in shape"):
        choose_qparams_affine_from_min_max(torch.zeros(2), torch.zeros(3), asym)
    with pytest.raises(ValueError, match="float8"):
        choose_qparams_affine_from_min_max(torch.zeros(2), torch.zeros(2), QuantSpec("float8_e5m2"))
    with pytest.raises(ValueError, match=r"scale has shape \(1,\) but must have the input's rank 2"):
        quantize_affine(torch.zeros(2, 2), s, None, QuantSpec("int8"))
    with pytest.raises(ValueError, match=r"scale shape \(0, 1\) does not divide"):
        quantize_affine(torch.zeros(2, 2), torch.ones(0, 1), None, QuantSpec("int8"))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        choose_qparams_affine([1.0], QuantSpec("int8"))
    for rule in (float8_row_scale, lambda w: int4_maxabs_group_scale(w, 2), lambda w: float8_then_int4(w, 2)):
        with pytest.raises(TypeError, match="weight must be a floating-point tensor, got dtype torch.int32"):
            rule(torch.ones(2, 4, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"weight must be a non-empty 2-D \(out, in\) tensor, got shape \(4,\)"):
            rule(torch.ones(4))
        with pytest.raises(ValueError, match=r"non-empty 2-D \(out, in\) tensor, got shape \(0, 4\)"):
            rule(torch.ones(0, 4))


def test_float8_scale_from_any_amax_dtype_in_float32_then_scale_dtype():
    # amax 3 in bfloat16: 3 / 448 = 0.00669643 in float32 (in bfloat16 it would be 0.00671387)
    amax = torch.tensor([3.0], dtype=torch.bfloat16)
    s = choose_qparams_float8_from_amax(amax, QuantSpec("float8_e4m3fn"))
    assert s.dtype == torch.float32 and torch.equal(s, _t([3.0]) / 448)
    # a bfloat16 scale_dtype: computed in float32, stored once rounded: 0.00669643 -> 0.00671387
    spec = QuantSpec("float8_e4m3fn", scale_dtype=torch.bfloat16)
    s = choose_qparams_float8(_t([3.0, -1.0]), spec)
    assert s.dtype == torch.bfloat16 and torch.equal(s, (_t([3.0]) / 448).bfloat16())
    # the spec is checked before the input: an integer spec is named even for an empty input
    with pytest.raises(ValueError, match="integer format"):
        choose_qparams_float8(torch.empty(0), QuantSpec("int8"))


def test_qparams_math_is_float32_for_float64_min_max_and_scales():
    # min = -0x1.a68908p-1 = -0.82526422, max = 0x1.4007p-8 = 0.00488323 (both float32 values):
    # s = (max - min) / 255 = 0x1.aab3cap-9 = 0.00325548 in float32, and min / s in float32 is exactly
    # -253.5 (a tie: round to even -254, zp = 254), while the exact quotient is -253.499995 (zp 253).
    # quantize divides by the scale in float32, so the zero point must come from the float32 quotient,
    # also when the scale is stored in float64.
    mn, mx = torch.tensor([float.fromhex("-0x1.a68908p-1")]), torch.tensor([float.fromhex("0x1.4007p-8")])
    spec = QuantSpec("uint8", symmetric=False, scale_dtype=torch.float64)
    s, zp = choose_qparams_affine_from_min_max(mn, mx, spec)
    assert s.dtype == torch.float64 and s.item() == float.fromhex("0x1.aab3cap-9")
    assert torch.equal(zp, torch.tensor([254], dtype=I32))
    # float64 min/max are read as float32 first: the same qparams as from their float32 roundings
    g = torch.Generator().manual_seed(0)
    mn64 = -torch.rand(512, generator=g, dtype=torch.float64) * 3
    mx64 = torch.rand(512, generator=g, dtype=torch.float64) * 3
    for spec in (QuantSpec("uint8", symmetric=False), QuantSpec("uint4", symmetric=False, zero_point_domain="float"),
                 QuantSpec("int8")):
        got, want = choose_qparams_affine_from_min_max(mn64, mx64, spec), choose_qparams_affine_from_min_max(mn64.float(), mx64.float(), spec)
        assert torch.equal(got[0], want[0]) and (want[1] is None or torch.equal(got[1], want[1]))


def test_rule_scales_carry_no_gradient_and_reject_non_finite():
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0]], requires_grad=True)
    for rule in (float8_row_scale, lambda w, **kw: int4_maxabs_group_scale(w, 2, **kw)):
        s = rule(w)
        assert not s.requires_grad and s.grad_fn is None
        for v in (float("nan"), float("inf")):
            bad = torch.tensor([[1.0, v, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
            with pytest.raises(ValueError, match="NaN or inf"):
                rule(bad)
            # hot paths (check_finite=False): the first block's scale is NaN/inf, every other one finite
            s = rule(bad, check_finite=False)
            assert not bool(torch.isfinite(s[0, 0])) and bool(torch.isfinite(s.reshape(-1)[1:]).all())
    with pytest.raises(ValueError, match="group_size=0 must be a positive int dividing in_features=4"):
        int4_maxabs_group_scale(w, 0)
    with pytest.raises(ValueError, match="group_size=-2 must be a positive int"):
        int4_maxabs_group_scale(w, -2)
    with pytest.raises(ValueError, match="group_size=2.0 must be a positive int"):
        int4_maxabs_group_scale(w, 2.0)


def test_float8_then_int4_scale_in_float32():
    # group scale S64 reads as 1.0, row scale 3: 3.0 in float32 (3 * S64 in float64 is 3 + 3 * 2**-24 ...)
    gs = torch.tensor([[S64]], dtype=torch.float64)
    s = float8_then_int4_scale(gs, torch.tensor([[3.0]], dtype=torch.float64))
    assert s.dtype == torch.float32 and torch.equal(s, _t([[3.0]]))
    s = float8_then_int4_scale(torch.tensor([[3.0]], dtype=torch.float64), gs)
    assert s.dtype == torch.float32 and torch.equal(s, _t([[3.0]]))


def test_spec_key_is_cached_on_the_spec():
    # no repr on the hot path: the key is made once and the same string object comes back
    spec = QuantSpec("int4", PerRow())
    assert spec_key(spec) is spec_key(spec)
