"""Imports only go down the layer order of ARCHITECTURE.md."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lowbit"

# lowest first; a module may import its own layer or any earlier one
LAYERS = [
    "version",
    "dtypes",
    "granularity",
    "spec",
    "primitives",
    "kernels",
    "tensors",
    "observers",
    "configs",
    "quantize",
    "static",
    "qat",
    "algorithms",
    "serialization",
    "distributed",
    "tensor_parallel",
    "pretrained",
    "formats",
    "eval",
    "cli",
]


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "lowbit" or len(parts) < 2:
        raise KeyError(module)
    return LAYERS.index(parts[1])


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name == "lowbit.__init__":
            continue  # the package front door re-exports from every layer
        yield name.removesuffix(".__init__"), path


def _imports(name: str, path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module


def test_every_module_is_in_a_layer():
    for name, _ in _modules():
        assert name.split(".")[1] in LAYERS, f"{name} is not in a layer of ARCHITECTURE.md; add it there and here"


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_down(name, path):
    own = _layer(name)
    for imported in _imports(name, path):
        if imported == "lowbit":
            pytest.fail(f"{name} imports the package front door 'lowbit'; import the defining module")
        if not imported.startswith("lowbit."):
            continue
        assert _layer(imported) <= own, (
            f"{name} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[_layer(imported)]}), "
            "which is above it in ARCHITECTURE.md"
        )


def test_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "affine.py"
    bad.write_text("from lowbit.quantize import quantize_\n")
    imported = list(_imports("lowbit.primitives.affine", bad))
    assert imported == ["lowbit.quantize"] and _layer(imported[0]) > _layer("lowbit.primitives.affine")
