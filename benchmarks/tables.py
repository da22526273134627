"""README's benchmark tables, generated from the committed result files.

Every table in README.md that quotes a benchmark number sits between two marker comments::

    <!-- table:NAME -->
    ...generated...
    <!-- /table -->

and is made here from ``benchmarks/results/*.json`` (and ``examples/results/*.json``), never typed
by hand. ``tests/test_readme_tables.py`` fails when README differs from what this script makes
(a number edited by hand, or a result file re-run without regenerating).

Usage::

    python benchmarks/tables.py            # rewrite README.md's tables in place
    python benchmarks/tables.py --check    # exit 1 and print a diff when README is out of date
    python benchmarks/tables.py --show e2e # print one table
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

_BLOCK = re.compile(r"<!-- table:(?P<name>[a-z0-9-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _md(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}%"


def _joined(cells: list[str]) -> str:
    """``"a / b"``, or ``"a"`` when every cell is the same."""
    return cells[0] if len(set(cells)) == 1 else " / ".join(cells)


# --- accuracy.json ---------------------------------------------------------------------------------


def _accuracy_rows(model: str) -> tuple[dict, dict]:
    res = _load(RESULTS / "accuracy.json")["models"][model]
    return res, {r["label"]: r for r in res["results"]}


_SMOLLM2_ROWS = [  # (README label, accuracy.json labels, joined by " / ")
    ("fp32", ["float32 (no quantization)"]),
    ("`Int8WeightOnlyConfig()`", ["Int8WeightOnlyConfig()"]),
    ("`Int8DynamicActivationInt8WeightConfig()` / `act_symmetric=False`",
     ["Int8DynamicActivationInt8WeightConfig()", "Int8DynamicActivationInt8WeightConfig(act_symmetric=False)"]),
    ("`Float8WeightOnlyConfig()` (e4m3, per row)", ["Float8WeightOnlyConfig()"]),
    ("`Float8DynamicActivationFloat8WeightConfig(PerRow())`",
     ["Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())"]),
    ("`Int4WeightOnlyConfig(group_size=32)`: int / float zero point",
     ["Int4WeightOnlyConfig(group_size=32)", "Int4WeightOnlyConfig(group_size=32, zero_point_domain='float')"]),
    ("`Int4WeightOnlyConfig(group_size=64)`: int / float zero point",
     ["Int4WeightOnlyConfig(group_size=64)", "Int4WeightOnlyConfig(group_size=64, zero_point_domain='float')"]),
    ("`Int4WeightOnlyConfig()` g128 (576-wide layers at g64): int / float zero point",
     ["Int4WeightOnlyConfig(group_size=128), in_features 576 at group_size=64",
      "Int4WeightOnlyConfig(group_size=128, zero_point_domain='float'), in_features 576 at group_size=64"]),
    ("`Int8DynamicActivationInt4WeightConfig()` (g32)", ["Int8DynamicActivationInt4WeightConfig()"]),
    ("`Float8DynamicActivationInt4WeightConfig(group_size=64)`", ["Float8DynamicActivationInt4WeightConfig(group_size=64)"]),
]


def table_accuracy_smollm2() -> str:
    """SmolLM2-135M: bytes, perplexity and delta of the main configs (``accuracy.py``)."""
    _, rows = _accuracy_rows("smollm2")
    body = []
    for label, keys in _SMOLLM2_ROWS:
        rs = [rows[k] for k in keys]
        delta = "-" if rs[0]["config"] is None else " / ".join(_pct(r["delta_pct"]) for r in rs)
        body.append([label, _joined([f"{r['ratio']:.3f}x" for r in rs]),
                     " / ".join(f"{r['perplexity']:.3f}" for r in rs), delta])
    return _md(["config", "linear bytes vs fp32", "perplexity", "delta"], body)


_STATIC_ROWS = [
    ("`Int8DynamicActivationInt8WeightConfig()` (dynamic, per token)", "Int8DynamicActivationInt8WeightConfig()"),
    ("`StaticQuantConfig()` (int8, per-tensor static)", "StaticQuantConfig()"),
    ("`StaticQuantConfig(act_symmetric=False)`", "StaticQuantConfig(act_symmetric=False)"),
    ('`StaticQuantConfig(observer="percentile")` (99.99%)', "StaticQuantConfig(observer='percentile')"),
    ('`StaticQuantConfig("float8_e4m3fn")`', "StaticQuantConfig(dtype='float8_e4m3fn')"),
    ("`SmoothQuantConfig()` (alpha 0.5, static int8)", "SmoothQuantConfig()"),
    ("`SmoothQuantConfig(alpha=0.8)` (static int8)", "SmoothQuantConfig(alpha=0.8)"),
    ("`SmoothQuantConfig(Int8DynamicActivationInt8WeightConfig())`",
     "SmoothQuantConfig(base_config=Int8DynamicActivationInt8WeightConfig())"),
]


def table_static() -> str:
    """Calibrated (static, SmoothQuant) rows on both models: perplexity change vs float32."""
    (smol, smol_rows), (glass, glass_rows) = _accuracy_rows("smollm2"), _accuracy_rows("glassllm")
    headers = ["config", f"SmolLM2-135M ({smol['windows']} x {smol['seq_len']}, fp32 {smol['float_perplexity']:.3f})",
               f"glassllm ({glass['windows']} x {glass['seq_len']}, fp32 {glass['float_perplexity']:.2f})"]
    body = [[label, _pct(smol_rows[key]["delta_pct"]), _pct(glass_rows[key]["delta_pct"])] for label, key in _STATIC_ROWS]
    return _md(headers, body)


# --- demo.json -------------------------------------------------------------------------------------


def _demo_label(row: dict) -> str:
    """The first column for a demo.json written before rows had short labels (``label`` = the config repr)."""
    if row is None or row["label"].startswith("float32"):
        return "fp32"
    if "counts" in row:  # the autoquant row
        return "autoquant (1% budget): " + ", ".join(f"{n} x `{c}`" for c, n in row["counts"].items())
    return f"`{row['label']}`"


def _demo_config(row: dict) -> str:
    """The full config of a demo row with a short label (``config``: the repr, `` + GPTQ (...)`` for an algorithm)."""
    if row["config"] is None:
        return "-"
    if "counts" in row:  # the autoquant row
        return ", ".join(f"{n} x `{c}`" for c, n in row["counts"].items())
    return f"`{row['config']}`"


def table_demo_glassllm() -> str:
    """``make demo`` on glassllm: every row's linear bytes and perplexity (``results/demo/demo.json``)."""
    res = _load(RESULTS / "demo" / "demo.json")["models"]["glassllm"]
    ref = res["rows"][0]

    def numbers(r: dict) -> list[str]:
        return [f"{r['bytes']:,}", f"{r['bytes'] / ref['bytes']:.2f}x", f"{r['perplexity']:.2f}",
                "-" if r is ref else _pct(r["delta_pct"]), r["note"] or ""]

    if "config" not in ref:  # written before short labels
        body = [[_demo_label(r), *numbers(r)] for r in res["rows"]]
        return _md(["config", "linear weight bytes", "vs fp32", "perplexity", "delta", "note"], body)
    body = [[r["label"], *numbers(r), _demo_config(r)] for r in res["rows"]]
    return _md(["row", "linear weight bytes", "vs fp32", "perplexity", "delta", "note", "config"], body)


