"""lowbit.kernels.hugepages: large CPU weight buffers advised onto transparent huge pages, in place."""

import copy
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import hugepages

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


@needs_linux
def test_advise_marks_the_whole_huge_pages_inside_and_keeps_the_values():
    t = torch.randint(-128, 128, (3 * hugepages.HUGE_PAGE + 12345,), dtype=torch.int8)
    keep = t.clone()
    n = hugepages.advise(t)
    if n == 0:
        pytest.skip("this kernel refuses MADV_HUGEPAGE (no transparent huge pages)")
    assert n % hugepages.HUGE_PAGE == 0 and 2 * hugepages.HUGE_PAGE <= n <= t.numel()
    assert hugepages.advised(t)  # VM_HUGEPAGE on the advised range
    assert torch.equal(t, keep)
    assert hugepages.advise(t) == n  # again: the same range, nothing else


@needs_linux
def test_what_is_left_alone(monkeypatch):
    small = torch.zeros(hugepages.MIN_BYTES - 1, dtype=torch.uint8)
    assert hugepages.advise(small) == 0
    big = torch.zeros(4, hugepages.MIN_BYTES, dtype=torch.uint8)
    assert hugepages.advise(big.t()) == 0  # not one block of memory in element order
    param = nn.Parameter(torch.zeros(hugepages.MIN_BYTES, dtype=torch.uint8), requires_grad=False)
    assert hugepages.advise(param) == 0  # subclasses (quantized tensors go through advise_quantized)
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.enabled() and hugepages.advise(big) == 0


@needs_linux
@pytest.mark.parametrize("config", [lowbit.Int4WeightOnlyConfig(group_size=128), lowbit.Int8WeightOnlyConfig()],
                         ids=["int4", "int8"])
def test_quantize_advises_the_weights_it_makes_and_outputs_do_not_change(config, monkeypatch):
    probe = torch.zeros(hugepages.MIN_BYTES + hugepages.HUGE_PAGE, dtype=torch.uint8)
    if hugepages.advise(probe) == 0:
        pytest.skip("this kernel refuses MADV_HUGEPAGE (no transparent huge pages)")
    torch.manual_seed(0)
    layer = nn.Linear(4096, 2048, bias=False, dtype=torch.bfloat16)  # int4: 4 MiB of nibbles, int8: 8 MiB
    advised, plain = nn.Sequential(layer), nn.Sequential(copy.deepcopy(layer))
    lowbit.quantize_(advised, config)
    assert hugepages.advised(advised[0].weight.qdata)
    monkeypatch.setenv(hugepages.ENV, "0")
    lowbit.quantize_(plain, config)
    assert torch.equal(advised[0].weight.qdata, plain[0].weight.qdata)
    x = torch.randn(3, 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        for m in (1, 3):
            assert torch.equal(advised(x[:m]), plain(x[:m]))


@needs_linux
def test_the_first_eager_call_advises_a_weight_quantize_did_not(monkeypatch):
    """A weight made elsewhere (a loaded checkpoint; here quantize_ with the switch off) gets its huge pages when its
    decode plan is made."""
    probe = torch.zeros(hugepages.MIN_BYTES + hugepages.HUGE_PAGE, dtype=torch.uint8)
    if hugepages.advise(probe) == 0:
        pytest.skip("this kernel refuses MADV_HUGEPAGE (no transparent huge pages)")
    model = nn.Sequential(nn.Linear(4096, 2048, bias=False, dtype=torch.bfloat16))
    monkeypatch.setenv(hugepages.ENV, "0")
    lowbit.quantize_(model, lowbit.Int8WeightOnlyConfig())
    monkeypatch.delenv(hugepages.ENV)
    if hugepages.advised(model[0].weight.qdata):
        pytest.skip("the allocator reused a range advised earlier in this process")
    with torch.no_grad():
        model(torch.randn(1, 4096, dtype=torch.bfloat16))
    assert hugepages.advised(model[0].weight.qdata)
