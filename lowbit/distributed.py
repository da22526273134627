"""A whole-model lowbit checkpoint written rank by rank from an FSDP2-sharded model.

``save_sharded(model, directory)`` is called by every rank. The state keys are shared out by
size (largest first onto the least loaded rank); each tensor is gathered from its shards, one at
a time, and only its owner keeps it, so a rank holds its own share of whole tensors (about
``1 / world_size`` of the model) and never the whole model. Rank ``r`` writes
``model-{r+1:05d}-of-{W:05d}.safetensors``: ordinary lowbit files (``lowbit.serialization``),
so ``lowbit.serialization.read_state`` on the directory's files, or :func:`load_sharded`, gives
back the full model, equal bit for bit to converting the same weights in one process.

A sharded quantized weight (``lowbit.qat.distributed.quantize_sharded_weight``: a ``DTensor``
sharded on dim 0 whose local tensor is a ``QuantizedTensor``) is gathered part by part: parts
with one entry per row (codes, per-row or per-group scales) are concatenated in rank order,
parts that span all rows (a per-tensor scale) are the same on every rank and taken as they are.
A rowwise tensor-parallel weight (``[Shard(1)]``, ``lowbit.tensor_parallel``) is gathered along
in_features the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.algorithms.distributed import assign
from lowbit.serialization.codec import encode_config
from lowbit.serialization.files import apply_state, file_header, flatten_tensor, read_state
from lowbit.tensors.base import QuantizedTensor

__all__ = ["save_sharded", "load_sharded", "shard_file_names"]


def shard_file_names(world_size: int) -> list[str]:
    """The file names ``save_sharded`` writes for ``world_size`` ranks."""
    return [f"model-{r + 1:05d}-of-{world_size:05d}.safetensors" for r in range(world_size)]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("save_sharded needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group); one process saves with lowbit.save")
    return dist


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """``local`` (this rank's rows of a dim-0 shard) concatenated over ``group`` in rank order; each
    rank's part is padded to the largest for the gather (gloo gathers equal sizes)."""
    dist = _dist()
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, int(local.shape[0]), group=group)
    pad = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    pad[: local.shape[0]] = local
    raw = pad.reshape(pad.shape[0], -1).view(torch.uint8)  # bytes: exact, and gloo has no float8
    parts = [torch.empty_like(raw) for _ in sizes]
    dist.all_gather(parts, raw, group=group)
    return torch.cat([p.view(local.dtype).reshape(pad.shape)[:n] for p, n in zip(parts, sizes)])


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t`` (a DTensor is gathered; every rank gets it)."""
    if not _is_dtensor(t):
        return t
    local = t.to_local()
    if not isinstance(local, QuantizedTensor):
        return t.full_tensor()
    from torch.distributed.tensor import Shard

    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim == 1 and placements == (Shard(1),) and local.dim() == 2:
        return _full_columns(t, local, mesh)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(f"save_sharded gathers quantized weights sharded [Shard(0)] or [Shard(1)] (2-D) "
                                  f"on a 1-D mesh, got {list(placements)} on a {mesh.ndim}-D mesh")
    names, meta = local.__tensor_flatten__()
    # a part with one entry per local row (codes, per-row or per-group scales) is told from a part
    # spanning all rows (a per-tensor scale: one entry) by its length on the ranks holding != 1 row
    group = mesh.get_group()
    mine = [local.shape[0] != 1 and getattr(local, n).dim() > 0 and getattr(local, n).shape[0] == local.shape[0]
            for n in names]
    flags = [None] * mesh.size()
    _dist().all_gather_object(flags, mine, group=group)
    inner = {}
    for i, n in enumerate(names):
        by_row = any(f[i] for f in flags)
        inner[n] = _gather_rows(getattr(local, n), group) if by_row else getattr(local, n)
    return type(local).__tensor_unflatten__(inner, meta, t.shape, t.stride())


def _full_columns(t, local: QuantizedTensor, mesh) -> torch.Tensor:
    """A 2-D quantized weight sharded ``[Shard(1)]`` (tensor parallel, ``lowbit.tensor_parallel``)
    gathered: the codes and every qparam with more than one block along in_features (read from
    its spec on the global shape; ``act_pre_scale`` is per column) are concatenated along dim 1 in
    rank order; the rest (per-row or per-tensor scales, static activation qparams) were kept whole
    on every rank and are taken as they are."""
    names, meta = local.__tensor_flatten__()
    group = mesh.get_group()
    blocks = local.spec.block_size(tuple(t.shape))
    inner = {}
    for n in names:
        part = getattr(local, n)
        if n == "qdata" or n == "act_pre_scale" or (n in local.qparam_names and t.shape[1] // blocks[1] > 1):
            inner[n] = _gather_rows(part.t().contiguous(), group).t().contiguous()
        else:
            inner[n] = part
    return type(local).__tensor_unflatten__(inner, meta, t.shape, t.stride())


def _nbytes(t: torch.Tensor) -> float:
    local = t.to_local() if _is_dtensor(t) else t
    if isinstance(local, QuantizedTensor):
        names, _ = local.__tensor_flatten__()  # scaled by the share of elements held (rows or columns)
        return sum(getattr(local, n).nbytes for n in names) * t.numel() / max(local.numel(), 1)
    return float(t.numel() * t.element_size())


@torch.no_grad()
def save_sharded(model: nn.Module, directory: str | Path, group=None) -> Path:
    """Write ``model``'s whole state as a lowbit checkpoint of one file per rank; every rank calls it.

    Args:
        model: an FSDP2 model (DTensor parameters, float or sharded quantized) or a plain one.
        directory: where the files go (created; the same path on every rank, e.g. a shared disk).
        group: the ranks that write; None: the default group.

    Returns:
        The path of the file this rank wrote.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        NotImplementedError: a quantized weight sharded other than ``[Shard(0)]`` (FSDP2, colwise) or
            ``[Shard(1)]`` (rowwise tensor parallel) on a 1-D mesh.
        ValueError: a quantized tensor the loader would refuse (``lowbit.serialization.flatten_tensor``).

    Example:
        >>> quantize_(model, QATConfig(base, step="convert"))   # sharded quantized weights
        >>> save_sharded(model, "ckpt")                          # every rank
        >>> load_sharded(fresh_model, "ckpt")                    # later, one process
    """
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    first: dict[int, str] = {}  # tied keys: one stored tensor, the others aliases (same on every rank)
    keys = []
    for key, t in state.items():
        if id(t) in first:
            continue
        first[id(t)] = key
        keys.append(key)
    owner = dict(zip(keys, assign([_nbytes(state[k]) for k in keys], world)))
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for key in keys:
        full = _full(state[key])  # a collective for a DTensor: every rank, in the same order
        if owner[key] == rank:
            plain, entry = flatten_tensor(key, full)
            tensors.update(plain)
            if entry is not None:
                entries[key] = entry
        del full
    for key, t in state.items():
        target = first[id(t)]
        if target != key and owner[target] == rank:
            entries[key] = {"alias": target}
    modules = {}
    for fqn, m in model.named_modules():
        weight = state.get(f"{fqn}.weight" if fqn else "weight")
        if hasattr(m, "lowbit_config") and weight is not None and owner[first[id(weight)]] == rank:
            modules[fqn] = encode_config(m.lowbit_config)  # beside its weight
    path = directory / shard_file_names(world)[rank]
    save_file(tensors, str(path), metadata=file_header(entries, modules))
    dist.barrier(group=group)  # every file exists when any rank returns
    return path


def load_sharded(model: nn.Module, directory: str | Path, *, device: str | torch.device = "cpu",
                 strict: bool = True) -> nn.Module:
    """Load every ``model-*-of-*.safetensors`` file of ``directory`` into ``model`` (one process), in place.

    Raises:
        FileNotFoundError: no such files.
        ValueError: as ``lowbit.serialization.load`` (``CheckpointError``).
    """
    paths = sorted(Path(directory).glob("model-*-of-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no model-*-of-*.safetensors files in {directory}")
    state, configs = read_state(paths, device=device)
    return apply_state(model, state, configs, strict=strict, where=directory)