# --- examples/results/qat_finetune.json ------------------------------------------------------------


def table_qat() -> str:
    """QAT fine-tuning of glassllm (``examples/qat_finetune.py``): held-out perplexity."""
    ppl = _load(ROOT / "examples" / "results" / "qat_finetune.json")["held_out_ppl"]
    prepared, converted = ppl["QAT fake-quant (prepared)"], ppl["QAT fine-tuned + convert (int4)"]
    same = " (identical to prepared)" if converted == prepared else ""
    body = [["fp32 fine-tuned", f"{ppl['fp32 fine-tuned']:.2f}"],
            ["fp32 fine-tuned, then int4 PTQ", f"{ppl['fine-tuned + int4 PTQ']:.2f}"],
            ["int4 QAT fine-tuned, prepared (fake quant)", f"{prepared:.2f}"],
            ["int4 QAT fine-tuned, converted (real int4)", f"{converted:.2f}{same}"]]
    return _md(["model", "held-out perplexity"], body)


# --- e2e.json --------------------------------------------------------------------------------------

_E2E_NAMES = {
    "int8wo": "lowbit int8 weight-only", "w8a8": "lowbit W8A8 dynamic", "int4wo-g128": "lowbit int4 g128",
    "int4wo-g32": "lowbit int4 g32", "8da4w": "lowbit 8da4w", "fp8wo": "lowbit float8 weight-only",
    "fp8dq": "lowbit float8 dynamic", "fp8a-int4w": "lowbit float8 x int4",
    "ao-int4wo": "torchao int4 g128 (`PrototypeInt4WeightOnlyConfig`, CPU)", "ao-int8wo": "torchao int8 weight-only",
    "ao-w8a8": "torchao W8A8 dynamic", "bnb-nf4": "bitsandbytes nf4", "quanto-w4": "optimum-quanto w4",
    "quanto-w8": "optimum-quanto w8",
}


