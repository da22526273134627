"""Run a test's worker on N gloo processes (torch.multiprocessing spawn) and collect each rank's result.

The tests import with ``--import-mode=importlib`` (not on ``sys.path``), so a spawned child could
not unpickle a function defined in a test file. This module is put on ``sys.path`` (which spawn
hands to the children) and the worker is found again in the child by its file path and name.
Each rank runs ``fn(rank, world_size, *args)`` on one intra-op thread and its return value comes
back to the parent through a file.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, path: str, name: str, args: tuple, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    spec = importlib.util.spec_from_file_location(f"_lowbit_dist_worker_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = getattr(module, name)(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def skip_unless_spawnable() -> None:
    """pytest.skip when this platform has no torch.distributed with gloo."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    if sys.platform == "win32":
        pytest.skip("gloo multi-process tests are not run on Windows")


def run(fn, *args, world_size: int = 2) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, each rank in its own spawned gloo process.

    ``fn`` must be a module-level function of a file (found again in the child by path and name).
    Skips the test when processes cannot be spawned; a worker's exception fails it.
    """
    import torch.multiprocessing as mp

    skip_unless_spawnable()
    path = sys.modules[fn.__module__].__file__
    with tempfile.TemporaryDirectory() as out:
        try:
            ctx = mp.start_processes(_entry, args=(world_size, _free_port(), path, fn.__name__, args, out),
                                     nprocs=world_size, join=False, start_method="spawn")
        except (OSError, RuntimeError) as e:  # no fork/spawn, no sockets: a platform limit, not a failure
            pytest.skip(f"cannot spawn {world_size} processes here: {e}")
        while not ctx.join():
            pass
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
