"""Calibration across ranks: ``sync_observers`` merges every observer's range over a process group.

Each rank runs ``prepare``, feeds its own slice of the calibration data, calls
``sync_observers(model)`` and then ``convert``. A ``MinMaxObserver``'s range is a minimum and a
maximum over batches, so an all-reduce of ``min_val`` (MIN) and ``max_val`` (MAX) gives exactly
the range one process records on the union of the slices, and the static scales (and
SmoothQuant's per-channel ranges, which are per-axis min/max observers) are bit-identical to
that run. ``num_batches`` becomes the sum over ranks.

The other observers are refused rather than approximated: a moving average depends on the
order of the batches (the union has no order), and ``PercentileObserver``'s running weighted
mean of per-batch percentiles equals a merge of per-rank means only up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.observers import MinMaxObserver, ObserverBase

__all__ = ["sync_observers"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_observers needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group); a single process has nothing to sync")
    return dist


@torch.no_grad()
def sync_observers(model: nn.Module, group=None) -> int:
    """All-reduce every observer's range in ``model`` across the ranks of ``group``, in place.

    Every rank must call it with the same model structure (observers are matched by name). An
    observer that saw no batch on some ranks takes the range of the ranks that did; one that saw
    none anywhere stays empty (``convert`` then handles it per ``config.missing``).

    Args:
        model: a model after ``lowbit.static.prepare`` and the local calibration batches.
        group: the ``torch.distributed`` process group; None: the default (world) group.

    Returns:
        The number of observers synchronized.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        TypeError: an observer other than ``MinMaxObserver`` (moving-average and percentile
            ranges are not a min/max over the data; the message names the observer).
        ValueError: the ranks disagree on the observers' names, or an observer's range has
            different shapes on different ranks.

    Example:
        >>> prepare(model, StaticQuantConfig("int8"))
        >>> for batch in my_slice: model(batch)
        >>> sync_observers(model)
        >>> convert(model)  # the same scales on every rank, equal to one process on all slices
    """
    dist = _dist()
    observers = [(name, m) for name, m in model.named_modules() if isinstance(m, ObserverBase)]
    for name, m in observers:
        if type(m) is not MinMaxObserver:
            raise TypeError(
                f"sync_observers: observer {name!r} is a {type(m).__name__}; only MinMaxObserver ranges "
                "(a min and a max over the data) merge exactly across ranks; calibrate with observer='minmax'"
            )
    mine = [(name, tuple(m.min_val.shape) if m.has_data else None) for name, m in observers]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    names = [n for n, _ in mine]
    for rank, theirs in enumerate(everyone):
        if [n for n, _ in theirs] != names:
            raise ValueError(f"sync_observers: rank {rank} has other observers than this rank "
                             f"({len(theirs)} vs {len(names)}); every rank must prepare the same model")
    todo, mins, maxs = [], [], []
    for i, (name, m) in enumerate(observers):
        shapes = {theirs[i][1] for theirs in everyone} - {None}
        if not shapes:
            continue  # no rank saw data: stays empty
        if len(shapes) > 1:
            raise ValueError(f"sync_observers: observer {name!r} has range shapes {sorted(shapes)} on different ranks")
        shape = shapes.pop()
        if m.has_data:
            mins.append(m.min_val.reshape(-1))
            maxs.append(m.max_val.reshape(-1))
        else:  # the neutral elements of MIN and MAX
            mins.append(torch.full(shape, float("inf"), device=m.num_batches.device).reshape(-1))
            maxs.append(torch.full(shape, float("-inf"), device=m.num_batches.device).reshape(-1))
        todo.append((m, shape))
    if not todo:
        return len(observers)
    # one flat tensor per reduction: MIN and MAX are exact whatever the order
    mn, mx = torch.cat(mins).float(), torch.cat(maxs).float()
    counts = torch.stack([m.num_batches for m, _ in todo])
    dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    at = 0
    for (m, shape), n in zip(todo, counts):
        size = torch.Size(shape).numel()
        m.min_val = mn[at:at + size].reshape(shape).clone()
        m.max_val = mx[at:at + size].reshape(shape).clone()
        m.num_batches.copy_(n)
        at += size
    return len(observers)
