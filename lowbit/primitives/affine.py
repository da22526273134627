"""Affine integer quantization: choose qparams, quantize, dequantize, fake quantize.

The formulas (s = scale, zp = zero point, both per block):

* symmetric, signed:    ``s = amax / min(qmax, -qmin)``, no zero point;
* symmetric, unsigned:  ``zp = mid = (qmin + qmax + 1) // 2``, ``s = amax / min(qmax - mid, mid - qmin)``;
* asymmetric, int domain: ``s = (max(x, 0) - min(x, 0)) / (qmax - qmin)``,
                        ``zp = clamp(qmin - round(min(x, 0) / s), qmin, qmax)``: the range includes
                        0 and 0 is exact;
* asymmetric, float domain (tinygemm/HQQ style): ``s = (max(x) - min(x)) / (qmax - qmin)``,
                        ``zp = qmin - min(x) / s`` unrounded and unclamped: the range is the
                        values' own, ``min(x)`` maps exactly to ``qmin``, 0 need not be exact;
* every scale is computed in float32 and clamped below by ``spec.eps``;
* quantize: int domain ``q = clamp(round(x / s) + zp, qmin, qmax)``,
            float domain ``q = clamp(round(x / s + zp), qmin, qmax)``, ``round`` half to even;
* dequantize: ``(q - zp) * s`` in float32, one cast to the output dtype at the end.

Block sizes: ``choose_qparams_affine`` takes the blocks from ``spec.granularity``; quantize and
dequantize infer them from the scale's shape (``shape[i] // scale.shape[i]``), so a tensor
sliced together with its scale still dequantizes correctly.

Non-finite input: ``choose_qparams_affine`` raises ``ValueError`` (eager mode; under
``torch.compile`` the check is skipped). Callers on a hot path (dynamic activation
quantization) pass ``check_finite=False``; then a block holding NaN or inf gets a NaN or inf
scale and everything computed from it is NaN, as the float op would be: never a finite guess.
"""

from __future__ import annotations

import torch

from lowbit.spec import QuantSpec

