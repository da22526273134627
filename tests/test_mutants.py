"""scripts/mutants.py, the operators of the mutation run (benchmarks/results/mutation.md)."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _mutants():
    spec = importlib.util.spec_from_file_location("mutants", SCRIPTS / "mutants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", mod)  # @dataclass looks its module up while it is built
    spec.loader.exec_module(mod)
    return mod


SOURCE = '''
"""Docstring: 1 + 2 stays."""
__all__ = ["f"]


def f(x, lo=0):
    """Also a docstring."""
    if x < lo:
        raise ValueError(f"x={x} < {lo}")
    _check(x)
    return torch.clamp(torch.round(x / 2) + 1, lo, 7).float()


class C:
    def g(self):
        return min(self.a, -self.b) and True
'''


def test_points_and_application():
    m = _mutants()
    points = m.mutation_points(SOURCE)
    descs = [p.desc for p in points]
    for want in ["0 -> 1", "< -> <=", "negate the if condition", "drop the call _check(x)", "/ -> *",
                 "2 -> 3", "torch.round(x / 2): round -> floor", "torch.round(x / 2): round -> ceil", "+ -> -",
                 "1 -> 2", "7 -> 8", "drop torch.clamp(...), keep its input", "drop .float(...)",
                 "min(self.a, -self.b): min -> max", "drop unary -", "True -> False", "and -> or"]:
        assert want in descs, want
    # docstrings, messages, raise statements and __all__ are left alone
    assert not any("ValueError" in d or "Docstring" in d for d in descs)
    assert {p.scope for p in points} == {None, "f", "C.g"}  # None: the default argument lo=0
    floor = next(p.index for p in points if p.desc.endswith("round -> floor"))
    text = m.mutant_source(SOURCE, floor)
    assert "torch.floor(x / 2)" in text and "torch.round" not in text
    assert m.mutant_source(SOURCE, floor).count("\n") > 5  # the whole module comes back, one spot changed
