"""Running a model one decoder block at a time on calibration data (GPTQ, later AWQ).

The blocks are the model's ``nn.ModuleList`` of layers (``model.model.layers`` in transformers'
Llama-style models, ``model.blocks`` in glassllm). The first block's inputs are captured once:
a pre-hook on it records its arguments and stops the forward. Each later block runs on the
previous block's outputs with the same other arguments (masks, rotary tables), so only one
block's activations are held at a time.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

__all__ = ["find_blocks", "make_batches", "forward_kwargs", "capture_block_inputs", "hidden_state", "run_block",
           "BlockInputs"]

# one calibration batch at the block boundary: (args, kwargs) of the block's call
BlockInputs = list[tuple[tuple, dict]]


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its name.

    Args:
        model: the model.
        blocks: the ``nn.ModuleList``'s name (``"model.layers"``); None to find it: the one
            ``nn.ModuleList`` holding ``nn.Linear`` modules that is not inside another such list.

    Raises:
        ValueError: ``blocks`` names no non-empty ``nn.ModuleList``; none or several candidates
            (the message lists what was looked for and found).
    """
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r} names no module of {type(model).__name__}") from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"blocks={blocks!r} is a {type(found).__name__}"
                             f"{' of length 0' if isinstance(found, nn.ModuleList) else ''}; it must be a non-empty "
                             "nn.ModuleList")
        return blocks, found
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) and _holds_linear(m)]
    top = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    if len(top) == 1:
        return top[0]
    if not top:
        raise ValueError(f"found no decoder blocks in {type(model).__name__}: looked for an nn.ModuleList holding "
                         "nn.Linear modules (e.g. model.model.layers in transformers, model.blocks in glassllm); pass "
                         "blocks='<name of the ModuleList>'")
    raise ValueError(f"{type(model).__name__} has several nn.ModuleLists holding linears: "
                     f"{[n for n, _ in top]}; pass blocks='<name>' to choose the decoder blocks")


def make_batches(calibration, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Calibration token batches on ``device``: a 2-D integer tensor split into ``batch_size`` rows
    each, or a sequence of 2-D integer tensors used as they are.

    Raises:
        TypeError / ValueError: anything else (naming the argument and what is allowed).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if isinstance(calibration, torch.Tensor):
        items = [calibration[i : i + batch_size] for i in range(0, calibration.shape[0], batch_size)] \
            if calibration.dim() == 2 else [calibration]
    elif isinstance(calibration, Sequence) and not isinstance(calibration, str):
        items = list(calibration)
    else:
        raise TypeError(f"calibration must be a 2-D integer tensor (samples, seq_len) or a list of them "
                        f"(see calibration_batches), got {type(calibration).__name__}")
    if not items:
        raise ValueError("calibration holds no samples")
    for i, b in enumerate(items):
        if not isinstance(b, torch.Tensor) or b.is_floating_point() or b.is_complex() or b.dim() != 2 \
                or b.numel() == 0:
            what = f"{b.dtype} tensor of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"calibration batch {i} must be a non-empty 2-D integer tensor (batch, seq_len), "
                             f"got {what}")
    return [b.to(device) for b in items]


def forward_kwargs(model: nn.Module) -> dict:
    """Extra arguments of every calibration forward: ``use_cache=False`` where the model takes it
    (a KV cache would be built, held and handed to every block)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


class _Stop(Exception):
    """Raised by the capture hook to end the forward at the first block."""


def capture_block_inputs(model: nn.Module, first: nn.Module, batches: list[torch.Tensor]) -> BlockInputs:
    """Run ``model`` on each batch up to ``first`` (the first block) and record the block's arguments.

    Raises:
        ValueError: a forward that never calls ``first``, or calls it without a hidden-state tensor.
    """
    captured: BlockInputs = []

    def hook(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    extra = forward_kwargs(model)
    try:
        for i, batch in enumerate(batches):
            try:
                model(batch, **extra)
            except _Stop:
                continue
            raise ValueError(f"the model's forward on calibration batch {i} returned without calling its first block "
                             f"({type(first).__name__}); are these the model's decoder blocks?")
    finally:
        handle.remove()
    for args, kwargs in captured:
        hidden_state(args, kwargs)  # checks it is there
    return captured


def hidden_state(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block is called with: its first positional argument or ``hidden_states=``."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise ValueError("a decoder block was called without a hidden-state tensor (first positional argument "
                         f"or hidden_states=), got {type(x).__name__}")
    return x


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def run_block(block: nn.Module, inputs: BlockInputs, keep_outputs: bool = True) -> BlockInputs:
    """``block`` on every captured input; returns the next block's inputs (same other arguments).

    Raises:
        ValueError: the block returns something other than a hidden state of the input's shape
            (a tensor, or a tuple whose first element is one).
    """
    outputs: BlockInputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        if not keep_outputs:
            continue
        y = out[0] if isinstance(out, (tuple, list)) else out
        x = hidden_state(args, kwargs)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{type(block).__name__} returned {got}; expected a hidden state of shape "
                             f"{tuple(x.shape)} (a tensor, or a tuple starting with one)")
        outputs.append(_with_hidden(args, kwargs, y))
    return outputs
