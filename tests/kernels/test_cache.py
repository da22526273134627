"""lowbit/kernels/_cache.py: derived values follow in-place edits of every source and are never kept
for inference tensors."""

import torch

from lowbit.kernels import _cache
from lowbit.kernels._cache import DerivedCache


def _counting(fn):
    calls = []

    def make():
        calls.append(1)
        return fn()

    return make, calls


def test_hit_while_nothing_changed_and_recompute_after_any_in_place_edit():
    a, b = torch.arange(6.0), torch.ones(6)
    cache = DerivedCache()
    make, calls = _counting(lambda: a * b)
    assert torch.equal(cache.get((a, b), "t", make), a)
    assert torch.equal(cache.get((a, b), "t", make), a) and len(calls) == 1
    b.mul_(2)  # the second source, in place
    assert torch.equal(cache.get((a, b), "t", make), 2 * a) and len(calls) == 2
    a[0] = 10.0  # the key source, through indexing
    assert cache.get((a, b), "t", make)[0] == 20.0 and len(calls) == 3
    with torch.no_grad():
        b.copy_(torch.full((6,), 3.0))  # copy_ under no_grad (load_state_dict's way)
    assert cache.get((a, b), "t", make)[0] == 30.0 and len(calls) == 4
    assert cache.get((a, b), "other tag", make) is not None and len(calls) == 5


def test_another_tensor_in_a_source_slot_is_a_miss():
    a, b = torch.arange(4.0), torch.ones(4)
    cache = DerivedCache()
    make, calls = _counting(lambda: a.clone())
    cache.get((a, b), "t", make)
    b2 = torch.ones(4)  # equal values, version 0 like b: still another tensor
    cache.get((a, b2), "t", make)
    assert len(calls) == 2


def test_data_swap_is_a_miss():
    a, b = torch.arange(4.0), torch.ones(4)
    cache = DerivedCache()
    make, calls = _counting(lambda: a * b)
    cache.get((a, b), "t", make)
    b.data = torch.full((4,), 5.0)
    assert torch.equal(cache.get((a, b), "t", make), 5 * a) and len(calls) == 2


def test_inference_tensors_are_never_cached():
    with torch.inference_mode():
        a, b = torch.arange(4.0), torch.ones(4)
        cache = DerivedCache()
        make, calls = _counting(lambda: a * b)
        cache.get((a, b), "t", make)
        b.mul_(3)  # no version counter records this
        assert torch.equal(cache.get((a, b), "t", make), 3 * a)
    assert len(calls) == 2 and cache.values() == []


def test_entries_die_with_their_key_and_are_counted():
    cache = DerivedCache()
    a = torch.ones(1000)
    cache.get((a,), "t", lambda: torch.zeros(250))
    assert _cache.cached_bytes() >= 1000
    del a
    assert cache.values() == []
