"""Int4 weights stay int4-sized after they have run: no converted copy of the weight outlives a
call on the paths that don't read the canonical layout directly (C++ kernels disabled; CUDA)."""

import gc

import pytest
import torch
from torch import nn

from lowbit.configs import Int4WeightOnlyConfig
from lowbit.kernels import _ext
from lowbit.quantize import quantize_

# canonical int4 at g128: 0.5 byte per weight + float32 scale and int8 zero point per 128
# = 0.539 byte, 0.270x bf16 (plus the float bias); a kept int4pack copy doubled it (0.54x)
MAX_BYTES_VS_BF16 = 0.30


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the tensors, quantized tensors by their inner tensors."""
    out = {}
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            stack.extend(getattr(t, n) for n in names)
        elif isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                st = t.untyped_storage()
                out[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                continue  # a fake/functional tensor left by torch.compile elsewhere in the process: no memory
    return out


def _live_tensors():
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_int4_bytes_after_a_forward_on_the_fallback_paths(device, symmetric, monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda name="": None)  # CPU: the paths without our C++ kernels
    before = set(_storages(_live_tensors()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 512)).to(device, torch.bfloat16)
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    quantize_(model, Int4WeightOnlyConfig(group_size=128, symmetric=symmetric))
    with torch.no_grad():
        for m in (1, 8, 300):
            model(torch.randn(m, 1024, device=device, dtype=torch.bfloat16))
    held_by_model = sum(_storages(list(model.parameters()) + list(model.buffers())).values())
    new = {ptr: n for ptr, n in _storages(_live_tensors()).items() if ptr not in before}
    held_anywhere = sum(new.values())  # the model, module-level caches, anything still referenced
    assert held_by_model / bf16_bytes <= MAX_BYTES_VS_BF16, held_by_model / bf16_bytes
    assert held_anywhere / bf16_bytes <= MAX_BYTES_VS_BF16, (held_anywhere / bf16_bytes, held_by_model / bf16_bytes)
