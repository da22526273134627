"""Every primitive against values worked out by hand (the arithmetic is in the comments).

The inputs are multiples of powers of two, so every scale, quotient and product below is exact
in float32 and the expected tensors need no tolerance: each check is ``torch.equal``. The cases
are chosen so that a wrong rounding (floor, ceil, half away from zero), a wrong clamp, a wrong
order of rounding and zero point or a wrong range would each change at least one value.
"""

import pytest
import torch

from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.primitives.affine import (
    choose_qparams_affine,
    choose_qparams_affine_from_min_max,
    dequantize_affine,
    fake_quantize_affine,
    quantize_affine,
    round_ste,
)
from lowbit.primitives.float8 import (
    choose_qparams_float8,
    choose_qparams_float8_from_amax,
    dequantize_float8,
    fake_quantize_float8,
    quantize_float8,
)
from lowbit.primitives.packing import pack_int4, unpack_int4
from lowbit.primitives.rules import (
    FLOAT8_ROW_EPS,
    INT4_MAXABS_EPS,
    float8_row_scale,
    float8_then_int4,
    float8_then_int4_scale,
    int4_maxabs_group_scale,
    int4_maxabs_spec,
)
from lowbit.spec import INT_EPS, QuantSpec

I32 = torch.int32


def _t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# --- asymmetric qparams, integer zero-point domain --------------------------------------------
# s = (max(x, 0) - min(x, 0)) / (qmax - qmin);  zp = clamp(qmin - round(min(x, 0) / s), qmin, qmax)
# q = clamp(round(x / s) + zp, qmin, qmax);      dq = (q - zp) * s;  round = half to even

ASYM_INT_CASES = [
    pytest.param(
        "uint8",
        # min/s = -19.25: round -19 (floor -20, ceil -19)
        # min/s = -19.75: round -20 (floor -20, ceil -19)
        # min/s = -18.5: a tie, half to even -18 (floor and half-away-from-zero -19, ceil -18)
        [[-19.25 / 64, 0.0, 2.5 / 64, 235.75 / 64],
         [-19.75 / 64, 0.0, 3.5 / 64, 235.25 / 64],
         [-18.5 / 64, -2.5 / 64, 0.0, 236.5 / 64]],
        # every row spans exactly 255 / 64, so s = (255 / 64) / 255 = 1 / 64
        [[1 / 64], [1 / 64], [1 / 64]],
        # zp = 0 - round(min / s): 0 - (-19) = 19, 0 - (-20) = 20, 0 - (-18) = 18
        [[19], [20], [18]],
        # row 0: round(-19.25) + 19 = 0, 0 + 19 = 19, round(2.5) = 2 (tie -> even) + 19 = 21,
        #        round(235.75) = 236 + 19 = 255
        # row 1: -20 + 20 = 0, 20, round(3.5) = 4 (tie -> even) + 20 = 24, round(235.25) = 235 + 20 = 255
        # row 2: round(-18.5) = -18 + 18 = 0, round(-2.5) = -2 + 18 = 16, 18, round(236.5) = 236 + 18 = 254
        [[0, 19, 21, 255], [0, 20, 24, 255], [0, 16, 18, 254]],
        id="uint8-rounding-of-zp",
    ),
    pytest.param(
        "int8",
        # row 0: min > 0: the range is stretched down to 0, s = (3.984375 - 0) / 255 = 1 / 64,
        #        zp = -128 - round(0) = -128
        # row 1: max < 0: the range is stretched up to 0, s = (0 + 3.984375) / 255 = 1 / 64,
        #        zp = -128 - round(-255) = 127 (= qmax, the clamp keeps it)
        [[0.5, 1.0, 2.0, 3.984375], [-3.984375, -1.0, -0.5, -0.25]],
        [[1 / 64], [1 / 64]],
        [[-128], [127]],
        # row 0: 32 - 128 = -96, 64 - 128 = -64, 128 - 128 = 0, 255 - 128 = 127
        # row 1: -255 + 127 = -128, -64 + 127 = 63, -32 + 127 = 95, -16 + 127 = 111
        [[-96, -64, 0, 127], [-128, 63, 95, 111]],
        id="int8-min-above-0-max-below-0",
    ),
    pytest.param(
        "uint4",
        # s = (1.5625 + 0.3125) / 15 = 1.875 / 15 = 1 / 8; min/s = -2.5: a tie, half to even -2 -> zp = 2
        # (floor and half-away-from-zero give 3)
        [[-0.3125, 0.0, 0.5, 1.5625]],
        [[1 / 8]],
        [[2]],
        # round(-2.5) = -2 + 2 = 0, 0 + 2 = 2, 4 + 2 = 6, round(12.5) = 12 (tie -> even) + 2 = 14
        [[0, 2, 6, 14]],
        id="uint4-tie-zp",
    ),
    pytest.param(
        "int4",
        # s = (2.9375 + 0.8125) / 15 = 3.75 / 15 = 1 / 4; min/s = -3.25 -> round -3 -> zp = -8 + 3 = -5
        # (floor gives -4 -> zp -4)
        [[-0.8125, 0.0, 0.375, 2.9375]],
        [[1 / 4]],
        [[-5]],
        # round(-3.25) = -3 - 5 = -8, 0 - 5 = -5, round(1.5) = 2 (tie -> even) - 5 = -3, round(11.75) = 12 - 5 = 7
        [[-8, -5, -3, 7]],
        id="int4",
    ),
    pytest.param(
        "uint8",
        # row 0: range 1e-6 / 255 < eps = 2**-23, so s = 2**-23; min/s = -1e-6 * 2**23 = -8.39 -> round -8 ->
        #        zp = 8 (floor: 9)
        # row 1: all zero: s = eps, zp = 0 - round(0 / eps) = 0
        [[-1e-6, 0.0], [0.0, 0.0]],
        [[INT_EPS], [INT_EPS]],
        [[8], [0]],
        # row 0: round(-8.39) = -8 + 8 = 0, 0 + 8 = 8; row 1: zeros stay at zp = 0
        [[0, 8], [0, 0]],
        id="uint8-eps-clamp",
    ),
]


