"""QAT under FSDP2 (``torch.distributed.fsdp.fully_shard``): converting a sharded prepared model.

Training needs nothing from lowbit: FSDP2 all-gathers each block's parameters before its forward,
so a ``FakeQuantizedLinear`` fake-quantizes the whole (unsharded) weight with the same scales
one process computes, and feeding every rank the same batch makes the averaged gradient the
single-process gradient exactly (``(g + g) / 2 == g``): the fake-quantized weights then equal
the 1-process run bit for bit after every AdamW step (tests/distributed/test_qat_fsdp.py).

Converting is where the shards matter. :func:`quantize_sharded_weight` turns one FSDP2 weight (a
``DTensor`` sharded on dim 0 of a 1-D mesh) into a ``DTensor`` whose local tensor is this rank's
rows of the quantized weight, equal bit for bit to the same rows of the single-process result:

* blocks within a row (per-row, per-group along in_features) with a row-local scale rule
  (``"minmax"``, ``"float8_then_int4"``): the local rows are quantized alone (a shard boundary
  never cuts a block), nothing is communicated;
* anything else (per-tensor scales, HQQ's tensor-wide stopping rule): the layer's weight is
  gathered, quantized whole and sliced to the local rows (one layer at a time, freed at once).

``QATConfig(step="convert")``'s handler calls it for a sharded weight, and :func:`convert_sharded`
runs that handler on every prepared module. (``quantize_`` itself reaches the handler once its
size report, ``lowbit.quantize.plan.state_bytes``, counts a DTensor by its local shard; until
then it raises on an FSDP2 model before changing anything, and ``convert_sharded`` is the way.)
A whole-model checkpoint is written rank by rank with ``lowbit.distributed.save_sharded``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.configs import QuantConfig
from lowbit.configs.base import get_handler, swap_weight

__all__ = ["is_sharded", "quantize_sharded_weight", "convert_sharded", "ROW_LOCAL_RULES"]

# scale rules whose qparams for a row depend on that row alone
ROW_LOCAL_RULES = ("minmax", "float8_then_int4")


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``torch.distributed`` ``DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """``Shard(0)``'s rows of rank ``rank``: torch.chunk's split (ceil(n / world) each, the last short)."""
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def _row_local(config: QuantConfig, shape) -> bool:
    try:
        spec = config.weight_spec()
    except NotImplementedError:
        return False
    rule = getattr(config, "scale_rule", "minmax")
    return spec.block_size(tuple(shape))[0] == 1 and rule in ROW_LOCAL_RULES


def _quantize_plain(weight: torch.Tensor, config: QuantConfig, fqn: str):
    """``config``'s handler run on a bare linear holding ``weight``; returns the quantized tensor."""
    holder = nn.Linear(1, 1, bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    get_handler(config)(holder, config, fqn)
    return holder.weight


@torch.no_grad()
def quantize_sharded_weight(module: nn.Module, config: QuantConfig, fqn: str = "") -> None:
    """Replace ``module.weight`` (a ``DTensor`` sharded on dim 0) with the sharded quantized weight.

    Args:
        module: a float linear whose weight FSDP2 sharded (``[Shard(0)]`` on a 1-D mesh).
        config: the PTQ config (``for_weight`` already applied to the global shape).
        fqn: the module's name, for messages.

    Raises:
        NotImplementedError: another placement or mesh (tensor parallel, HSDP), or a local shard
            that is not ``torch.chunk``'s.
    """
    from torch.distributed.tensor import DTensor, Shard

    w = module.weight
    mesh, placements = w.device_mesh, tuple(w.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(f"{fqn!r}: sharded QAT convert supports FSDP2's [Shard(0)] on a 1-D mesh, got "
                                  f"{list(placements)} on a {mesh.ndim}-D mesh")
    local = w.to_local()
    n = w.shape[0]
    start, stop = _rows(n, mesh.get_local_rank(), mesh.size())
    if stop - start != local.shape[0]:
        raise NotImplementedError(f"{fqn!r}: local shard has {local.shape[0]} rows, Shard(0) of {n} rows over "
                                  f"{mesh.size()} ranks gives {stop - start}")
    # the same choice on every rank (the other path is a collective): global shape and config only
    if _row_local(config, w.shape) and _rows(n, mesh.size() - 1, mesh.size())[1] > _rows(n, mesh.size() - 1, mesh.size())[0]:
        q = _quantize_plain(local, config, fqn)
    else:  # qparams span rows: quantize the whole layer, keep this rank's rows
        q = _quantize_plain(w.full_tensor(), config, fqn)[start:stop]
    dq = DTensor.from_local(q, mesh, placements, run_check=False, shape=w.shape, stride=w.stride())
    swap_weight(module, dq, config)


def convert_sharded(model: nn.Module) -> nn.Module:
    """``QATConfig(base, step="convert")`` applied to every prepared module of an FSDP2 model, each
    with the config it was prepared for, in place; every rank must call it (some weights are
    gathered). Sharded weights become sharded quantized tensors (:func:`quantize_sharded_weight`),
    unsharded ones are converted as ``quantize_`` would.

    Returns:
        ``model``.

    Raises:
        ValueError: no module of ``model`` was prepared for QAT.
    """
    from lowbit.qat.config import QATConfig  # config.py imports this module
    from lowbit.qat.modules import _FakeQuantized

    prepared = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, _FakeQuantized)]
    if not prepared:
        raise ValueError("convert_sharded found no module prepared for QAT (QATConfig(base, step='prepare'))")
    for fqn, m in prepared:
        config = QATConfig(m.qat_config, step="convert")
        get_handler(config)(m, config, fqn)
    return model
