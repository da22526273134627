"""README's benchmark tables are what ``benchmarks/tables.py`` makes from the committed result files."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("lowbit_readme_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _tables()


def test_readme_tables_match_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert tables.render(readme) == readme, "README.md's tables are stale or edited by hand: run python benchmarks/tables.py"


def test_every_table_is_marked_once_and_generated():
    readme = (ROOT / "README.md").read_text()
    names = [m.group("name") for m in tables._BLOCK.finditer(readme)]
    assert sorted(names) == sorted(tables.TABLES)
    for name, make in tables.TABLES.items():
        block = make()
        assert block.count("\n|") >= 2, name  # a header, a rule and at least one row


def test_a_number_edited_by_hand_is_caught():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- table:accuracy-smollm2 -->")
    row = readme.index("| `Int8WeightOnlyConfig()` |", start)
    end = readme.index("\n", row)
    edited = readme[:row] + readme[row:end].replace("%", "1%", 1) + readme[end:]  # one delta changed
    assert edited != readme and tables.render(edited) == readme


def test_marker_errors():
    with pytest.raises(ValueError, match="unknown table"):
        tables.render("<!-- table:nope -->\nx\n<!-- /table -->\n")
    with pytest.raises(ValueError, match="exactly once"):
        tables.render("no tables at all\n")
