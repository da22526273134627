"""bf16 register peak (GFLOP/s) on torch's threads: .venv/bin/python benchmarks/results/avx512_zen4/scratch/bf16_peak.py"""
import pathlib

import torch
from torch.utils.cpp_extension import load

here = pathlib.Path(__file__).resolve().parent
ext = load(name="lowbit_bf16_peak", sources=[str(here / "bf16_peak.cpp")],
           extra_include_paths=[str(here.parents[3] / "lowbit" / "kernels" / "csrc")], extra_cflags=["-O3"])
print(f"threads {torch.get_num_threads()}")
for _ in range(3):
    print("bf16 register peak GFLOP/s", round(ext.peak(20_000_000), 1))