@pytest.mark.parametrize("dtype,x,scale,zp,q", ASYM_INT_CASES)
def test_asymmetric_int_domain_by_hand(dtype, x, scale, zp, q):
    spec = QuantSpec(dtype, PerRow(), symmetric=False)
    x = _t(x)
    s, z = choose_qparams_affine(x, spec)
    assert torch.equal(s, _t(scale))
    assert torch.equal(z, torch.tensor(zp, dtype=I32))
    qd = quantize_affine(x, s, z, spec)
    assert torch.equal(qd, torch.tensor(q, dtype=spec.dtype.storage))
    # dq = (q - zp) * s, exact for these powers of two
    want = (torch.tensor(q, dtype=torch.float64) - torch.tensor(zp, dtype=torch.float64)) * torch.tensor(scale, dtype=torch.float64)
    assert torch.equal(dequantize_affine(qd, s, z, spec), want.float())
    # the observers' entry point: the same numbers from the per-row min and max
    s2, z2 = choose_qparams_affine_from_min_max(x.amin(1, keepdim=True), x.amax(1, keepdim=True), spec)
    assert torch.equal(s2, s) and torch.equal(z2, z)


def test_asymmetric_custom_eps_and_narrow_range():
    # eps = 0.25 > (0.2 + 0.3) / 255, so s = 0.25; min/s = -0.3 / 0.25 = -1.2 -> round -1 -> zp = 1
    spec = QuantSpec("uint8", symmetric=False, eps=0.25)
    x = _t([-0.3, 0.2])
    s, zp = choose_qparams_affine(x, spec)
    assert torch.equal(s, _t([0.25])) and torch.equal(zp, torch.tensor([1], dtype=I32))
    # round(-1.2) = -1 + 1 = 0; round(0.8) = 1 + 1 = 2
    assert torch.equal(quantize_affine(x, s, zp, spec), torch.tensor([0, 2], dtype=torch.uint8))
    # narrow range [2, 9] of uint4: s = (1.75 + 0) / (9 - 2) = 1/4, zp = 2 - round(0) = 2; 1.75 -> 7 + 2 = 9
    narrow = QuantSpec("uint4", symmetric=False, quant_min=2, quant_max=9)
    s, zp = choose_qparams_affine(_t([0.0, 1.0, 1.75]), narrow)
    assert torch.equal(s, _t([0.25])) and torch.equal(zp, torch.tensor([2], dtype=I32))
    assert torch.equal(quantize_affine(_t([0.0, 1.0, 1.75, 5.0, -1.0]), s, zp, narrow),
                       torch.tensor([2, 6, 9, 9, 2], dtype=torch.uint8))  # 5.0 -> 22 and -1.0 -> -2 clamp to [2, 9]


