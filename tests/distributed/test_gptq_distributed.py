"""GPTQ on 2 gloo ranks, each calibrating on half the samples, against 1 process on all of them."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

from lowbit.algorithms import calibration_batches, gptq
from lowbit.algorithms.distributed import assign
from lowbit.configs import Int4WeightOnlyConfig
from lowbit.eval import eval_text, glassllm_tokenizer, load_glassllm, perplexity
from lowbit.tensors.base import QuantizedTensor

sys.path.insert(0, str(Path(__file__).parent))
import lowbit_dist_harness as harness  # noqa: E402

CONFIG = {"re:.*down_proj": None, "re:.*": Int4WeightOnlyConfig(group_size=32)}
SAMPLES, SEQ_LEN, EVAL_WINDOWS = 16, 64, 8


def _data():
    ids = torch.tensor(glassllm_tokenizer().encode(eval_text()))
    n = ids.numel()
    return calibration_batches(ids[n * 9 // 10:], n_samples=SAMPLES, seq_len=SEQ_LEN, seed=0), ids[: n * 9 // 10]


def _quantized_state(model) -> dict:
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, QuantizedTensor):
            for field in ("qdata", "scale", "zero_point"):
                if getattr(t, field, None) is not None:
                    out[f"{name}.{field}"] = getattr(t, field)
    return out


def _run(calib, process_group=None):
    model = load_glassllm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied lm_head stays float: said once per call
        report = gptq(model, CONFIG, calib, batch_size=4, process_group=process_group)
    return model, report


def _worker(rank, world):
    import torch.distributed as dist

    calib, held_out = _data()
    model, report = _run(calib[rank * SAMPLES // world:(rank + 1) * SAMPLES // world], dist.group.WORLD)
    ppl = perplexity(model, held_out, 128, max_windows=EVAL_WINDOWS) if rank == 0 else None
    return _quantized_state(model), report.samples, len(report.layers), ppl


@pytest.fixture(scope="module")
def results():
    return harness.run(_worker)


def test_every_rank_ends_with_the_same_model(results):
    (s0, n0, l0, _), (s1, n1, l1, _) = results
    assert n0 == n1 == SAMPLES and l0 == l1 == 24
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_two_ranks_match_one_process_on_the_union(results):
    calib, held_out = _data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        model, _ = _run(calib)
        ppl = perplexity(model, held_out, 128, max_windows=EVAL_WINDOWS)
    finally:
        torch.set_num_threads(threads)
    ref = _quantized_state(model)
    state, _, _, dist_ppl = results[0]
    # contiguous slices, each a multiple of batch_size: the Hessians are added in the single
    # process's order, so codes, scales and zero points are bit-identical, and so is perplexity
    assert state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
    assert dist_ppl == ppl
    # and the ranks did calibrate on different data: half of it alone gives other codes
    half, _ = _run(calib[: SAMPLES // 2])
    half_state = _quantized_state(half)
    assert any(not torch.equal(half_state[k], ref[k]) for k in ref if k.endswith(".qdata"))


def test_assignment_balances_and_agrees():
    assert assign([1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 0, 1]
    assert assign([5.0, 1.0, 1.0, 3.0], 2) == [0, 1, 1, 1]
    assert assign([2.0], 3) == [0]


def _sum_worker(rank, world):
    import torch.distributed as dist

    from lowbit.algorithms.distributed import ordered_sums

    g = torch.Generator().manual_seed(5)
    products = [torch.randn(8, 8, generator=g) * 10.0 ** (i % 7) for i in range(6)]
    total = torch.zeros(8, 8)
    ordered_sums([total], [products[rank * 3:(rank + 1) * 3]], dist.group.WORLD)
    return total


def test_ordered_sums_add_in_the_single_process_order():
    g = torch.Generator().manual_seed(5)
    products = [torch.randn(8, 8, generator=g) * 10.0 ** (i % 7) for i in range(6)]
    ref = torch.zeros(8, 8)
    for p in products:
        ref += p
    # the magnitudes (1 .. 1e6) make the order matter: pairwise partial sums round differently
    assert not torch.equal((products[0] + products[1] + products[2]) + (products[3] + products[4] + products[5]), ref)
    for total in harness.run(_sum_worker):
        assert torch.equal(total, ref)


def test_process_group_without_init_raises():
    calib, _ = _data()
    with pytest.raises(RuntimeError, match="init_process_group"):
        _run(calib, process_group=object())
