import pytest
import torch

from lowbit.dtypes import QDTYPES, get_qdtype


@pytest.mark.parametrize(
    "name,bits,qmin,qmax,storage",
    [
        ("int1", 1, -1, 0, torch.int8),
        ("int4", 4, -8, 7, torch.int8),
        ("int8", 8, -128, 127, torch.int8),
        ("uint1", 1, 0, 1, torch.uint8),
        ("uint4", 4, 0, 15, torch.uint8),
        ("uint8", 8, 0, 255, torch.uint8),
        ("float8_e4m3fn", 8, -448.0, 448.0, torch.float8_e4m3fn),
        ("float8_e5m2", 8, -57344.0, 57344.0, torch.float8_e5m2),
    ],
)
def test_table(name, bits, qmin, qmax, storage):
    d = QDTYPES[name]
    assert (d.bits, d.qmin, d.qmax, d.storage) == (bits, qmin, qmax, storage)


def test_all_widths_present():
    for b in range(1, 9):
        assert f"int{b}" in QDTYPES and f"uint{b}" in QDTYPES


def test_get_qdtype_forms():
    assert get_qdtype("int8") is QDTYPES["int8"]
    assert get_qdtype(torch.int8) is QDTYPES["int8"]
    assert get_qdtype(torch.float8_e4m3fn) is QDTYPES["float8_e4m3fn"]
    assert get_qdtype("torch.uint8") is QDTYPES["uint8"]
    assert get_qdtype(QDTYPES["int4"]) is QDTYPES["int4"]


@pytest.mark.parametrize("bad", ["int9", "float16", torch.float32, 3])
def test_get_qdtype_rejects(bad):
    with pytest.raises((ValueError, TypeError), match="dtype"):
        get_qdtype(bad)
