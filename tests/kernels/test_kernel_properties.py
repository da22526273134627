"""Every quantized linear's fast path (``KernelPreference.AUTO``) against its reference
(``KernelPreference.REFERENCE``: dequantize with the primitives, then the float op) over random
shapes (odd N and K where the layout allows), dtypes, batch sizes, group sizes and extreme values.

Weights are made the way users make them: an ``nn.Linear`` holding the float weight, quantized by
``quantize_`` with a config; the reference is the same quantized tensor with its kernel preference
switched to REFERENCE. Bounds are the kernel tests' own (``test_int8.py``, ``test_int4.py``,
``test_float8.py``; the C++ kernel tests' bounds are at least as tight), in dB of SQNR; where the
reference is integer-exact (dyadic scales and activations, sums below 2^24), outputs are equal.

Inputs mix kinds: randn, constant rows / groups, all-zero rows, subnormals of the dtype among
normal values, an outlier spike, and extremes. Extremes: +-max of float16 for float16 activations;
+-2^100 for bfloat16 / float32 activations and +-2^100 (2^15 in float16) for weights. Not the
float32 max there: the C++ int4 bf16 GEMV sums ``x * (128 + q)`` and the float8 kernels ``x * q``
in float32 before scaling, which overflows for inputs within ~2^10 of float32's max (the
reference rounds the scaled weight first); and an asymmetric int4 group's rounded zero point can
stretch its range by half a step past the dtype's max. The other operand is scaled so that the
reference's output stays finite.

The example counts are the CI profile's (150) scaled by ``_n``: 2,800 cases a run
(about 70 s of one core here; the primitives' property tests add about 5,000).
"""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit import configs as C
from lowbit.granularity import PerGroup, PerRow, PerTensor
from lowbit.kernels.preference import KernelPreference
from lowbit.quantize import quantize_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# tests/kernels/test_int8.py
INT8_WEIGHT_ONLY_DB = {torch.bfloat16: 44.0, torch.float16: 60.0, torch.float32: 110.0}
W8A8_DB = 80.0
# tests/kernels/test_int4.py (AUTO_VS_REF_DB; float16 as in its test_auto_matches_reference)
INT4_DB = {torch.bfloat16: 40.0, torch.float16: 60.0, torch.float32: 100.0}
# tests/kernels/test_float8.py
FLOAT8_DB = {torch.bfloat16: 40.0, torch.float16: 55.0, torch.float32: 100.0}
# How an output is compared (``_assert_close``): within the SQNR bound as it is, or else after
# taking away what is rounding, not noise (an SQNR bound measured on 10^4 randn outputs averages
# rounding away; one output dominated by one term can't: a single bf16 output one ulp off is 42-48
# dB). Per element: OUTPUT_ROUNDING_ULPS ulps of the output dtype (the reference's output is itself
# rounded: a path summing in another order may land on the neighbouring value), plus
# WEIGHT_ROUNDINGS x the dtype's unit roundoff x the root-sum-square of the terms summed (each side
# rounds each dequantized weight, or its scale, to the dtype at most once, in different places: the
# reference rounds (q - zp) s, torch's int8pack kernel the scale, the C++ GEMVs nothing). The signal
# is then floored at that root-sum-square too: an output that cancels (or is all zero) has too
# little signal of its own to measure rounding against.
OUTPUT_ROUNDING_ULPS = 1
WEIGHT_ROUNDINGS = 2

X_KINDS = ["randn", "randn", "randn", "const", "zero_rows", "denormal", "spike", "extreme"]
W_KINDS = ["randn", "randn", "randn", "const_groups", "zero_rows", "denormal", "spike", "extreme"]
EXTREME = {torch.float16: 65504.0, torch.bfloat16: 2.0**100, torch.float32: 2.0**100}
W_EXTREME = {torch.float16: 2.0**15, torch.bfloat16: 2.0**100, torch.float32: 2.0**100}