def test_zero_point_clamped_to_the_range():
    # With a float32 scale, -min/s <= qmax - qmin, so zp never passes qmax; a bfloat16 scale can be
    # rounded down far enough that it does: min = -1023/1024, max = 0, uint8:
    # s = (1023/1024) / 255 = 0.0039177 = 1.00294 * 2**-8 -> bfloat16 (7 fraction bits) 2**-8;
    # zp = 0 - round(-1023/1024 * 256) = -round(-255.75) = 256 -> clamped to 255
    spec = QuantSpec("uint8", symmetric=False, scale_dtype=torch.bfloat16)
    s, zp = choose_qparams_affine_from_min_max(_t([-1023 / 1024]), _t([0.0]), spec)
    assert torch.equal(s, _t([2.0**-8], torch.bfloat16)) and torch.equal(zp, torch.tensor([255], dtype=I32))
    # a narrow range [-4, 3] with eps 0.5: s = max(1.75 / 7, 0.5) = 0.5, zp = -4 - round(-3.5) = -4 + 4 = 0
    # (the tie goes to the even -4); second block: s = 1.75 / 7 = 1/4, zp = -4 - round(-0.5) = -4 (tie -> 0)
    spec = QuantSpec("int8", symmetric=False, quant_min=-4, quant_max=3, eps=0.5)
    s, zp = choose_qparams_affine_from_min_max(_t([-1.75, -0.125]), _t([0.0, 1.625]), spec)
    assert torch.equal(s, _t([0.5, 0.5])) and torch.equal(zp, torch.tensor([0, -4], dtype=I32))
    spec = QuantSpec("int8", symmetric=False, quant_min=-4, quant_max=3, eps=0.125)
    s, zp = choose_qparams_affine_from_min_max(_t([-1.75, -0.125]), _t([0.0, 1.625]), spec)
    # first block: s = 1.75 / 7 = 1/4, zp = -4 - round(-7) = 3 = qmax; second: s = 1/4, zp = -4 - round(-0.5) = -4
    assert torch.equal(s, _t([0.25, 0.25])) and torch.equal(zp, torch.tensor([3, -4], dtype=I32))


def test_from_min_max_by_hand():
    spec = QuantSpec("uint8", symmetric=False)
    # min > 0 is taken as 0 and max < 0 as 0 (int domain): [0.5, 3.984375] -> s = 1/64, zp = 0;
    # [-3.984375, -0.5] -> s = 1/64, zp = 0 - round(-255) = 255
    s, zp = choose_qparams_affine_from_min_max(_t([0.5, -3.984375]), _t([3.984375, -0.5]), spec)
    assert torch.equal(s, _t([1 / 64, 1 / 64])) and torch.equal(zp, torch.tensor([0, 255], dtype=I32))
    # bfloat16 min/max are read in float32: same numbers
    s2, zp2 = choose_qparams_affine_from_min_max(_t([0.5, -3.984375], torch.bfloat16), _t([3.984375, -0.5], torch.bfloat16), spec)
    assert torch.equal(s2, s) and torch.equal(zp2, zp)
    # symmetric specs use max(-min, max): int8 min -2.54, max 1 -> s = 2.54 / 127 = 0.02, no zero point
    sym_s, sym_zp = choose_qparams_affine_from_min_max(_t([-127 / 32]), _t([1.0]), QuantSpec("int8"))
    assert sym_zp is None and torch.equal(sym_s, _t([1 / 32]))
    # positive-only block, symmetric: max(-min(0.5, 0), 127/32) = 127/32 -> 1/32
    sym_s, _ = choose_qparams_affine_from_min_max(_t([0.5]), _t([127 / 32]), QuantSpec("int8"))
    assert torch.equal(sym_s, _t([1 / 32]))


