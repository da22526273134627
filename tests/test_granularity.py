import pytest

from lowbit.granularity import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken, block_size


@pytest.mark.parametrize(
    "gran,shape,expected",
    [
        (PerTensor(), (4, 8), (4, 8)),
        (PerAxis(0), (4, 8), (1, 8)),
        (PerAxis(-1), (2, 4, 8), (2, 4, 1)),
        (PerRow(), (4, 8), (1, 8)),
        (PerToken(), (2, 3, 8), (1, 1, 8)),
        (PerGroup(4), (4, 8), (1, 4)),
        (PerGroup(2), (8,), (2,)),
        (PerBlock((2, 4)), (4, 8), (2, 4)),
        (PerBlock((4,)), (3, 8), (1, 4)),
    ],
)
def test_block_size(gran, shape, expected):
    assert block_size(gran, shape) == expected


def test_frozen():
    with pytest.raises(AttributeError):
        PerGroup(32).group_size = 64


@pytest.mark.parametrize(
    "gran,shape,match",
    [
        (PerGroup(3), (4, 8), "group_size=3"),
        (PerBlock((3, 4)), (4, 8), "block"),
        (PerBlock((1, 1, 1)), (4, 8), "rank"),
        (PerAxis(2), (4, 8), "axis=2"),
        (PerTensor(), (), "rank"),
    ],
)
def test_block_size_errors(gran, shape, match):
    with pytest.raises(ValueError, match=match):
        block_size(gran, shape)


def test_block_size_type_error():
    with pytest.raises(TypeError, match="granularity"):
        block_size("per_tensor", (4,))


@pytest.mark.parametrize("ctor,arg", [(PerGroup, 0), (PerGroup, -2), (PerBlock, (0, 2))])
def test_constructor_validation(ctor, arg):
    with pytest.raises(ValueError):
        ctor(arg)


@pytest.mark.parametrize(
    "axis,shape,expected",
    [(1, (4, 8), (4, 1)), (-2, (2, 4, 8), (2, 1, 8)), (1, (2, 4, 8), (2, 1, 8)), (-3, (2, 4, 8), (1, 4, 8))],
)
def test_per_axis_every_axis(axis, shape, expected):
    assert block_size(PerAxis(axis), shape) == expected


@pytest.mark.parametrize("axis", [1.5, "0", True, None])
def test_per_axis_needs_an_int(axis):
    with pytest.raises(TypeError, match=r"PerAxis\(axis=.*\): axis must be an int"):
        PerAxis(axis)


def test_per_block_stores_a_tuple():
    g = PerBlock([2, 4])
    assert g.block == (2, 4) and isinstance(g.block, tuple) and g == PerBlock((2, 4))
    assert block_size(g, (3, 4, 8)) == (1, 2, 4)