def _n(examples: int) -> int:
    """``examples`` scaled by the loaded profile (CI: 150 -> as written)."""
    return max(5, examples * settings().max_examples // 150)


def _fill(g, shape, kind, dtype, extreme, block=16):
    """A float64 tensor of the kind (values representable once cast to ``dtype``)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = shape[0]
    if kind == "const":
        x = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(shape).clone()
    elif kind == "const_groups":
        blocks = torch.randn(rows, math.ceil(shape[1] / block), generator=g, dtype=torch.float64)
        x = blocks.repeat_interleave(block, dim=1)[:, : shape[1]].clone()
    elif kind == "zero_rows":
        x[torch.rand(rows, generator=g) < 0.5] = 0.0
    elif kind == "denormal":  # subnormals of the dtype among normal values (a row of only
        # subnormals is below every kernel's resolution: vdpbf16ps reads bf16 subnormals as zero)
        tiny = torch.finfo(dtype).smallest_normal / 4
        x[torch.rand(shape, generator=g) < 0.3] = tiny
    elif kind == "spike":
        x[:, int(torch.randint(0, shape[1], (1,), generator=g))] *= 1e3 if dtype != torch.float16 else 1e2
    elif kind == "extreme":  # one or two entries per row at +-extreme
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            cols = torch.randint(0, shape[1], (rows,), generator=g)
            signs = torch.randint(0, 2, (rows,), generator=g).double() * 2 - 1
            x[torch.arange(rows), cols] = signs * extreme
    return x


def _operands(data, m, n, k, dtype, block=16, x_kinds=X_KINDS, w_kinds=W_KINDS, x_extreme=None):
    """x (m, k), W (n, k), bias (n,) or None in ``dtype``; the reference's output stays finite."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    xk, wk = data.draw(st.sampled_from(x_kinds), label="x kind"), data.draw(st.sampled_from(w_kinds), label="w kind")
    x = _fill(g, (m, k), xk, dtype, x_extreme or EXTREME[dtype])
    w = _fill(g, (n, k), wk, dtype, W_EXTREME[dtype], block)
    b = torch.randn(n, generator=g, dtype=torch.float64) if data.draw(st.booleans(), label="bias") else None
    # keep K max|x| max|W| below max / 64: scale the operand that is not extreme. (Bound by the
    # maxima: quantization moves a small weight next to a huge one in its group by up to a step.)
    fmax = torch.finfo(dtype).max / 64
    total = k * float(x.abs().max()) * float(w.abs().max()) if m and n and k else 0.0
    if total > fmax:
        if xk == "extreme":
            w *= fmax / total
        else:
            x *= fmax / total
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _linear(config, w, b):
    """The quantized weight of ``nn.Linear`` holding ``w`` after ``quantize_(.., config)``."""
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device="meta")
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    if b is not None:
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    quantize_(layer, config)
    return layer.weight, layer.bias


def _auto_and_reference(config, x, w, b):
    qw, qb = _linear(config, w, b)
    with torch.no_grad():
        out = F.linear(x, qw, qb)
        ref = F.linear(x, qw._replace(kernel=KernelPreference.REFERENCE), qb)
    return out, ref, qw


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _ulp(t):
    """The spacing of ``t.dtype``'s values at each element of ``t`` (float64)."""
    fi = torch.finfo(t.dtype)
    _, e = torch.frexp(t.double())  # |t| = m 2^e, m in [0.5, 1); zero: e = 0
    ulp = torch.ldexp(torch.ones_like(t, dtype=torch.float64), e - 1 - _MANTISSA_BITS[t.dtype])
    subnormal = fi.smallest_normal * 2.0 ** -_MANTISSA_BITS[t.dtype]
    return torch.where(t.double().abs() < fi.smallest_normal, subnormal, ulp.clamp(min=subnormal))