# --- asymmetric qparams, float zero-point domain ----------------------------------------------
# s = (max(x) - min(x)) / (qmax - qmin);  zp = qmin - min(x) / s  (not rounded, not clamped)
# q = clamp(round(x / s + zp), qmin, qmax)


def test_float_domain_by_hand():
    spec = QuantSpec("uint4", PerRow(), symmetric=False, zero_point_domain="float")
    x = _t([[0.3125, 2.1875, 1.0, 0.75, 0.625]])
    s, zp = choose_qparams_affine(x, spec)
    # s = (2.1875 - 0.3125) / 15 = 1.875 / 15 = 1/8 (the values' own range, not stretched to 0);
    # zp = 0 - 0.3125 * 8 = -2.5 (kept fractional)
    assert torch.equal(s, _t([[1 / 8]])) and torch.equal(zp, _t([[-2.5]]))
    q = quantize_affine(x, s, zp, spec)
    # x/s + zp = 2.5 - 2.5 = 0, 17.5 - 2.5 = 15, 8 - 2.5 = 5.5 -> 6, 6 - 2.5 = 3.5 -> 4, 5 - 2.5 = 2.5 -> 2
    # (rounding after adding zp; the int domain's round(x/s) + zp would give 5.5, 3.5, ... not integers)
    assert torch.equal(q, torch.tensor([[0, 15, 6, 4, 2]], dtype=torch.uint8))
    # dq = (q + 2.5) / 8 = 0.3125, 2.1875, 1.0625, 0.8125, 0.5625
    assert torch.equal(dequantize_affine(q, s, zp, spec), _t([[0.3125, 2.1875, 1.0625, 0.8125, 0.5625]]))


def test_float_domain_zero_point_is_not_clamped():
    spec = QuantSpec("int8", PerRow(), symmetric=False, zero_point_domain="float")
    # row 0: all negative: s = (-1.0078125 + 3) / 255 = 1.9921875 / 255 = 1/128,
    #        zp = -128 - (-3 * 128) = 256 (outside [-128, 127], kept)
    # row 1: s = (1.4921875 + 0.5) / 255 = 1/128, zp = -128 + 64 = -64
    x = _t([[-3.0, -1.0078125, -2.0], [-0.5, 1.4921875, 0.0]])
    s, zp = choose_qparams_affine(x, spec)
    assert torch.equal(s, _t([[1 / 128], [1 / 128]])) and torch.equal(zp, _t([[256.0], [-64.0]]))
    # row 0: -384 + 256 = -128, -129 + 256 = 127, -256 + 256 = 0; row 1: -64 - 64 = -128, 191 - 64 = 127, -64
    q = quantize_affine(x, s, zp, spec)
    assert torch.equal(q, torch.tensor([[-128, 127, 0], [-128, 127, -64]], dtype=torch.int8))
    # both ends are exact: (q - zp) * s = (-128 - 256) / 128 = -3, (127 - 256) / 128 = -1.0078125
    assert torch.equal(dequantize_affine(q, s, zp, spec), x)


def test_float_domain_constant_block_uses_eps():
    spec = QuantSpec("uint4", symmetric=False, zero_point_domain="float", eps=0.5)
    # max = min = 3: s = max(0 / 15, 0.5) = 0.5, zp = 0 - 3 / 0.5 = -6; q = round(6 - 6) = 0
    s, zp = choose_qparams_affine(_t([3.0, 3.0]), spec)
    assert torch.equal(s, _t([0.5])) and torch.equal(zp, _t([-6.0]))
    q = quantize_affine(_t([3.0, 3.0]), s, zp, spec)
    assert torch.equal(q, torch.tensor([0, 0], dtype=torch.uint8))
    assert torch.equal(dequantize_affine(q, s, zp, spec), _t([3.0, 3.0]))


# --- symmetric qparams -------------------------------------------------------------------------
# signed: s = amax / min(qmax, -qmin), no zero point;
# unsigned: zp = mid = (qmin + qmax + 1) // 2, s = amax / min(qmax - mid, mid - qmin)


