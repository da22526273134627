"""GGUF's Q8_0, Q4_0 and Q4_1 blocks <-> lowbit's Int8Tensor and Int4Tensor, one weight at a time.

A GGUF weight of logical shape ``(N, K)`` is ``N`` rows of ``K / 32`` blocks (blocks run along
in_features, as lowbit's groups do). Each block (little-endian, facts read from the gguf package):

====  =====  ==================================================  ===========================
type  bytes  layout                                              value of element i
====  =====  ==================================================  ===========================
Q8_0  34     fp16 d, 32 int8 q                                   ``d * q[i]``
Q4_0  18     fp16 d, 16 bytes: byte j = q[j] | q[j + 16] << 4    ``d * (q[i] - 8)``, q in [0, 15]
Q4_1  20     fp16 d, fp16 m, 16 bytes as Q4_0                    ``d * q[i] + m``
====  =====  ==================================================  ===========================

(the nibble order differs from lowbit's canonical int4 packing, where byte j holds elements 2j
and 2j + 1: values are unpacked and repacked, never reinterpreted.)

Mapping rules, exact except for float rounding that is stated:

* ``Int8Tensor``, symmetric, no activation quantization, blocks along in_features a multiple of
  32 (``PerGroup(32k)``, ``PerRow``, ``PerTensor``) -> Q8_0, the scale repeated per 32 values.
* ``Int4Tensor`` symmetric int4 -> Q4_0 (``q + 8``, ``d = scale``); uint4 with an int zero point
  of 8 or 7 in every group -> Q4_0 (zero point 7: ``d = -scale``, ``q -> 15 - q``); any other int
  zero point, or a float one -> Q4_1 (``d = scale``, ``m = -zero_point * scale``). Groups of 64,
  128, 256 are written as blocks of 32 with the group's scale repeated.
* ``d`` and ``m`` are float16 in GGUF: lowbit's float32 scales are rounded to nearest (the
  returned SQNR says by how much the written weight differs; the relative error per group is at
  most 2**-11 unless a scale is below float16's normal range, 6.1e-5).
* Import: Q8_0 -> ``Int8Tensor`` ``PerGroup(32)``; Q4_0 -> symmetric ``Int4Tensor`` g32 when every
  ``d >= 0``, else uint4 with an int8 zero point per group (8, or 7 with the values mirrored where
  ``d < 0``: lowbit's scales are positive); Q4_1 -> uint4 with a float32 zero point
  ``-m / d`` (``(q - zp) * d`` equals ``d * q + m`` within float32 rounding). A block with
  ``d == 0`` holds one value (0, or ``m``) and is stored with a positive scale that gives it exactly.

Anything else is refused with a ``ValueError`` naming the weight and the rule it breaks.
"""

from __future__ import annotations

import math

import torch

from lowbit.configs.int4 import Int4WeightOnlyConfig
from lowbit.configs.int8 import Int8WeightOnlyConfig
from lowbit.granularity import PerGroup
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.packing import unpack_int4
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.int4_tensor import Int4Tensor
from lowbit.tensors.int8_tensor import Int8Tensor

__all__ = ["BLOCK", "BLOCK_BYTES", "QUANT_TYPES", "type_config", "encode_weight", "decode_weight", "dequantize_blocks",
           "q8_0_if_exact"]

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
QUANT_TYPES = tuple(BLOCK_BYTES)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def type_config(type_name: str, *, mirrored: bool = False):
    """The lowbit config whose tensors a GGUF type maps onto exactly (``mirrored``: a Q4_0 weight
    with some ``d < 0``, held as uint4 with an int8 zero point)."""
    if type_name == "Q8_0":
        return Int8WeightOnlyConfig(granularity=PerGroup(BLOCK))
    if type_name == "Q4_0":
        return Int4WeightOnlyConfig(group_size=BLOCK, symmetric=not mirrored)
    if type_name == "Q4_1":
        return Int4WeightOnlyConfig(group_size=BLOCK, zero_point_domain="float")
    raise ValueError(f"type_name={type_name!r}; allowed: {', '.join(QUANT_TYPES)}")


# --- export -------------------------------------------------------------------------------------------