def _assert_close(out, ref, db, x, qw, b):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert bool(torch.isfinite(ref).all()), "the inputs were chosen to keep the reference finite"
    assert bool(torch.isfinite(out).all()), "fast path: non-finite output where the reference is finite"
    bound = 10 ** (-db / 20)
    noise, signal = torch.linalg.vector_norm(out.double() - ref.double()), torch.linalg.vector_norm(ref.double())
    if noise <= bound * signal:  # the common case: within the bound as it is (float64: no overflow)
        return
    # sum_k (x W)^2 per output, in float32 on operands scaled to max 1 (their squares would overflow)
    w = qw.dequantize(torch.float32)
    xs, ws = float(x.float().abs().max()) or 1.0, float(w.abs().max()) or 1.0
    terms = ((x.float() / xs).square() @ (w / ws).square().t()).double() * (xs * ws) ** 2
    if b is not None:
        terms = terms + b.double().square()
    # rounding, not noise: ulps of the output, and (float16) the subnormal grid each weight or
    # scale may be rounded to, times the activations it multiplies
    unit_roundoff = 2.0 ** -(_MANTISSA_BITS[ref.dtype] + 1)
    rounding = OUTPUT_ROUNDING_ULPS * _ulp(ref) + WEIGHT_ROUNDINGS * unit_roundoff * terms.sqrt()
    if ref.dtype == torch.float16:
        subnormal = torch.finfo(torch.float16).smallest_normal * 2.0**-_MANTISSA_BITS[torch.float16]
        rounding = rounding + 2 * subnormal * x.double().abs().sum(-1, keepdim=True)
    diff = (out.double() - ref.double()).abs()
    noise = torch.linalg.vector_norm((diff - rounding).clamp(min=0)).item()
    signal = max(torch.linalg.vector_norm(ref.double()).item(), torch.linalg.vector_norm(terms.sqrt()).item())
    assert noise <= signal * bound, f"{20 * math.log10(signal / noise) if noise else math.inf:.1f} dB < {db} dB"


def _m(data):
    """Batch sizes: 1..40 mostly (decode and small-M kernels), some larger (chunked paths)."""
    return data.draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 4, 5, 8, 17, 33, 64, 96])), label="M")


# --- int8 -------------------------------------------------------------------------------------------


@settings(max_examples=_n(450))
@given(st.data())
def test_int8_weight_only(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    gran = data.draw(st.sampled_from(["row", "tensor", 8, 16, 24, 32, 64]), label="granularity")
    if isinstance(gran, int):
        k, granularity = gran * data.draw(st.integers(1, 6)), PerGroup(gran)
    else:
        k, granularity = data.draw(st.integers(1, 200), label="K"), PerRow() if gran == "row" else PerTensor()
    m, n = _m(data), data.draw(st.integers(1, 70), label="N")
    x, w, b = _operands(data, m, n, k, dtype, block=gran if isinstance(gran, int) else 16)
    out, ref, qw = _auto_and_reference(C.Int8WeightOnlyConfig(granularity), x, w, b)
    _assert_close(out, ref, INT8_WEIGHT_ONLY_DB[dtype], x, qw, b)


def _w8a8_config(data, x, granularity):
    mode = data.draw(st.sampled_from(["dynamic-sym", "dynamic-asym", "static-sym", "static-asym"]), label="act")
    if mode.startswith("dynamic"):
        return C.Int8DynamicActivationInt8WeightConfig(act_symmetric=mode.endswith("-sym"), granularity=granularity)
    amax = float(x.float().abs().max()) or 1.0
    act_scale = amax / 127 * data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="act scale x")  # 0.5: saturates
    zp = None if mode.endswith("-sym") else data.draw(st.integers(-20, 20), label="act zp")
    return C.Int8StaticActivationInt8WeightConfig(act_scale=act_scale, act_zero_point=zp, granularity=granularity)