@pytest.mark.parametrize(
    "dtype,kw,amax,scale,zp",
    [
        ("int8", {}, 127 / 32, 1 / 32, None),  # min(127, 128) = 127
        ("int4", {}, 7 / 4, 1 / 4, None),  # min(7, 8) = 7
        ("int8", dict(quant_min=-64, quant_max=127), 4.0, 1 / 16, None),  # min(127, 64) = 64
        ("uint8", {}, 127 / 32, 1 / 32, 128),  # mid = 256 // 2 = 128, min(127, 128) = 127
        ("uint4", {}, 7 / 4, 1 / 4, 8),  # mid = 16 // 2 = 8, min(7, 8) = 7
        ("uint8", dict(quant_min=10, quant_max=20), 1.0, 1 / 5, 15),  # mid = 31 // 2 = 15, min(5, 5) = 5
        ("uint8", dict(quant_min=0, quant_max=3), 1.0, 1.0, 2),  # mid = 4 // 2 = 2, min(1, 2) = 1
    ],
)
def test_symmetric_by_hand(dtype, kw, amax, scale, zp):
    spec = QuantSpec(dtype, **kw)
    x = _t([-amax / 2, amax])
    s, z = choose_qparams_affine(x, spec)
    assert torch.equal(s, _t([scale]))
    if zp is None:
        assert z is None
    else:
        assert torch.equal(z, torch.tensor([zp], dtype=I32))
    # a negative amax side: the same scale from -amax
    s2, _ = choose_qparams_affine(-x, spec)
    assert torch.equal(s2, s)


def test_symmetric_all_zero_uses_eps():
    # amax = 0: s = max(0 / 127, eps) = eps; unsigned zero point stays the midpoint
    s, zp = choose_qparams_affine(torch.zeros(2, 4), QuantSpec("uint4", PerRow()))
    assert torch.equal(s, torch.full((2, 1), INT_EPS)) and torch.equal(zp, torch.full((2, 1), 8, dtype=I32))
    s, _ = choose_qparams_affine(torch.zeros(3), QuantSpec("int8", eps=1e-3))
    assert torch.equal(s, _t([1e-3]))


# --- quantize / dequantize / fake quantize with given qparams ---------------------------------


def test_quantize_affine_clamps_and_rounds_half_even():
    spec = QuantSpec("int8", quant_min=-127)
    s = _t([1.0])
    # round: 126.5 -> 126, 127.5 -> 128 -> clamp 127, -126.5 -> -126, -127.5 -> -128 -> clamp -127,
    # 300 -> 127, -300 -> -127, 0.5 -> 0, 1.5 -> 2, -0.5 -> -0 = 0
    x = _t([126.5, 127.5, -126.5, -127.5, 300.0, -300.0, 0.5, 1.5, -0.5])
    q = quantize_affine(x, s, None, spec)
    assert torch.equal(q, torch.tensor([126, 127, -126, -127, 127, -127, 0, 2, 0], dtype=torch.int8))
    # dequantize: q * 1 in float32, then one cast
    assert torch.equal(dequantize_affine(q, s, None, spec, torch.bfloat16),
                       _t([126, 127, -126, -127, 127, -127, 0, 2, 0], torch.bfloat16))


def test_quantize_affine_blocks_from_scale_shape():
    # scale (2, 2) on a (2, 4) input: blocks of (1, 2); zero points per block
    spec = QuantSpec("uint8", symmetric=False)
    x = _t([[1.0, 2.0, 1.0, 2.0], [1.0, 2.0, 1.0, 2.0]])
    s = _t([[1.0, 0.5], [0.25, 2.0]])
    zp = torch.tensor([[0, 10], [100, 255]], dtype=I32)
    # block (0,0): 1 + 0, 2 + 0; (0,1): 2 + 10, 4 + 10; (1,0): 4 + 100, 8 + 100; (1,1): round(0.5) = 0 + 255,
    # 1 + 255 = 256 -> clamp 255
    q = quantize_affine(x, s, zp, spec)
    assert torch.equal(q, torch.tensor([[1, 2, 12, 14], [104, 108, 255, 255]], dtype=torch.uint8))
    # dq: (1 - 0) * 1, (2 - 0) * 1, (12 - 10) * 0.5, (14 - 10) * 0.5, (104 - 100) / 4, (108 - 100) / 4, 0, 0
    assert torch.equal(dequantize_affine(q, s, zp, spec), _t([[1, 2, 1, 2], [1, 2, 0, 0]]))