__all__ = [
    "choose_qparams_affine",
    "choose_qparams_affine_from_min_max",
    "quantize_affine",
    "dequantize_affine",
    "dequantize_blocks",
    "fake_quantize_affine",
    "round_ste",
]


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` (half to even) whose gradient is the identity (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient: the library's only rounding."""
    return _RoundSTE.apply(x)


# --- block views --------------------------------------------------------------------------


def _check_float(input: torch.Tensor, name: str = "input") -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{name} must have rank >= 1, got a 0-d tensor")


def _blocked_shape(shape, block) -> list[int]:
    out: list[int] = []
    for d, b in zip(shape, block):
        out += [d // b, b]
    return out


def _block_from_scale(shape, scale: torch.Tensor, name: str = "scale") -> tuple[int, ...]:
    """Infer the block size from a scale of the same rank whose dims divide ``shape``."""
    if scale.dim() != len(shape):
        raise ValueError(
            f"{name} has shape {tuple(scale.shape)} but must have the input's rank {len(shape)} "
            f"(input shape {tuple(shape)}); scales keep one dim per input dim"
        )
    block = []
    for d, n in zip(shape, scale.shape):
        if n == 0 or d % n:
            raise ValueError(f"{name} shape {tuple(scale.shape)} does not divide input shape {tuple(shape)}")
        block.append(d // n)
    return tuple(block)


def _expand(t: torch.Tensor) -> torch.Tensor:
    """A per-block tensor of shape (n0, n1, ...) viewed as (n0, 1, n1, 1, ...) to broadcast."""
    return t.reshape(_blocked_shape(t.shape, (1,) * t.dim()))


def _reduce(x: torch.Tensor, block: tuple[int, ...], op) -> torch.Tensor:
    """Per-block ``op`` (``torch.amin`` or ``torch.amax``) of ``x`` in float32, shaped
    ``shape[i] // block[i]``. Separate amin/amax calls: ``torch.aminmax`` over a dim is several
    times slower on CPU."""
    n = [d // b for d, b in zip(x.shape, block)]
    xb = x.reshape(_blocked_shape(x.shape, block))
    dims = [2 * i + 1 for i, b in enumerate(block) if b > 1]
    r = op(xb, dim=dims, keepdim=True) if dims else xb
    return r.reshape(n).float()


def _min_max(x: torch.Tensor, block: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max of ``x`` in float32."""
    return _reduce(x, block, torch.amin), _reduce(x, block, torch.amax)


def _abs_max(x: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """Per-block ``max(|x|)`` in float32: equal to ``max(-min(x, 0), max(x, 0))``, in one reduction."""
    return _reduce(x.abs(), block, torch.amax)


def _check_finite(*tensors: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("input contains NaN or inf: its scale would be meaningless; clean the tensor first")


def _div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor``, correctly rounded on every device. CUDA divides by a Python (or CPU) scalar as
    a multiplication by its reciprocal, one bit off for divisors such as 127, 15 or 448: a weight
    quantized on a GPU then had other scales (and codes) than the same weight quantized on the CPU
    (tests/test_cuda.py). A divisor on ``t``'s own device is a true division everywhere; the CPU
    divides by a Python number truly already, so it keeps the plain division (no extra tensor per call)."""
    if t.device.type == "cpu":
        return t / divisor
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


# --- qparams ------------------------------------------------------------------------------


def _symmetric_qparams(amax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric scale (and the fixed midpoint zero point of an unsigned dtype) from ``amax >= 0``."""
    qmin, qmax = spec.qmin, spec.qmax
    if spec.dtype.is_signed:
        scale = torch.clamp(_div(amax, min(qmax, -qmin)), min=spec.eps)
        return scale.to(spec.scale_dtype), None
    mid = (qmin + qmax + 1) // 2
    scale = torch.clamp(_div(amax, min(qmax - mid, mid - qmin)), min=spec.eps)
    return scale.to(spec.scale_dtype), torch.full_like(scale, mid, dtype=spec.zero_point_dtype)


def choose_qparams_affine_from_min_max(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from per-block minimum and maximum (observers use this).

    Args:
        min_val: per-block minimum, any float dtype (computed in float32).
        max_val: per-block maximum, same shape.
        spec: an integer ``QuantSpec``.

    Returns:
        ``(scale, zero_point)``: scale in ``spec.scale_dtype``; zero point in
        ``spec.zero_point_dtype`` or ``None`` for a symmetric signed spec.

    Raises:
        ValueError: a float8 spec, or min/max of different shapes.
    """
    if spec.dtype.is_float:
        raise ValueError(f"spec.dtype={spec.dtype.name} is float8: use lowbit.primitives.float8")
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val {tuple(min_val.shape)} and max_val {tuple(max_val.shape)} differ in shape")
    qmin, qmax = spec.qmin, spec.qmax
    if spec.zero_point_domain == "float":  # the values' own range (see the module docstring)
        mn, mx = min_val.float(), max_val.float()
    else:
        mn = torch.clamp(min_val.float(), max=0.0)
        mx = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        return _symmetric_qparams(torch.maximum(-mn, mx), spec)
    scale = torch.clamp(_div(mx - mn, qmax - qmin), min=spec.eps).to(spec.scale_dtype)
    s = scale.float()
    if spec.zero_point_domain == "int":
        zp = torch.clamp(qmin - torch.round(mn / s), qmin, qmax)
    else:
        zp = qmin - mn / s
    return scale, zp.to(spec.zero_point_dtype)


def choose_qparams_affine(
    input: torch.Tensor, spec: QuantSpec, *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point for ``input`` under ``spec`` (blocks from ``spec.granularity``).

    Args:
        input: floating-point tensor of rank >= 1, any float dtype (math in float32).
        spec: an integer ``QuantSpec``.
        check_finite: raise on NaN/inf (eager only). Hot paths pass False; see module docs.

    Returns:
        ``(scale, zero_point)`` shaped ``input.shape[i] // block_size[i]``; ``zero_point`` is
        ``None`` for symmetric signed specs.

    Raises:
        TypeError: non-floating input.
        ValueError: empty or 0-d input, NaN/inf in input, a granularity that does not divide
            the shape, a float8 spec.

    Example:
        >>> s, zp = choose_qparams_affine(torch.tensor([[-1.0, 2.0]]), QuantSpec("int8"))
        >>> s
        tensor([[0.0157]])
    """
    _check_float(input)
    if input.numel() == 0:
        raise ValueError(f"input is empty (shape {tuple(input.shape)}): no scale can be chosen from no values")
    if spec.dtype.is_float:
        raise ValueError(f"spec.dtype={spec.dtype.name} is float8: use lowbit.primitives.float8")
    block = spec.block_size(input.shape)
    if spec.symmetric:
        amax = _abs_max(input.detach(), block)
        if check_finite:
            _check_finite(amax)
        return _symmetric_qparams(amax, spec)
    mn, mx = _min_max(input.detach(), block)
    if check_finite:
        _check_finite(mn, mx)
    return choose_qparams_affine_from_min_max(mn, mx, spec)


# --- quantize / dequantize ----------------------------------------------------------------


def _quantize_to_float(x, scale, zero_point, spec: QuantSpec, rounding) -> tuple[torch.Tensor, tuple]:
    """Integer-valued float32 ``q`` in blocked layout; shared by quantize and fake quantize.

    Without autograd (``rounding is torch.round``) the math runs in place on one private float32
    copy of ``x``: large CPU temporaries are fresh pages each time, and a chain of out-of-place
    ops measured ~25x slower than this for a (256, 4096) activation. Same ops, same values.
    """
    block = _block_from_scale(x.shape, scale)
    shape = _blocked_shape(x.shape, block)
    s = _expand(scale.float())
    zp = None if zero_point is None else _expand(zero_point.float())
    if rounding is torch.round:
        q = x.to(torch.float32, copy=True).reshape(shape).div_(s)
        if zp is None:
            q.round_()
        elif spec.zero_point_domain == "int":
            q.round_().add_(zp)
        else:
            q.add_(zp).round_()
        return q.clamp_(spec.qmin, spec.qmax), block
    xb = x.float().reshape(shape)
    if zp is None:
        q = rounding(xb / s)
    elif spec.zero_point_domain == "int":
        q = rounding(xb / s) + zp
    else:
        q = rounding(xb / s + zp)
    return torch.clamp(q, spec.qmin, spec.qmax), block


def _dequantize_from_float(q, scale, zero_point, inplace: bool = False) -> torch.Tensor:
    """``(q - zp) * s`` in float32; ``inplace`` updates ``q`` (a private buffer) in place."""
    s = _expand(scale.float())
    if not inplace:
        if zero_point is not None:
            q = q - _expand(zero_point.float())
        return q * s
    if zero_point is not None:
        q.sub_(_expand(zero_point.float()))
    return q.mul_(s)


def _check_qparams(spec: QuantSpec, zero_point) -> None:
    if spec.dtype.is_float:
        raise ValueError(f"spec.dtype={spec.dtype.name} is float8: use lowbit.primitives.float8")
    if spec.has_zero_point and zero_point is None:
        raise ValueError(f"zero_point is None but spec ({spec.dtype.name}, symmetric={spec.symmetric}) needs one")


def quantize_affine(
    input: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Quantize ``input`` to ``spec.dtype.storage`` (int8 or uint8) with the given qparams.

    Args:
        input: floating-point tensor of rank >= 1.
        scale: per-block scale, same rank as ``input``; blocks are ``input.shape // scale.shape``.
        zero_point: per-block zero point (same shape as ``scale``) or ``None`` (symmetric signed).
        spec: the ``QuantSpec`` that made the qparams (range, zero-point domain).

    Returns:
        ``clamp(round(input / scale) + zero_point, qmin, qmax)`` in the storage dtype, shape of input.

    Raises:
        TypeError: non-floating input. ValueError: mismatched scale shape, missing zero point.
    """
    _check_float(input)
    _check_qparams(spec, zero_point)
    q, _ = _quantize_to_float(input, scale, zero_point, spec, torch.round)
    return q.reshape(input.shape).to(spec.dtype.storage)


def dequantize_affine(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(qdata - zero_point) * scale`` computed in float32, cast once to ``output_dtype``.

    Args:
        qdata: integer tensor in ``spec.dtype.storage`` (unpacked).
        scale: per-block scale, same rank as ``qdata``.
        zero_point: per-block zero point or ``None``.
        spec: the ``QuantSpec`` of ``qdata``.
        output_dtype: the floating dtype of the result.

    Raises:
        TypeError: ``qdata`` not in the spec's storage dtype, or a non-floating ``output_dtype``.
    """
    _check_qparams(spec, zero_point)
    if qdata.dtype != spec.dtype.storage:
        raise TypeError(
            f"qdata has dtype {qdata.dtype} but spec dtype {spec.dtype.name} is stored as {spec.dtype.storage}"
        )
    if not output_dtype.is_floating_point:
        raise TypeError(f"output_dtype={output_dtype} must be a floating dtype")
    if qdata.dim() == 0:
        raise ValueError("qdata must have rank >= 1, got a 0-d tensor")
    return dequantize_blocks(qdata, scale, zero_point, output_dtype)


def dequantize_blocks(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dequantize_affine``'s arithmetic without a spec: ``(qdata - zero_point) * scale`` in float32,
    the blocks read from ``scale``'s shape, cast once to ``output_dtype``. For callers that hold the
    stored tensors but not their spec (the ``lowbit_cpu::`` ops' reference bodies); the values are
    ``dequantize_affine``'s bit for bit, without its checks of ``qdata`` against a spec.

    Raises:
        ValueError: ``scale``'s shape does not tile ``qdata``'s.
    """
    block = _block_from_scale(qdata.shape, scale)
    qb = qdata.reshape(_blocked_shape(qdata.shape, block)).to(torch.float32)  # a new buffer: int -> float
    return _dequantize_from_float(qb, scale, zero_point, inplace=True).reshape(qdata.shape).to(output_dtype)


def fake_quantize_affine(
    input: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(input))`` with the same float32 ops, in ``input.dtype``.

    Bit-for-bit equal to ``dequantize_affine(quantize_affine(x, s, zp, spec), s, zp, spec,
    x.dtype)``. Gradient: straight-through for the rounding, zero where the value was clipped
    to ``[qmin, qmax]``; none flows into qparams chosen here (they are computed from the
    detached input; pass your own ``scale`` and ``zero_point`` to learn them).

    Args:
        input: floating-point tensor of rank >= 1.
        spec: an integer ``QuantSpec``.
        scale, zero_point: qparams to use; both chosen from ``input`` when ``scale`` is None.
    """
    _check_float(input)
    if scale is None:
        scale, zero_point = choose_qparams_affine(input.detach(), spec)
    _check_qparams(spec, zero_point)
    q, _ = _quantize_to_float(input, scale, zero_point, spec, round_ste)
    return _dequantize_from_float(q, scale, zero_point).reshape(input.shape).to(input.dtype)
