"""Tensor parallelism for quantized linears: torch's ``parallelize_module`` plans on lowbit weights.

``torch.distributed.tensor.parallel`` shards a linear's weight with ``distribute_tensor``, which
splits and scatters plain tensors; a quantized weight is a packed tensor plus qparams that must be
split together. :func:`parallelize_quantized` therefore shards every quantized weight a plan names
itself (:func:`shard_quantized`: this rank's rows for ``ColwiseParallel``, its group-aligned
columns for ``RowwiseParallel``, each qparam sliced with its block; per-tensor scales and static
activation scales replicated), wraps the local part as a ``DTensor`` with the plan's placement and
then calls ``parallelize_module`` with the plan unchanged (an already distributed weight passes
through it). No weight bytes travel between ranks.

The matmul runs on the local quantized tensor: each such linear's ``forward`` takes the input the
plan's hooks made (replicated for colwise, sharded on the last dim for rowwise), runs the lowbit
``F.linear`` on the local parts and returns a ``DTensor``: ``Shard(-1)`` for colwise, the
all-reduced sum of the partial products (then the bias) for rowwise. The plan's output hooks
then do what they do for a float model.

Numerics: every linear equals one process up to the order of the final sum. A colwise linear
sees the whole input. A rowwise linear that quantizes its activations dynamically (W8A8, 8da4w,
float8 dynamic) would scale each token over its own shard of in_features; instead each token's
min and max are all-reduced (two floats per token), its slice is fake-quantized with the
qparams of the whole row by the same primitive and the weight-only op runs, as the kernels'
reference does (measured against one process in tests/distributed/test_tensor_parallel.py).
The integer W8A8 GEMM is then replaced, on rowwise layers only, by that float reference.

:func:`load_tensor_parallel` loads a whole lowbit checkpoint into a float model with each rank
reading only its slices of the plan's quantized weights, then parallelizes it;
``lowbit.distributed.save_sharded`` writes a tensor-parallel model back as a whole checkpoint.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.tensors.base import QuantizedTensor

__all__ = ["shard_bounds", "allowed_shard_counts", "shard_quantized", "parallelize_quantized", "load_tensor_parallel"]


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``Shard``'s range ``[start, stop)`` of ``size`` for ``rank`` of ``world`` (torch.chunk's split:
    ``ceil(size / world)`` each, the last ones short or empty)."""
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _block(weight: QuantizedTensor, dim: int) -> int:
    """Elements along ``dim`` that must stay on one rank: the qparams' blocks and the packing."""
    shapes = {n: tuple(getattr(weight, n).shape) for n in weight.qparam_names if getattr(weight, n) is not None}
    return _block_of(type(weight), tuple(weight.shape), shapes, dim)


