"""Shared by this folder's A/B scripts: one kernel's AVX2 build from a git revision's lowbit/kernels/csrc beside the
working tree's, both loaded in one process under their own module names, each with lowbit's weight-stream prefetch
setting (a build without set_prefetch keeps its own). Run the scripts from the repository root."""
import subprocess
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]


def args(argv: list[str], rounds: int = 7) -> tuple[int, int, str]:
    """``[threads] [rounds] [REV]`` from ``argv`` (defaults: torch's threads, ``rounds``, HEAD); sets the threads."""
    threads = int(argv[0]) if len(argv) > 0 else torch.get_num_threads()
    rounds = int(argv[1]) if len(argv) > 1 else rounds
    rev = argv[2] if len(argv) > 2 else "HEAD"
    torch.set_num_threads(threads)
    return threads, rounds, rev


def head_sources(rev: str) -> Path:
    """``rev``'s lowbit/kernels/csrc written to a folder under /tmp."""
    head = Path(f"/tmp/head_csrc_avx2_{rev}")
    head.mkdir(exist_ok=True)
    for f in subprocess.run(["git", "ls-files", "lowbit/kernels/csrc"], capture_output=True, text=True).stdout.split():
        (head / Path(f).name).write_text(subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, text=True).stdout)
    return head


def builds(kernel: str, rev: str, tag: str = "") -> dict[str, object]:
    """``{"head": rev's build, "tree": the working tree's}`` of ``csrc/<kernel>_avx2.cpp``; ``tag`` keeps the build
    folders and module names of different scripts apart."""
    from lowbit.kernels import prefetch

    hint, dist, _ = prefetch.choice()
    mods = {}
    for side, src in (("head", head_sources(rev)), ("tree", Path("lowbit/kernels/csrc").resolve())):
        d = Path(f"/tmp/ab_{kernel}_avx2_{side}_{rev}{tag}")
        d.mkdir(exist_ok=True)
        mods[side] = load(f"lowbit_{kernel}_avx2_{side}{tag}", [str(src / f"{kernel}_avx2.cpp")],
                          extra_include_paths=[str(src)], extra_cflags=FLAGS, build_directory=str(d))
        if hasattr(mods[side], "set_prefetch"):
            mods[side].set_prefetch(prefetch.HINTS[hint], dist)
    return mods
