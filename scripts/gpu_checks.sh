#!/usr/bin/env bash
# The GPU checks as one command (a lent GPU has ~15 minutes of device time per session): the CUDA
# tests, then the GPU benchmarks. Runs in the repo root with the device image's python3 (torch with
# CUDA, pytest, hypothesis, safetensors, tqdm and tabulate preinstalled); the C++ CPU kernels are not
# built there (LOWBIT_NO_EXT=1: the CPU side of the tests runs the PyTorch paths). Writes under $OUT.
set -u
OUT=${OUT:-/tmp/lowbit_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CI=true LOWBIT_NO_EXT=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nproc; } 2>&1 | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-270}" python3 -m pytest -q -p no:cacheprovider -m cuda --durations=10 \
  tests/test_cuda.py tests/kernels/test_int4.py tests/kernels/test_int8.py tests/kernels/test_int4_memory.py \
  tests/kernels/test_float8.py tests/tensors/test_int8_tensor.py 2>&1 | tee "$OUT/cuda_tests.log"
echo "pytest rc=${PIPESTATUS[0]}" | tee -a "$OUT/cuda_tests.log"
timeout "${LINEAR_S:-200}" python3 benchmarks/gpu_linear.py --rows 1 16 256 2048 --compile-rows 1 2048 \
  --compile-variants bf16 "W8A8 dynamic" "int4 g128" "fp8 dynamic (row)" --rounds 5 --budget-s 60 --profile-rows 1 2048 \
  --out "$OUT/gpu_linear" 2>&1 | tee "$OUT/gpu_linear.log"
echo "gpu_linear rc=${PIPESTATUS[0]}"
[ "${VIT_S:-90}" = 0 ] || timeout "${VIT_S:-90}" python3 benchmarks/vit.py --device cuda --no-peers --no-compile --rounds 3 --budget-s 40 \
  --out "$OUT/vit_cuda.json" 2>&1 | tail -20 | tee "$OUT/vit.log"
echo "vit rc=${PIPESTATUS[0]}"
