"""lowbit/kernels/_cache.py: derived values follow in-place edits of every source and are never kept
for inference tensors; dispatcher ops get their fake kernel once, whatever the threads."""

import threading
import time

import pytest
import torch

from lowbit.kernels import _cache
from lowbit.kernels._cache import DerivedCache, direct_op


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


# --- direct_op: the fake kernel registered once across threads -----------------------------------

_LIB = torch.library.Library("lowbit_test_cache", "DEF")
_LIB.define("twice(Tensor x) -> Tensor")
_LIB.impl("twice", lambda x: x * 2, "CPU")


def test_direct_op_registers_its_fake_once_across_threads(monkeypatch):
    registered = []
    real = torch.library.register_fake

    def slow_register(qualname, *args, **kwargs):
        registered.append(qualname)
        time.sleep(0.05)  # widen the window two unlocked first calls would both pass through
        return real(qualname, *args, **kwargs)

    monkeypatch.setattr(torch.library, "register_fake", slow_register)
    fake_calls = []

    def fake(x):
        fake_calls.append(1)
        return torch.empty_like(x)

    barrier, results, errors = threading.Barrier(8), [], []

    def first_call():
        barrier.wait()
        try:
            results.append(direct_op("lowbit_test_cache::twice", fake))
        except Exception as e:  # noqa: BLE001 - the test reports any thread's failure
            errors.append(e)

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and registered == ["lowbit_test_cache::twice"]
    assert len(results) == 8 and all(op is results[0] for op in results)
    assert torch.equal(results[0](torch.ones(3)), torch.full((3,), 2.0))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert results[0](torch.empty(5)).shape == (5,)
    assert fake_calls


def test_direct_op_missing_is_none():
    assert direct_op("lowbit_test_cache::not_defined", lambda x: x) is None
