"""Static calibration on 2 gloo ranks (each on half the batches) + sync_observers == 1 process on all."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.static import SmoothQuantConfig, StaticQuantConfig, convert, prepare, sync_observers
from lowbit.tensors.base import QuantizedTensor

sys.path.insert(0, str(Path(__file__).parent))
import lowbit_dist_harness as harness  # noqa: E402

CONFIGS = {
    "int8": StaticQuantConfig(),
    "int8-asym": StaticQuantConfig(act_symmetric=False),
    "fp8-e4m3": StaticQuantConfig("float8_e4m3fn"),
    "smooth-static": SmoothQuantConfig(),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))


def _batches():
    g = torch.Generator().manual_seed(1)
    # batch 3 carries the outliers: one rank alone sees them
    return [torch.randn(4, 32, generator=g) * (20.0 if i == 3 else 1.0) for i in range(6)]


def _converted_state(model) -> dict:
    """Every inner tensor of every quantized weight and every float tensor, by name."""
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, QuantizedTensor):
            for field in type(t).tensor_data_names + type(t).optional_tensor_data_names:
                if getattr(t, field, None) is not None:
                    out[f"{name}.{field}"] = getattr(t, field)
        else:
            out[name] = t
    return out


def _calibrate(config, batches, rank=None, world=None):
    model = _model()
    prepare(model, config)
    with torch.no_grad():
        for b in batches:
            model(b)
    if rank is not None:
        assert sync_observers(model) == 3
    convert(model)
    return _converted_state(model), model(_batches()[0]).detach()


def _worker(rank, world):
    """Everything the tests check, in one spawn (each spawn costs seconds of imports)."""
    mine = _batches()[rank::world]  # interleaved slices: rank 1 alone sees the outlier batch
    out = {name: _calibrate(config, mine, rank, world) for name, config in CONFIGS.items()}

    model = _model()
    prepare(model, StaticQuantConfig(observer="moving_average", averaging_constant=0.5))
    model(_batches()[rank])
    try:
        sync_observers(model)
        out["refused"] = None
    except TypeError as e:
        out["refused"] = str(e)

    model = _model()
    prepare(model, StaticQuantConfig())
    if rank == 0:  # rank 1 saw no batch at all: it takes rank 0's ranges
        model(_batches()[0])
    sync_observers(model)
    convert(model)
    out["empty"] = _converted_state(model)
    return out


@pytest.fixture(scope="module")
def results():
    return harness.run(_worker)


@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_equal_one_process_on_the_union(results, name):
    ref_state, ref_out = _calibrate(CONFIGS[name], _batches())
    alone, _ = _calibrate(CONFIGS[name], _batches()[0::2])  # what rank 0 would convert without the sync
    assert any(not torch.equal(alone[k], ref_state[k]) for k in ref_state)
    for r in results:
        state, out = r[name]
        assert state.keys() == ref_state.keys()
        for k in ref_state:
            assert torch.equal(state[k], ref_state[k]), k
        assert torch.equal(out, ref_out)


def test_moving_average_is_refused_on_every_rank(results):
    for r in results:
        msg = r["refused"]
        assert msg is not None and "MovingAverageMinMaxObserver" in msg and "minmax" in msg


def test_a_rank_without_data_takes_the_others_ranges(results):
    ref, _ = _calibrate(StaticQuantConfig(), _batches()[:1])
    for r in results:
        assert r["empty"].keys() == ref.keys()
        assert all(torch.equal(r["empty"][k], ref[k]) for k in ref)


def test_without_a_process_group_it_raises():
    model = _model()
    prepare(model, StaticQuantConfig())
    with pytest.raises(RuntimeError, match="init_process_group"):
        sync_observers(model)