def _per_block(t: torch.Tensor, shape: tuple[int, int], name: str) -> torch.Tensor:
    """A (rows, K / b) qparam of a 2-D weight as one value per row and 32-block: (N, K / 32)."""
    n, k = shape
    bn, bk = n // t.shape[0], k // t.shape[1]
    if bk % BLOCK:
        raise ValueError(f"weight {name!r}: its qparams cover blocks of {bk} values along in_features; GGUF's "
                         f"Q4_0/Q4_1/Q8_0 need a multiple of {BLOCK} (group_size 32, 64, 128, 256, PerRow, PerTensor)")
    return t.repeat_interleave(bn, 0).repeat_interleave(bk // BLOCK, 1)


def _fp16(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(t) | (t.abs() > _FP16_MAX)
    if bool(bad.any()):
        raise ValueError(f"weight {name!r}: a {what} of {t[bad].reshape(-1)[0].item()!r} does not fit GGUF's "
                         f"float16 (|x| <= {_FP16_MAX})")
    return t.to(torch.float16)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, K / 32, 16) bytes, GGUF's order (element j low, j + 16 high)."""
    b = u.reshape(u.shape[0], -1, 2, BLOCK // 2)
    return b[:, :, 0] | (b[:, :, 1] << 4)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(*t.shape, 2)


def _sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR in dB of ``approx`` against ``ref`` (float32 sums: a report, not a bound)."""
    r, e = ref.reshape(-1), (ref - approx).reshape(-1)
    noise, signal = float(torch.dot(e, e)), float(torch.dot(r, r))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def encode_weight(w: torch.Tensor, name: str) -> tuple[str, torch.Tensor, float]:
    """A lowbit weight as GGUF blocks.

    Args:
        w: a 2-D ``Int8Tensor`` or ``Int4Tensor`` (see the module docstring for which).
        name: the weight's name, for error messages.

    Returns:
        ``(type_name, data, sqnr_db)``: data is uint8 ``(N, K / 32 * BLOCK_BYTES[type_name])``;
        ``sqnr_db`` compares the weight GGUF holds (float16 d and m) with ``w.dequantize()`` in
        float32 (``inf`` when equal).

    Raises:
        ValueError: a tensor class, spec or shape GGUF's Q8_0/Q4_0/Q4_1 cannot hold, or a scale
            beyond float16's range.
    """
    if not isinstance(w, (Int8Tensor, Int4Tensor)):
        kind = type(w).__name__ if isinstance(w, QuantizedTensor) else "a float tensor"
        raise ValueError(f"weight {name!r} is {kind}; GGUF export writes Int8Tensor (Q8_0) and Int4Tensor "
                         "(Q4_0/Q4_1) weights")
    if w.dim() != 2 or w.shape[-1] % BLOCK:
        raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}; GGUF blocks need a 2-D weight whose "
                         f"in_features is a multiple of {BLOCK}")
    if w.act_spec is not None:
        raise ValueError(f"weight {name!r} quantizes its activations ({w.act_spec.dtype.name}); GGUF files hold "
                         "weight-only quantization: quantize with a weight-only config "
                         "(lowbit.formats.gguf.gguf_config)")
    shape = (int(w.shape[0]), int(w.shape[1]))
    if isinstance(w, Int8Tensor):
        return _encode_int8(w, shape, name)
    return _encode_int4(w, shape, name)


def _encode_int8(w: Int8Tensor, shape, name):
    if w.zero_point is not None or not w.spec.symmetric:
        raise ValueError(f"weight {name!r} is asymmetric int8 (a zero point); GGUF's Q8_0 is symmetric")
    if w.act_pre_scale is not None:
        raise ValueError(f"weight {name!r} carries a SmoothQuant pre-scale; GGUF has no place for it")
    n, k = shape
    d = _fp16(_per_block(w.scale.float(), shape, name), "scale", name)
    q = w.qdata.reshape(n, k // BLOCK, BLOCK)
    data = torch.cat([_fp16_bytes(d), q.view(torch.uint8)], -1).reshape(n, -1)
    approx = (d.float().unsqueeze(-1) * q.float()).reshape(n, k)
    return "Q8_0", data, _sqnr(w.dequantize(torch.float32), approx)


def _encode_int4(w: Int4Tensor, shape, name):
    n, k = shape
    signed = w.spec.dtype.name == "int4"
    q = unpack_int4(w.qdata, signed=signed).reshape(n, k // BLOCK, BLOCK)
    s = _per_block(w.scale.float(), shape, name)
    if signed:
        type_name, d, m, u = "Q4_0", s, None, (q.to(torch.int16) + 8).to(torch.uint8)
    else:
        zp = _per_block(w.zero_point, shape, name)
        if w.zero_point.dtype != torch.float32 and bool(((zp == 8) | (zp == 7)).all()):
            flip = (zp == 7).unsqueeze(-1)
            type_name, d, m, u = "Q4_0", torch.where(zp == 8, s, -s), None, torch.where(flip, 15 - q, q)
        else:
            type_name, d, m, u = "Q4_1", s, -zp.float() * s, q
    d16 = _fp16(d, "scale", name)
    parts = [_fp16_bytes(d16)]
    approx = d16.float().unsqueeze(-1) * (u.float() - 8 if m is None else u.float())
    if m is not None:
        m16 = _fp16(m, "offset -zero_point * scale", name)
        parts.append(_fp16_bytes(m16))
        approx = approx + m16.float().unsqueeze(-1)
    parts.append(_nibbles(u.reshape(n, k)))
    data = torch.cat(parts, -1).reshape(n, -1)
    return type_name, data, _sqnr(w.dequantize(torch.float32), approx.reshape(n, k))


def q8_0_if_exact(t: torch.Tensor) -> torch.Tensor | None:
    """Q8_0 blocks holding exactly the float 2-D tensor ``t`` (llama.cpp's rule: ``d = fp16(amax / 127)``,
    ``q = round(x / d)``), or None when some value is not ``d * q``. A Q8_0 tensor imported as float
    (an embedding) is written back as the same blocks."""
    if t.dim() != 2 or t.shape[-1] % BLOCK or not t.is_floating_point():
        return None
    n, k = t.shape
    x = t.detach().float().reshape(n, k // BLOCK, BLOCK)
    amax = x.abs().amax(-1)
    if not bool(torch.isfinite(amax).all()) or float(amax.max()) / 127 > _FP16_MAX:
        return None
    d = (amax / 127).to(torch.float16)
    df = d.float().unsqueeze(-1)
    q = torch.where(df > 0, torch.round(x / torch.where(df > 0, df, 1.0)), 0.0)
    if bool((q.abs() > 127).any()) or not torch.equal(q * df, x):
        return None
    return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], -1).reshape(n, -1)


# --- import -------------------------------------------------------------------------------------------


def _split(data: torch.Tensor, type_name: str, shape) -> tuple[torch.Tensor, ...]:
    """``(d, values[, m])``: d and m float32 ``(N, K / 32)``; values ``(N, K / 32, 32)`` int8 (Q8_0) or
    uint8 in [0, 15] in element order (Q4_x)."""
    n, k = shape
    if k % BLOCK or tuple(data.shape) != (n, k // BLOCK * BLOCK_BYTES[type_name]):
        raise ValueError(f"{type_name} data of shape {tuple(data.shape)} does not hold a ({n}, {k}) weight "
                         f"({BLOCK_BYTES[type_name]} bytes per {BLOCK} values)")
    blocks = data.reshape(n, k // BLOCK, BLOCK_BYTES[type_name])
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    if type_name == "Q8_0":
        return d, blocks[..., 2:].contiguous().view(torch.int8)
    body = blocks[..., -BLOCK // 2:]
    u = torch.cat([body & 0xF, body >> 4], -1)  # (n, nb, 32) in element order
    if type_name == "Q4_0":
        return d, u
    return d, u, blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()


def _pack(u: torch.Tensor, shape) -> torch.Tensor:
    """uint8 values in [0, 15] -> lowbit's canonical packing (``pack_int4``'s layout: byte j holds
    elements 2j, 2j + 1), without ``pack_int4``'s range scan: GGUF nibbles are in range by construction."""
    u = u.reshape(shape)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def dequantize_blocks(data: torch.Tensor, type_name: str, shape) -> torch.Tensor:
    """GGUF's own value of each element, in float32 (d and m widened from float16 first)."""
    parts = _split(data, type_name, shape)
    if type_name == "Q8_0":
        x = parts[0].unsqueeze(-1) * parts[1].float()
    elif type_name == "Q4_0":
        x = parts[0].unsqueeze(-1) * (parts[1].float() - 8)
    else:
        x = parts[0].unsqueeze(-1) * parts[1].float() + parts[2].unsqueeze(-1)
    return x.reshape(shape)


def decode_weight(data: torch.Tensor, type_name: str, shape, name: str):
    """GGUF blocks as a lowbit tensor and the config that describes it.

    Args:
        data: uint8 ``(N, K / 32 * BLOCK_BYTES[type_name])`` as the file stores it.
        type_name: "Q8_0", "Q4_0" or "Q4_1".
        shape: the logical ``(N, K)``.
        name: for error messages.

    Returns:
        ``(tensor, config)``: an ``Int8Tensor``/``Int4Tensor`` (float32 dequantized dtype) and the
        ``QuantConfig`` whose ``weight_spec()`` it carries.

    Raises:
        ValueError: data of the wrong size, a non-finite d or m, or a Q8_0 block with ``d < 0``
            holding -128 (its mirror, 128, is not an int8).
    """
    if type_name not in QUANT_TYPES:
        raise ValueError(f"{name}: type {type_name!r} does not map onto a lowbit tensor; allowed: {QUANT_TYPES}")
    parts = _split(data, type_name, shape)
    d = parts[0]
    for t, what in zip(parts[:1] + parts[2:], ("d", "m")):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {type_name} block {what} holds NaN/inf")
    n, k = shape
    if type_name == "Q8_0":
        return _decode_q8_0(d, parts[1], (n, k), name)
    if type_name == "Q4_0":
        return _decode_q4_0(d, parts[1], (n, k))
    return _decode_q4_1(d, parts[1], parts[2], (n, k))


def _tiny(config) -> float:
    return config.weight_spec().eps


def _decode_q8_0(d, q, shape, name):
    config = type_config("Q8_0")
    if bool((d <= 0).any()):  # rare: mirror d < 0 blocks, hold d == 0 blocks (all zeros) with a tiny scale
        neg, zero = (d < 0).unsqueeze(-1), (d == 0).unsqueeze(-1)
        if bool((neg & (q == -128)).any()):
            raise ValueError(f"{name}: a Q8_0 block with d < 0 holds -128, whose mirror 128 is not an int8: lowbit "
                             "stores positive scales")
        q = torch.where(zero, torch.zeros_like(q), torch.where(neg, -q, q))
        d = torch.where(d == 0, torch.full_like(d, _tiny(config)), d.abs())
    scale = d
    t = Int8Tensor(qdata=q.reshape(shape).contiguous(), scale=scale, spec=config.weight_spec(), act_spec=None,
                   kernel=KernelPreference.AUTO, dtype=torch.float32)
    return t, config


def _decode_q4_0(d, u, shape):
    mirrored = bool((d < 0).any())
    config = type_config("Q4_0", mirrored=mirrored)
    if bool((d == 0).any()):  # all values 0: u = 8 with a tiny positive scale
        u = torch.where((d == 0).unsqueeze(-1), torch.full_like(u, 8), u)
        d = torch.where(d == 0, torch.full_like(d, _tiny(config)), d)
    scale = d.abs()
    if mirrored:  # d * (u - 8) == -d * ((15 - u) - 7)
        neg = d < 0
        u = torch.where(neg.unsqueeze(-1), 15 - u, u)
        zp = torch.where(neg, 7, 8).to(torch.int8)
    else:
        zp = None
    # int4 two's complement of u - 8 is u ^ 8 in the low nibble
    qdata = _pack(u if mirrored else u ^ 8, shape)
    t = Int4Tensor(qdata=qdata, scale=scale, zero_point=zp, spec=config.weight_spec(), act_spec=None,
                   kernel=KernelPreference.AUTO, shape=shape, dtype=torch.float32)
    return t, config


def _decode_q4_1(d, u, m, shape):
    config = type_config("Q4_1")
    # d * u + m == (u - zp) * s with s = |d|; d < 0 mirrors u -> 15 - u; d == 0: all values are m,
    # held as u = 0 with s = |m| and zp = -sign(m) (or s = eps, zp = 0 when m == 0 too)
    neg, zero = d < 0, d == 0
    if bool((neg | zero).any()):
        u = torch.where(zero.unsqueeze(-1), torch.zeros_like(u), torch.where(neg.unsqueeze(-1), 15 - u, u))
        s = torch.where(zero, torch.where(m == 0, torch.full_like(m, _tiny(config)), m.abs()), d.abs())
        zp = torch.where(zero, -torch.sign(m), torch.where(neg, 15 - m / s, -m / d))
    else:
        s, zp = d, -m / d
    t = Int4Tensor(qdata=_pack(u, shape), scale=s, zero_point=zp.float(), spec=config.weight_spec(),
                   act_spec=None, kernel=KernelPreference.AUTO, shape=shape, dtype=torch.float32)
    return t, config