def table_e2e() -> str:
    """Decode and prefill speed vs bf16 on the ~1B Llama (``e2e.py``)."""
    data = _load(RESULTS / "e2e.json")
    body = []
    for model in data["settings"]["models"]:
        rows = [r for r in data["results"] if r["model"] == model and r["key"] != "bf16"]
        keys = list(dict.fromkeys(r["key"] for r in rows))
        cell = {(r["key"], r["workload"], r["mode"]): r for r in rows}
        for key in keys:
            line = [_E2E_NAMES.get(key, key)]
            for workload in ("decode", "prefill"):
                for mode in ("eager", "compiled"):
                    r = cell.get((key, workload, mode))
                    line.append("-" if r is None else f"{r['speedup_vs_bf16']:.2f}x")
            line.append(f"{next(r for r in rows if r['key'] == key)['weight_bytes_vs_bf16']:.2f}x")
            body.append(line)
    name = ", ".join(data["settings"]["models"])
    return _md([f"{name}, speed vs bf16", "decode eager", "decode compiled", "prefill eager", "prefill compiled",
                "weights"], body)


# --- linear*.json ----------------------------------------------------------------------------------


def _table_linear(file: str) -> str:
    data = _load(RESULTS / file)
    ms = data["settings"]["m"]
    modes = ("eager", "compiled")
    bf16 = {(r["m"], r["mode"]): r["median_ms"] for r in data["results"] if r["variant"].startswith("bf16")}
    lead = ", ".join(f"M={m} {mode} {bf16[(m, mode)]:.2f}" for m in ms for mode in modes if (m, mode) in bf16)
    rows = [r for r in data["results"] if not r["variant"].startswith("bf16")]
    cell = {(r["variant"].removesuffix(" " + r["mode"]), r["m"], r["mode"]): r for r in rows}
    body = []
    for name in dict.fromkeys(r["variant"].removesuffix(" " + r["mode"]) for r in rows):
        first = next(r for r in rows if r["variant"].removesuffix(" " + r["mode"]) == name)
        line = [name, f"{first['weight_bytes_vs_bf16']:.3f}"]
        for m in ms:
            for mode in modes:
                r = cell.get((name, m, mode))
                line.append("-" if r is None else f"{r['speedup_vs_baseline']:.2f}x")
        body.append(line)
    headers = ["variant", "weight bytes vs bf16"] + [f"M={m} {mode}" for m in ms for mode in modes]
    return f"{data['family']} family (bf16 ms: {lead})\n\n" + _md(headers, body)


# --- roofline.json (benchmarks/roofline.py) ------------------------------------------------------

# each lowbit row's peers in roofline.json (the same weight format); the best of them is shown
_ROOFLINE_PEERS = {
    "int8 weight-only": ["torchao int8 weight-only", "quanto qint8 weights", "bnb LLM.int8 (threshold 6)"],
    "int4 weight-only g128": ["torchao int4 g128 (CPU opaque layout)", "quanto qint4 g128 weights",
                              "bnb nf4 (blocks of 64)"],
    "float8 weight-only": ["torchao float8 weight-only"],
    "W8A8 dynamic": ["torchao W8A8 dynamic", "quanto qint8 weights x qint8 acts"],
    "8da4w": ["torchao 8da4w g32"],
}
_ROOFLINE_LABELS = {"bf16": "bf16 `F.linear`", "float32": "float32 `F.linear` (x widened)", "8da4w": "8da4w (g32)"}