def test_fake_quantize_affine_by_hand_with_gradient():
    spec = QuantSpec("int8", symmetric=False)
    s, zp = _t([0.5]), torch.tensor([-100], dtype=I32)
    x = _t([0.25, 0.75, 113.75, 113.5, 113.25, -14.0, -14.25, -15.0]).requires_grad_()
    # x / s: 0.5 -> 0, 1.5 -> 2, 227.5 -> 228, 227, 226.5 -> 226, -28, -28.5 -> -28, -30
    # + zp:  -100, -98, 128 (clipped to 127), 127 (the edge), 126, -128 (the edge), -128, -130 (clipped to -128)
    fq = fake_quantize_affine(x, spec, scale=s, zero_point=zp)
    # (q - zp) * s: 0, 1, 113.5, 113.5, 113, -14, -14, -14
    assert torch.equal(fq, _t([0.0, 1.0, 113.5, 113.5, 113.0, -14.0, -14.0, -14.0]))
    fq.sum().backward()
    # straight-through inside [qmin, qmax] (the edges included), zero where clipped
    assert torch.equal(x.grad, _t([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_fake_quantize_affine_chooses_its_own_qparams_and_keeps_dtype():
    spec = QuantSpec("uint4", symmetric=False)
    x = _t([-0.3125, 0.0, 0.5, 1.5625], torch.bfloat16)
    # the uint4 case above: s = 1/8, zp = 2; q = 0, 2, 6, 14 -> dq = -0.25, 0, 0.5, 1.5
    fq = fake_quantize_affine(x, spec)
    assert fq.dtype == torch.bfloat16 and torch.equal(fq, _t([-0.25, 0.0, 0.5, 1.5], torch.bfloat16))
    # float-domain fake quantize: the uint4 float-domain case above
    fspec = QuantSpec("uint4", symmetric=False, zero_point_domain="float")
    fq = fake_quantize_affine(_t([0.3125, 2.1875, 1.0, 0.75, 0.625]), fspec)
    assert torch.equal(fq, _t([0.3125, 2.1875, 1.0625, 0.8125, 0.5625]))
    # symmetric int4: s = 7/4 / 7 = 1/4; -0.375 / s = -1.5 -> -2, 0.625 / s = 2.5 -> 2
    fq = fake_quantize_affine(_t([-0.375, 0.625, 1.75]), QuantSpec("int4"))
    assert torch.equal(fq, _t([-0.5, 0.5, 1.75]))


def test_round_ste_half_even_and_identity_gradient():
    x = _t([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.6]).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y, _t([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 3.0]))
    (y * _t([1, 2, 3, 4, 5, 6, 7])).sum().backward()
    assert torch.equal(x.grad, _t([1, 2, 3, 4, 5, 6, 7]))


# --- float8 ----------------------------------------------------------------------------------
# s = clamp(amax / fmax, eps); q = clamp(x / s, -fmax, fmax).to(float8) (nearest, ties to even);
# dq = q.float() * s


def test_float8_choose_by_hand():
    spec = QuantSpec("float8_e4m3fn", PerRow())
    # row amax 56 -> 56 / 448 = 1/8; row of zeros -> eps 1e-12; row amax 896 (negative) -> 2
    s = choose_qparams_float8(_t([[-56.0, 1.0], [0.0, 0.0], [-896.0, 3.0]]), spec)
    assert torch.equal(s, _t([[0.125], [1e-12], [2.0]]))
    # e5m2: fmax 57344; amax 7168 -> 1/8; a custom eps
    e5 = QuantSpec("float8_e5m2", eps=0.5)
    assert torch.equal(choose_qparams_float8(_t([7168.0, -1.0]), e5), _t([0.5]))  # 1/8 < eps 0.5
    assert torch.equal(choose_qparams_float8_from_amax(_t([7168.0, 0.0]), QuantSpec("float8_e5m2")),
                       _t([0.125, 1e-12]))


def test_float8_e4m3_quantize_ties_subnormals_saturation():
    spec = QuantSpec("float8_e4m3fn")
    s = _t([1.0])
    # [8, 16) steps by 1: 9.5 -> 10 (tie, even mantissa), 10.5 -> 10; smallest subnormal 2**-9:
    # 2**-10 is a tie between 0 and 2**-9 -> 0; 3 * 2**-10 a tie between 2**-9 and 2**-8 -> 2**-8;
    # 464 is past the max 448 -> clamp to 448 (without the clamp, 1000 would be NaN); -1000 -> -448
    x = _t([9.5, 10.5, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 448.0, 464.0, 1000.0, -1000.0])
    q = quantize_float8(x, s, spec)
    assert q.dtype == torch.float8_e4m3fn
    want = _t([10.0, 10.0, 2.0**-9, 0.0, 2.0**-8, 448.0, 448.0, 448.0, -448.0])
    assert torch.equal(q.float(), want)
    # dequantize with s = 2: q * 2, cast once to bf16 (all exact)
    assert torch.equal(dequantize_float8(q, _t([2.0]), spec, torch.bfloat16), (want * 2).bfloat16())


def test_float8_e5m2_quantize_by_hand():
    spec = QuantSpec("float8_e5m2")
    # s = 1/2: x / s = 9, 11, 2**-16, 122880 -> clamp 57344, -2**20 -> -57344
    # [8, 16) steps by 2 in e5m2: 9 -> 8 (tie, even), 11 -> 12 (tie, even); 2**-16 is the smallest subnormal
    q = quantize_float8(_t([4.5, 5.5, 2.0**-17, 61440.0, -(2.0**19)]), _t([0.5]), spec)
    assert torch.equal(q.float(), _t([8.0, 12.0, 2.0**-16, 57344.0, -57344.0]))
    assert torch.equal(dequantize_float8(q, _t([0.5]), spec), _t([4.0, 6.0, 2.0**-17, 28672.0, -28672.0]))


def test_fake_quantize_float8_by_hand_with_gradient():
    spec = QuantSpec("float8_e4m3fn")
    x = _t([4.75, 5.25, 224.0, 232.0, -300.0]).requires_grad_()
    # s = 1/2: x / s = 9.5 -> 10, 10.5 -> 10, 448 (the edge: kept, gradient 1), 464 -> 448 (clipped), -600 -> -448
    fq = fake_quantize_float8(x, spec, scale=_t([0.5]))
    assert torch.equal(fq, _t([5.0, 5.0, 224.0, 224.0, -224.0]))
    fq.sum().backward()
    assert torch.equal(x.grad, _t([1.0, 1.0, 1.0, 0.0, 0.0]))
    # its own scale: amax 300 -> s = 300 / 448; -300 / s = -448 exactly -> -300 back
    y = fake_quantize_float8(_t([-300.0, 0.0], torch.bfloat16), spec)
    assert y.dtype == torch.bfloat16 and torch.equal(y, _t([-300.0, 0.0], torch.bfloat16))


# --- packing ---------------------------------------------------------------------------------


def test_pack_unpack_by_hand():
    # byte j = element 2j in the low nibble | element 2j+1 in the high nibble
    u = torch.tensor([[15, 0, 8, 1], [0, 15, 7, 7]], dtype=torch.uint8)
    # 15 | 0 << 4 = 0x0F, 8 | 1 << 4 = 0x18, 0 | 15 << 4 = 0xF0, 7 | 7 << 4 = 0x77
    assert torch.equal(pack_int4(u), torch.tensor([[0x0F, 0x18], [0xF0, 0x77]], dtype=torch.uint8))
    s = torch.tensor([[[-1, -8, 0, 7]]], dtype=torch.int8)
    # two's complement nibbles: -1 = 0xF, -8 = 0x8: 0xF | 0x8 << 4 = 0x8F, 0 | 7 << 4 = 0x70
    p = pack_int4(s)
    assert p.shape == (1, 1, 2) and torch.equal(p, torch.tensor([[[0x8F, 0x70]]], dtype=torch.uint8))
    # unpack the same bytes both ways: signed nibbles sign-extend, unsigned do not
    assert torch.equal(unpack_int4(p, signed=True), s)
    assert torch.equal(unpack_int4(p, signed=False), torch.tensor([[[15, 8, 0, 7]]], dtype=torch.uint8))
    assert torch.equal(unpack_int4(torch.tensor([0x9E], dtype=torch.uint8), signed=True),
                       torch.tensor([-2, -7], dtype=torch.int8))  # 0xE = -2, 0x9 = -7


def test_pack_range_edges_accepted():
    # the range ends themselves are allowed: [-8, 7] and [0, 15]
    assert torch.equal(pack_int4(torch.tensor([-8, 7], dtype=torch.int8)), torch.tensor([0x78], dtype=torch.uint8))
    assert torch.equal(pack_int4(torch.tensor([0, 15], dtype=torch.uint8)), torch.tensor([0xF0], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-9, 0\]"):
        pack_int4(torch.tensor([-9, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        pack_int4(torch.tensor([16, 0], dtype=torch.uint8))
    # an empty tensor packs to an empty one (no range to check)
    assert pack_int4(torch.zeros(3, 0, dtype=torch.uint8)).shape == (3, 0)


# --- scale rules -----------------------------------------------------------------------------


def test_rules_by_hand():
    # float8_row_scale = max(amax_row, eps) / fmax: row amax 896 -> 2; zero row -> eps 1e-12 / 448
    w = _t([[-896.0, 1.0], [0.0, 0.0]])
    assert FLOAT8_ROW_EPS == 1e-12 and INT4_MAXABS_EPS == 1e-6
    assert torch.equal(float8_row_scale(w), torch.cat([_t([[2.0]]), _t([[1e-12]]) / 448]))
    # a custom eps 7: max(0, 7) / 448 = 1/64
    assert torch.equal(float8_row_scale(w, eps=7.0), _t([[2.0], [1 / 64]]))
    # int4_maxabs_group_scale = max(amax_group, eps) / 8: groups [0, 0] -> eps 1e-6 / 8, [1e-3, -2] -> 2 / 8
    w = _t([[0.0, 0.0, 1e-3, -2.0]])
    assert torch.equal(int4_maxabs_group_scale(w, 2), torch.cat([_t([[1e-6]]) / 8, _t([[0.25]])], 1))
    assert torch.equal(int4_maxabs_group_scale(w, 2, eps=4.0), _t([[0.5, 0.5]]))
    # the combined scale: group scale x row scale in float32
    assert torch.equal(float8_then_int4_scale(_t([[36.0, 56.0]]), _t([[0.5]])), _t([[18.0, 28.0]]))
    spec = int4_maxabs_spec(32)
    assert spec.granularity == PerGroup(32) and spec.symmetric and (spec.qmin, spec.qmax) == (-8, 7)
    assert spec.eps == 1e-6 / 8


def test_float8_then_int4_negative_max_lands_on_minus_8():
    # row amax 448 -> row scale 1; w / 1 is already e4m3: [-448, 224, 56, -28]
    # group [-448, 224]: amax 448 -> 56: -8, 4; group [56, -28]: amax 56 -> 7: 8 -> clamp 7, -4
    q, gs, rs = float8_then_int4(_t([[-448.0, 224.0, 56.0, -28.0]]), 2)
    assert torch.equal(rs, _t([[1.0]])) and torch.equal(gs, _t([[56.0, 7.0]]))
    assert torch.equal(q, torch.tensor([[-8, 4, 7, -4]], dtype=torch.int8))


def test_per_tensor_default_granularity():
    # the default QuantSpec granularity is per tensor: one scale of shape (1, 1) for a 2-D input
    s, _ = choose_qparams_affine(_t([[1.0, -2.0], [127 / 32, 0.0]]), QuantSpec("int8"))
    assert torch.equal(s, _t([[1 / 32]]))
    assert QuantSpec("int8").granularity == PerTensor()
