import os
import re

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs derandomized so a red run reproduces; locally hypothesis explores. `.ci/run` sets CI=true.
# LOWBIT_HYPOTHESIS_PROFILE picks a profile by name ("mutation": scripts/mutate.py, fewer examples).
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, max_examples=150, **_COMMON)
settings.register_profile("dev", max_examples=150, **_COMMON)
settings.register_profile("mutation", derandomize=True, max_examples=30, **_COMMON)
settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --- how many property cases ran: hypothesis notes each test's statistics on its item ----------
# (its text format, "- during generate phase ...\n ... - 150 passing, 0 failing, and 2 invalid test
# cases"; the shrink phase's re-runs are not counted)
_PHASE = re.compile(r"during (\w+) phase.*?(\d+) passing, (\d+) failing", re.S)
_hypothesis_cases = {"tests": 0, "examples": 0}


def pytest_runtest_teardown(item):
    stats = getattr(item, "hypothesis_statistics", None)
    if stats:
        _hypothesis_cases["tests"] += 1
        _hypothesis_cases["examples"] += sum(int(p) + int(f) for ph, p, f in _PHASE.findall(stats) if ph != "shrink")


def pytest_terminal_summary(terminalreporter):
    if _hypothesis_cases["tests"]:
        terminalreporter.write_line(
            f"hypothesis: {_hypothesis_cases['examples']} examples in {_hypothesis_cases['tests']} property tests "
            f"(profile {settings._current_profile})"
        )


@pytest.fixture
def compiled_vs_eager():
    """``run(module, x) -> (eager, compiled, ops)``: ``module(x)`` eagerly and through ``torch.compile(fullgraph=True)``
    (a fresh dynamo state), without gradients, and the names of the ops the second compiled call ran."""

    def run(module, x):
        with torch.no_grad():
            eager = module(x)
            torch._dynamo.reset()
            compiled = torch.compile(module, fullgraph=True)
            compiled(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = compiled(x)
        return eager, out, {e.name for e in prof.events()}

    return run
