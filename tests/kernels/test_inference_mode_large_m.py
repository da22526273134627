"""Under torch.inference_mode, the chunked large-M paths (work on OpenMP worker threads) equal no_grad.

test_inference_mode.py covers every config at M=1 and 5; here M up to 256. Our C++ kernels run parts
of a call on OpenMP worker threads, which start outside the caller's (thread-local) InferenceMode: an in-place write there into an output made under inference_mode used to
raise "Inplace update to inference tensor outside InferenceMode" (float8's chunked path, M > 32).
"""

import pytest
import torch
from torch import nn

import lowbit

CONFIGS = {
    "int8wo": lowbit.Int8WeightOnlyConfig(),
    "int4wo": lowbit.Int4WeightOnlyConfig(group_size=128),
    "w8a8": lowbit.Int8DynamicActivationInt8WeightConfig(),
    "8da4w": lowbit.Int8DynamicActivationInt4WeightConfig(),
    "fp8wo": lowbit.Float8WeightOnlyConfig(),
    "fp8dyn": lowbit.Float8DynamicActivationFloat8WeightConfig(),
    "fp8a-int4w": lowbit.Float8DynamicActivationInt4WeightConfig(),
}


@pytest.mark.parametrize("m_rows", [1, 4, 64, 256])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inference_mode_equals_no_grad(name, m_rows, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 384)).to(dtype)
    lowbit.quantize_(model, CONFIGS[name])
    x = torch.randn(m_rows, 512, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    with torch.inference_mode():
        got = model(x)
    assert torch.equal(ref, got)


def test_a_buffer_kept_from_inference_mode_serves_later_calls():
    """The int8 chunked path keeps its conversion buffer per thread between calls (int8._chunk_buffer). One
    first made under inference_mode must still be writable by calls outside it (no_grad, grad enabled):
    the buffer is made as a normal tensor. K = 8192 so that this call grows the buffer (made here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8192, 300)).bfloat16()
    lowbit.quantize_(model, lowbit.Int8WeightOnlyConfig())
    x = torch.randn(256, 8192, dtype=torch.bfloat16)
    with torch.inference_mode():
        first = model(x)
    with torch.no_grad():
        again = model(x)
    assert torch.equal(first, again)
    assert torch.equal(model(x).detach(), first)