def _table_roofline(path, ms: tuple[int, ...]) -> str:
    """lowbit's and torch's rows of a roofline.json: per M in ``ms`` the fraction of the limit (DRAM at
    M <= 4, the larger of the two bounds at M = 16, compute peak at M = 256) and the ratio to bf16, then the best
    peer at each M of ``ms`` but 4."""
    data = _load(path)
    by = {(r["config"], r.get("M")): r for r in data["rows"]}
    errors = {r["config"]: r["error"] for r in data["rows"] if "error" in r}

    peer_ms = tuple(m for m in ms if m != 4)

    def best_peer(name: str) -> str:
        cells = []
        for m in peer_ms:
            ran = [(by[(p, m)]["vs_bf16"], p) for p in _ROOFLINE_PEERS.get(name, []) if (p, m) in by]
            cells.append(f"{max(ran)[1].split(' ')[0]} {max(ran)[0]:.2f}x" if ran else None)
        if not any(cells):
            failed = [p for p in _ROOFLINE_PEERS.get(name, []) if p in errors]
            return f"{failed[0].split(' ')[0]}: not run" if failed else ""
        return " / ".join(c or "-" for c in cells)

    rows = []
    for r in data["rows"]:
        if r.get("M") != 1 or r["library"] not in ("torch", "lowbit"):
            continue
        name = r["config"]
        row = [_ROOFLINE_LABELS.get(name, name)]
        for m in ms:
            x = by[(name, m)]
            row += [f"{x['fraction_of_roofline']:.2f}", f"{x['vs_bf16']:.2f}x"]
        rows.append(row + [best_peer(name)])
    headers = ["config"]
    for m in ms:
        limit = "DRAM" if m <= 4 else "roofline" if m <= 16 else "peak"
        headers += [f"M={m} fraction of {limit}", f"M={m} vs bf16"]
    return _md(headers + [f"best peer, vs bf16 at {' / '.join(f'M={m}' for m in peer_ms)}"], rows)


def table_roofline_avx2() -> str:
    return _table_roofline(RESULTS / "roofline.json", (1, 16, 256))


def table_roofline_avx512() -> str:
    return _table_roofline(RESULTS / "roofline_avx512.json", (1, 4, 256))


TABLES = {
    "roofline-avx2": table_roofline_avx2,
    "roofline-avx512": table_roofline_avx512,
    "qat": table_qat,
    "static": table_static,
    "demo-glassllm": table_demo_glassllm,
    "accuracy-smollm2": table_accuracy_smollm2,
    "linear-int8": lambda: _table_linear("linear.json"),
    "linear-int4": lambda: _table_linear("linear_int4.json"),
    "linear-float8": lambda: _table_linear("linear_float8.json"),
    "e2e": table_e2e,
}


def render(readme: str) -> str:
    """``readme`` with every marked table regenerated.

    Raises:
        ValueError: a marker names no known table, or a known table has no marker / more than one.
    """
    names = [m.group("name") for m in _BLOCK.finditer(readme)]
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise ValueError(f"README marks unknown table(s) {unknown}; known: {sorted(TABLES)}")
    counts = {n: names.count(n) for n in TABLES}
    bad = {n: c for n, c in counts.items() if c != 1}
    if bad:
        raise ValueError(f"each table must be marked exactly once in README; found {bad}")
    return _BLOCK.sub(lambda m: f"<!-- table:{m['name']} -->\n\n{TABLES[m['name']]()}\n\n<!-- /table -->", readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if README is stale")
    parser.add_argument("--show", choices=sorted(TABLES), help="print one table and exit")
    args = parser.parse_args(argv)
    if args.show:
        print(TABLES[args.show]())
        return 0
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "README.md (generated)"))
            print("README.md is out of date: run python benchmarks/tables.py", file=sys.stderr)
            return 1
        print("README.md tables match benchmarks/results")
        return 0
    if new != old:
        README.write_text(new)
    print(f"{'rewrote' if new != old else 'unchanged:'} {len(TABLES)} tables in {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