@settings(max_examples=_n(300))
@given(st.data())
def test_int8_activations(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    granularity = data.draw(st.sampled_from([PerRow(), PerTensor()]), label="granularity")
    m, n, k = _m(data), data.draw(st.integers(1, 70), label="N"), data.draw(st.integers(1, 200), label="K")
    x, w, b = _operands(data, m, n, k, dtype)
    out, ref, qw = _auto_and_reference(_w8a8_config(data, x, granularity), x, w, b)
    _assert_close(out, ref, W8A8_DB, x, qw, b)


# --- int4 -------------------------------------------------------------------------------------------


def _int4_shape(data):
    g = data.draw(st.sampled_from([32, 64, 128, 256]), label="group")
    return g, g * data.draw(st.integers(1, 3 if g < 256 else 2), label="groups"), data.draw(st.integers(1, 64), label="N")


@settings(max_examples=_n(450))
@given(st.data())
def test_int4_weight_only(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    g, k, n = _int4_shape(data)
    variant = data.draw(st.sampled_from(["asym", "sym", "float-zp"]), label="variant")
    config = C.Int4WeightOnlyConfig(group_size=g, symmetric=variant == "sym",
                                    zero_point_domain="float" if variant == "float-zp" else "int")
    x, w, b = _operands(data, _m(data), n, k, dtype, block=g)
    out, ref, qw = _auto_and_reference(config, x, w, b)
    _assert_close(out, ref, INT4_DB[dtype], x, qw, b)


@settings(max_examples=_n(300))
@given(st.data())
def test_int4_behind_int8_or_float8_activations(data):
    """8da4w and float8 x int4: the activation is fake-quantized by the primitives (the same values
    on both sides), then the int4 weight-only kernels run."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    g, k, n = _int4_shape(data)
    config = data.draw(st.sampled_from([C.Int8DynamicActivationInt4WeightConfig, C.Float8DynamicActivationInt4WeightConfig]))
    # 8da4w's asymmetric int8 grid can reach half a step past [min, max]: fake-quantized float16
    # activations at +-max become +-inf (in the reference too); half the max stays finite
    extreme = 2.0**15 if dtype == torch.float16 and config is C.Int8DynamicActivationInt4WeightConfig else None
    x, w, b = _operands(data, _m(data), n, k, dtype, block=g, x_extreme=extreme)
    out, ref, qw = _auto_and_reference(config(group_size=g), x, w, b)
    _assert_close(out, ref, INT4_DB[dtype], x, qw, b)


# --- float8 -----------------------------------------------------------------------------------------


@settings(max_examples=_n(400))
@given(st.data())
def test_float8_weight_only(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    fp8 = data.draw(st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]), label="float8")
    granularity = data.draw(st.sampled_from([PerRow(), PerTensor()]), label="granularity")
    m, n, k = _m(data), data.draw(st.integers(1, 70), label="N"), data.draw(st.integers(1, 200), label="K")
    x, w, b = _operands(data, m, n, k, dtype)
    out, ref, qw = _auto_and_reference(C.Float8WeightOnlyConfig(granularity=granularity, dtype=fp8), x, w, b)
    _assert_close(out, ref, FLOAT8_DB[dtype], x, qw, b)


@settings(max_examples=_n(300))
@given(st.data())
def test_float8_activations(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    m, n, k = _m(data), data.draw(st.integers(1, 70), label="N"), data.draw(st.integers(1, 200), label="K")
    x, w, b = _operands(data, m, n, k, dtype)
    granularity = data.draw(st.sampled_from([PerRow(), PerTensor()]), label="granularity")
    if data.draw(st.booleans(), label="static"):
        amax = float(x.float().abs().max()) or 1.0
        act_scale = amax / 448 * data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="act scale x")
        config = C.Float8StaticActivationFloat8WeightConfig(act_scale=act_scale, granularity=granularity)
    else:
        config = C.Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    out, ref, qw = _auto_and_reference(config, x, w, b)
    _assert_close(out, ref, FLOAT8_DB[dtype], x, qw, b)


# --- where the reference is integer-exact, the fast paths are too ---------------------------------


def _dyadic(g, shape, qmax, exponent):
    """Integers in [-qmax, qmax] times 2^exponent, each row (or group) reaching +-qmax once, so a
    max-abs scale is exactly 2^exponent."""
    q = torch.randint(-qmax, qmax + 1, shape, generator=g).double()
    q[:, 0] = qmax * (torch.randint(0, 2, (shape[0],), generator=g).double() * 2 - 1)
    return q * 2.0**exponent


@settings(max_examples=_n(600))
@given(st.data())
def test_exact_where_the_reference_is_integer(data):
    """Power-of-two scales, activations on a coarse dyadic grid, K small enough that every float32
    partial sum is an integer below 2^24 in units of the grid: the reference's float matmul is exact,
    so every kernel (integer or float accumulation, any order) must give the same bits."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scheme = data.draw(st.sampled_from(["int8-weight-only", "w8a8-dynamic", "w8a8-static", "int4-sym", "float8"]),
                       label="scheme")
    m, n = _m(data), data.draw(st.integers(1, 48), label="N")
    # float16: exact sums reach 2^22.2 grid units; small enough exponents keep them below its max
    ew = data.draw(st.integers(-6, -4) if dtype == torch.float16 else st.integers(-6, 2), label="w exponent")
    ex = data.draw(st.integers(-5, -3) if dtype == torch.float16 else st.integers(-5, 1), label="x exponent")
    if scheme.startswith("int4"):
        group = data.draw(st.sampled_from([32, 64, 128]), label="group")
        k = group * data.draw(st.integers(1, 2))
        w = torch.cat([_dyadic(g, (n, group), 7, ew) for _ in range(k // group)], dim=1)  # each group reaches +-7
        config = C.Int4WeightOnlyConfig(group_size=group, symmetric=True)
    elif scheme == "float8":
        k = data.draw(st.integers(1, 160), label="K")
        # float8 e4m3 values with at most 3 significant bits, each row reaching 448 = max
        w = (torch.randint(-7, 8, (n, k), generator=g).double() * 2.0 ** torch.randint(-3, 3, (n, k), generator=g))
        w[:, 0] = 448.0
        w = w * 2.0**ew
        config = C.Float8WeightOnlyConfig(granularity=PerRow())
    else:
        k = data.draw(st.integers(1, 160), label="K")
        w = _dyadic(g, (n, k), 127, ew)
        config = {
            "int8-weight-only": C.Int8WeightOnlyConfig(),
            "w8a8-dynamic": C.Int8DynamicActivationInt8WeightConfig(),
            "w8a8-static": C.Int8StaticActivationInt8WeightConfig(act_scale=2.0**ex),
        }[scheme]
    # activations: integers |q| <= 127 on the grid 2^ex (each row reaching 127 for per-token scales);
    # bfloat16 holds 8 significant bits, so every value here is exact in every dtype
    x = _dyadic(g, (m, k), 127, ex)
    # a bias only where every path adds it before its one rounding: W8A8 (float32 epilogue) and
    # float32 (weight-only paths round a bf16/fp16 matmul output, then add the bias)
    b = None
    if data.draw(st.booleans(), label="bias") and (scheme.startswith("w8a8") or dtype == torch.float32):
        b = torch.randint(-64, 65, (n,), generator=g).double() * 2.0 ** (ew + ex + 4)
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    out, ref, _ = _auto_and_reference(config, x, w, b)
    assert torch.equal(out, ref), (out - ref).abs().max()


def test_every_config_class_is_covered():
    """A new PTQ config needs its property test here."""
    covered = {
        "Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Int8StaticActivationInt8WeightConfig",
        "Int4WeightOnlyConfig", "Int8DynamicActivationInt4WeightConfig", "Float8DynamicActivationInt4WeightConfig",
        "Float8WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig", "Float8StaticActivationFloat8WeightConfig",
    }
    from lowbit.configs.base import registered_configs

    assert {c for c in registered_configs() if c != "QATConfig"} <= covered