def _block_of(cls, shape: tuple, part_shapes: dict, dim: int) -> int:
    """``_block`` from a class, its logical shape and its blocked qparams' shapes."""
    block = cls.pack if dim == len(shape) - 1 else 1
    for n, s in part_shapes.items():
        if n in cls.qparam_names and len(s) == len(shape) and s[dim] != 1:
            block = math.lcm(block, shape[dim] // s[dim])
    return block


def _aligned(size: int, world: int, block: int) -> bool:
    bounds = [shard_bounds(size, r, world) for r in range(world)]
    return all(stop > start and start % block == 0 and (stop % block == 0 or stop == size) for start, stop in bounds)


def allowed_shard_counts(weight: QuantizedTensor, dim: int) -> list[int]:
    """The world sizes (1 .. number of blocks) whose ``Shard(dim)`` split of ``weight`` gives every
    rank a non-empty range starting and ending on block boundaries."""
    size, block = weight.shape[dim], _block(weight, dim)
    return [w for w in range(1, size // block + 1) if _aligned(size, w, block)]


def shard_quantized(weight: QuantizedTensor, mesh, dim: int, *, name: str = "weight"):
    """This rank's part of ``weight`` on ``dim`` (0: output rows, 1: input columns) as a ``DTensor``.

    Every qparam is sliced with its block (``lowbit.tensors.layout_ops``); one that spans the dim
    (a per-tensor scale, a per-row scale under a column split, static activation scales) is kept
    whole on every rank. Nothing is communicated.

    Args:
        weight: a 2-D quantized weight, the same on every rank (or a ``DTensor`` already placed
            ``[Shard(dim)]`` on ``mesh``, returned as it is).
        mesh: a 1-D ``DeviceMesh``.
        dim: 0 (colwise) or 1 (rowwise).
        name: the layer, for messages.

    Returns:
        A ``DTensor`` of ``weight``'s global shape whose local tensor is a quantized tensor.

    Raises:
        ValueError: ``dim`` not 0 or 1, a mesh that is not 1-D, or a split that would cut a
            quantization group or packed byte (the message names the layer and the shard counts
            that divide it).
    """
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(dim),):
            raise ValueError(f"{name}: already distributed as {list(weight.placements)}, the plan wants [Shard({dim})]")
        return weight
    if dim not in (0, 1) or weight.dim() != 2:
        raise ValueError(f"{name}: shard_quantized splits a 2-D weight on dim 0 or 1, got dim={dim}, shape "
                         f"{tuple(weight.shape)}")
    if mesh.ndim != 1:
        raise ValueError(f"{name}: tensor parallel needs a 1-D mesh, got {mesh.ndim}-D")
    world, rank = mesh.size(), mesh.get_local_rank()
    _check_split(name, type(weight).__name__, weight.shape[dim], world, _block(weight, dim), dim)
    start, stop = shard_bounds(weight.shape[dim], rank, world)
    local = weight.narrow(dim, start, stop - start)
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=weight.shape, stride=weight.stride())


def _check_split(name: str, cls: str, size: int, world: int, block: int, dim: int) -> None:
    if not _aligned(size, world, block):
        kind = "rowwise (Shard(1), in_features)" if dim == 1 else "colwise (Shard(0), out_features)"
        allowed = [w for w in range(1, size // block + 1) if _aligned(size, w, block)]
        raise ValueError(
            f"{name}: {kind} split of {size} over {world} ranks cuts a quantization block of {block} "
            f"({cls}); allowed shard counts for this layer: {allowed}. Keep the layer out of the plan "
            f"(replicated) or quantize it with a block that divides the split"
        )


def _as(x, mesh, placement):
    """``x`` (a DTensor, or a plain tensor holding the whole value) as this rank's local part of ``placement``."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(x, DTensor):
        return x.redistribute(mesh, [placement]).to_local()
    if placement == Replicate():
        return x
    start, stop = shard_bounds(x.shape[-1], mesh.get_local_rank(), mesh.size())
    return x[..., start:stop]


class _TensorParallelQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a ``DTensor`` of a quantized tensor (made by
    :func:`parallelize_quantized` by switching the class; parameters and hooks stay)."""

    def forward(self, input):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        w = self.weight
        mesh, placement = w.device_mesh, w.placements[0]
        bias = self.bias.to_local() if isinstance(self.bias, DTensor) else self.bias
        if placement == Shard(0):  # colwise: whole input, this rank's output features
            y = F.linear(_as(input, mesh, Replicate()), w.to_local(), bias)
            return DTensor.from_local(y, mesh, [Shard(y.dim() - 1)], run_check=False)
        # rowwise: this rank's input features, a partial product summed over the ranks, then the bias
        x, local = _as(input, mesh, Shard(input.dim() - 1)), w.to_local()
        dtype = x.dtype
        if _dynamic_act(local):
            x, local = _fake_quantize_shard(x, local, mesh)
        y = F.linear(x, local, None).to(dtype)
        y = DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
        if bias is not None:
            y = DTensor.from_local(y.to_local() + bias, mesh, [Replicate()], run_check=False)
        return y


def _dynamic_act(weight: QuantizedTensor) -> bool:
    return getattr(weight, "act_spec", None) is not None and getattr(weight, "act_scale", None) is None


def _fake_quantize_shard(x: torch.Tensor, weight: QuantizedTensor, mesh):
    """``x`` (this rank's columns of the input) fake-quantized with the activation qparams of the
    whole input, and ``weight`` without its activation spec: the qparams come from each token's
    (or the tensor's) min and max all-reduced over the ranks, handed to the same primitive as a
    two-column tensor (a min/max rule sees only those), so every rank's slice equals the same slice
    of one process's fake-quantized input; the weight-only op then runs (as the reference does)."""
    import torch.distributed as dist

    from lowbit.primitives.affine import choose_qparams_affine, fake_quantize_affine
    from lowbit.primitives.float8 import choose_qparams_float8, fake_quantize_float8

    spec = weight.act_spec
    shape = x.shape
    if getattr(weight, "act_pre_scale", None) is not None:  # SmoothQuant's 1 / s before quantizing
        x = x.float() * weight.act_pre_scale  # in float32, as one process does; the caller casts back
        weight = weight._replace(act_pre_scale=None, dtype=torch.float32)
    x2 = x.reshape(-1, shape[-1])
    mn, mx = x2.detach().amin(-1, keepdim=True), x2.detach().amax(-1, keepdim=True)
    group = mesh.get_group()
    dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    pair = torch.cat([mn, mx], dim=-1)
    if spec.dtype.is_float:
        xq = fake_quantize_float8(x2, spec, choose_qparams_float8(pair, spec, check_finite=False))
    else:
        s, zp = choose_qparams_affine(pair, spec, check_finite=False)
        xq = fake_quantize_affine(x2, spec, s, zp)
    xq = xq.reshape(shape).to(weight.dtype)
    return xq, weight._replace(act_spec=None)


def _matches(fqn: str, pattern: str) -> bool:
    """``parallelize_module``'s rule: as many dotted atoms, each matched by ``fnmatch``."""
    atoms, keys = fqn.split("."), pattern.split(".")
    return len(atoms) == len(keys) and all(fnmatch.fnmatch(a, k) for a, k in zip(atoms, keys))


def parallelize_quantized(module: nn.Module, mesh, plan: dict) -> nn.Module:
    """``torch.distributed.tensor.parallel.parallelize_module(module, mesh, plan)`` for a model with
    lowbit quantized linears; every rank calls it with the same model and plan.

    Each ``nn.Linear`` with a quantized weight that ``plan`` puts under ``ColwiseParallel`` (or a
    subclass) is sharded on dim 0, under ``RowwiseParallel`` on dim 1 (:func:`shard_quantized`),
    and runs its matmul on its local part (see the module docstring); then ``parallelize_module``
    applies the plan unchanged (float weights, biases, embeddings, input/output hooks).

    Args:
        module: the model (quantized the same way on every rank).
        mesh: a 1-D ``DeviceMesh``.
        plan: ``{fqn pattern: ParallelStyle}`` as for ``parallelize_module``.

    Returns:
        ``module``, in place.

    Raises:
        ValueError: a quantized layer whose split would cut a quantization block (names the layer
            and the allowed shard counts); a quantized weight under another style.
        NotImplementedError: a quantized weight in a subclass of ``nn.Linear`` (its own forward).

    Example:
        >>> quantize_(model, Int4WeightOnlyConfig(group_size=32))
        >>> mesh = init_device_mesh("cpu", (2,))
        >>> parallelize_quantized(model, mesh, {"layers.*.mlp.up_proj": ColwiseParallel(), ...})
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for fqn, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        weight = m.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        if not isinstance(local, QuantizedTensor):
            continue
        styles = [style for pattern, style in plan.items() if _matches(fqn, pattern)]
        if not styles:
            continue
        style = styles[0]
        if isinstance(style, ColwiseParallel):
            dim = 0
        elif isinstance(style, RowwiseParallel):
            dim = 1
        else:
            raise ValueError(f"{fqn}: a quantized weight takes ColwiseParallel or RowwiseParallel, got "
                             f"{type(style).__name__}")
        if type(m) not in (nn.Linear, _TensorParallelQuantizedLinear):
            raise NotImplementedError(f"{fqn}: tensor parallel runs quantized weights in a plain nn.Linear, got "
                                      f"{type(m).__name__} (its own forward would see the sharded weight)")
        m.weight = nn.Parameter(shard_quantized(weight, mesh, dim, name=fqn), requires_grad=False)
        m.__class__ = _TensorParallelQuantizedLinear
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(module, mesh, plan)


def _plan_dims(model: nn.Module, plan: dict) -> dict[str, int]:
    """``{weight key: shard dim}`` for each linear the plan puts under Colwise (0) / Rowwise (1)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    dims = {}
    for fqn, m in model.named_modules():
        styles = [st for pattern, st in plan.items() if _matches(fqn, pattern)]
        if isinstance(m, nn.Linear) and styles and isinstance(styles[0], (ColwiseParallel, RowwiseParallel)):
            dims[f"{fqn}.weight"] = 0 if isinstance(styles[0], ColwiseParallel) else 1
    return dims


@torch.no_grad()
def load_tensor_parallel(model: nn.Module, paths, mesh, plan: dict, *, device="cpu") -> nn.Module:
    """Load a whole lowbit checkpoint into ``model`` and parallelize it with ``plan``; every rank calls it.

    Each quantized weight that ``plan`` shards is read by slices (safetensors' ``get_slice``): a
    rank reads only its rows (colwise) or its group-aligned columns (rowwise) of the codes and of
    every blocked qparam, and whole the qparams that span the dim (per-tensor and static
    activation scales). Other tensors (float weights, biases, embeddings, norms) are read whole,
    and ``parallelize_module`` shards the float ones as it does for any model. The checkpoint is
    checked as ``lowbit.load`` checks it; the values of each slice are checked once read.

    Args:
        model: the float (or ``meta``) model the checkpoint was saved from, unparallelized.
        paths: a file written by ``lowbit.save``, or a list of the files of one checkpoint.
        mesh: a 1-D ``DeviceMesh``.
        plan: ``{fqn pattern: ParallelStyle}`` as for :func:`parallelize_quantized`.
        device: where the tensors are read to.

    Returns:
        ``model``, loaded and parallelized in place.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a checkpoint ``lowbit.load`` refuses (``CheckpointError``), or a split through
            a quantization block (names the layer and the allowed shard counts).
    """
    import dataclasses
    from pathlib import Path

    from torch.distributed.tensor import DTensor, Shard

    from lowbit.serialization.files import _check_files, _check_static_qparams, _open, apply_state
    from lowbit.serialization.schema import build_tensor, check_values

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    checked = _check_files(paths)
    dims = _plan_dims(model, plan)
    world, rank = mesh.size(), mesh.get_local_rank()
    plain, parts, shapes = {}, {}, {}
    for i, f in enumerate(checked.files):
        with _open(f.path, str(device)) as sf:
            for k, fi in checked.plain.items():
                if fi == i:
                    plain[k] = sf.get_tensor(k)
            for k, (fi, entry) in checked.entries.items():
                if fi != i:
                    continue
                if k not in dims:
                    parts[k] = {p: sf.get_tensor(f"{k}:{p}") for p in entry.parts}
                    continue
                d, shape = dims[k], tuple(entry.shape)
                stored = {p: f.stored[f"{k}:{p}"][1] for p in entry.parts}
                _check_split(k.removesuffix(".weight"), entry.cls.__name__, shape[d], world,
                             _block_of(entry.cls, shape, stored, d), d)
                start, stop = shard_bounds(shape[d], rank, world)
                parts[k] = {}
                for p, s in stored.items():
                    sl = sf.get_slice(f"{k}:{p}")
                    if len(s) != len(shape) or (s[d] == 1 and shape[d] != 1):  # spans the dim: whole
                        parts[k][p] = sl[:]
                        continue
                    f_ = shape[d] // s[d]  # logical elements per stored element on d (packing, blocks)
                    index = [slice(None)] * len(s)
                    index[d] = slice(start // f_, -(-stop // f_))
                    parts[k][p] = sl[tuple(index)]
                local = list(shape)
                local[d] = stop - start
                shapes[k] = (local, d)
    state = dict(plain)
    for k, (fi, entry) in checked.entries.items():
        check_values(entry, parts[k], checked.files[fi].path)
    _check_static_qparams(checked, parts)
    for k, (_, entry) in checked.entries.items():
        if k in shapes:
            local, d = shapes[k]
            t = build_tensor(dataclasses.replace(entry, shape=tuple(local)), parts.pop(k))
            full = torch.empty(entry.shape, device="meta")
            state[k] = DTensor.from_local(t, mesh, [Shard(d)], run_check=False, shape=full.shape, stride=full.stride())
        else:
            state[k] = build_tensor(entry, parts.pop(k))
    for k, target in checked.aliases.items():
        state[k] = state[target]
    apply_state(model, state, checked.configs, where=paths[0] if len(paths) == 1 else paths[0].parent)
    return parallelize_quantized(model, mesh, plan)
