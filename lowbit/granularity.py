"""Granularities: which elements share one scale, and `block_size`, their single encoding.

One axis convention holds everywhere: a granularity names the axes that KEEP their own scale
(one scale per row, per token, per index along ``axis``); the other axes are reduced over.
Every granularity becomes a ``block_size`` tuple of the tensor's rank: the elements of one
block share one scale, and the scale tensor has shape ``shape[i] // block_size[i]``
(same rank as the input, so it broadcasts after a reshape).

For a tensor of shape ``(d0, ..., d{n-1})`` (a linear weight is ``(out, in)`` = ``(N, K)``,
an activation is ``(..., tokens, K)``):

=====================  ==================================  ===================================
granularity            block_size                          scale shape
=====================  ==================================  ===================================
``PerTensor()``        ``(d0, ..., d{n-1})``               ``(1, ..., 1)``
``PerAxis(axis=a)``    ``d_i`` everywhere, ``1`` at ``a``  ``1`` everywhere, ``d_a`` at ``a``
``PerRow()``           ``(1, ..., 1, d{n-1})``             ``(d0, ..., d{n-2}, 1)``
``PerToken()``         ``(1, ..., 1, d{n-1})``             ``(d0, ..., d{n-2}, 1)``
``PerGroup(g)``        ``(1, ..., 1, g)``                  ``(d0, ..., d{n-2}, d{n-1} // g)``
``PerBlock((b, c))``   ``(1, ..., 1, b, c)``               ``(..., d{n-2} // b, d{n-1} // c)``
=====================  ==================================  ===================================

``PerRow`` (weights: one scale per output channel) and ``PerToken`` (activations: one scale
per token) have the same layout; they are two names so that configs read naturally. For a 2-D
tensor ``PerAxis(0)`` equals ``PerRow()``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Granularity",
    "PerTensor",
    "PerAxis",
    "PerRow",
    "PerToken",
    "PerGroup",
    "PerBlock",
    "block_size",
]


class Granularity:
    """Base class of the granularities (frozen dataclasses below)."""


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One scale per index along ``axis`` (negative axes count from the end)."""

    axis: int

    def __post_init__(self):
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"PerAxis(axis={self.axis!r}): axis must be an int")


@dataclass(frozen=True)
class PerRow(Granularity):
    """One scale per row: reduce over the last axis only (weights: per output channel)."""


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per token: reduce over the last axis only (activations)."""


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements of the last axis."""

    group_size: int

    def __post_init__(self):
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"PerGroup(group_size={self.group_size!r}): group_size must be a positive int")


@dataclass(frozen=True)
class PerBlock(Granularity):
    """One scale per block of shape ``block`` over the trailing axes (leading axes: blocks of 1)."""

    block: tuple[int, ...]

    def __post_init__(self):
        block = tuple(self.block) if isinstance(self.block, (list, tuple)) else None
        if not block or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in block):
            raise ValueError(f"PerBlock(block={self.block!r}): block must be a non-empty tuple of positive ints")
        object.__setattr__(self, "block", block)


def block_size(granularity: Granularity, shape) -> tuple[int, ...]:
    """The block size that ``granularity`` gives a tensor of ``shape`` (see the module table).

    Args:
        granularity: one of the granularities of this module.
        shape: the tensor's shape (``torch.Size`` or a sequence of ints), rank >= 1.

    Returns:
        A tuple of ``len(shape)`` ints, each dividing the matching dimension.

    Raises:
        ValueError: rank 0, an axis out of range, a group or block that does not divide the shape,
            or a block of higher rank than the tensor.
        TypeError: ``granularity`` is not a granularity.

    Example:
        >>> block_size(PerGroup(32), (4096, 4096))
        (1, 32)
    """
    shape = tuple(int(s) for s in shape)
    rank = len(shape)
    if rank == 0:
        raise ValueError("shape=() : quantization needs a tensor of rank >= 1")
    if isinstance(granularity, PerTensor):
        return shape
    if isinstance(granularity, PerAxis):
        axis = granularity.axis
        if not -rank <= axis < rank:
            raise ValueError(f"PerAxis(axis={axis}) is out of range for shape {shape} (rank {rank})")
        out = list(shape)
        out[axis % rank] = 1
        return tuple(out)
    if isinstance(granularity, (PerRow, PerToken)):
        return (1,) * (rank - 1) + (shape[-1],)
    if isinstance(granularity, PerGroup):
        g = granularity.group_size
        if shape[-1] % g:
            raise ValueError(
                f"PerGroup(group_size={g}) does not divide the last dimension of shape {shape} "
                f"({shape[-1]} % {g} = {shape[-1] % g}); choose a group_size that divides {shape[-1]}"
            )
        return (1,) * (rank - 1) + (g,)
    if isinstance(granularity, PerBlock):
        block = granularity.block
        if len(block) > rank:
            raise ValueError(f"PerBlock(block={block}) has rank {len(block)} > the tensor's rank {rank} (shape {shape})")
        full = (1,) * (rank - len(block)) + block
        bad = [(d, b) for d, b in zip(shape, full) if d % b]
        if bad:
            raise ValueError(f"PerBlock(block={block}) does not divide shape {shape}: {bad} as (dim, block)")
        return full
    raise TypeError(
        f"granularity={granularity!r} is not a Granularity; allowed: PerTensor(), PerAxis(axis), "
        "PerRow(), PerToken(), PerGroup(group_size), PerBlock(block)"
    )
