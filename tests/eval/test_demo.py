"""`make demo`'s code path, in a reduced mode (glassllm only), so CI keeps the main job working."""

import json
import math

import pytest

pytest.importorskip("glassllm")
pytest.importorskip("tabulate")

import torch  # noqa: E402

from lowbit.configs import Int4WeightOnlyConfig  # noqa: E402
from lowbit.eval import demo  # noqa: E402
from lowbit.static import SmoothQuantConfig, StaticQuantConfig  # noqa: E402

WINDOWS, SEQ_LEN = 16, 128
ALGO_SAMPLES = 8
SMALL = ["--models", "glassllm", "--windows", str(WINDOWS), "--seq-len", str(SEQ_LEN), "--calib-windows", "1",
         "--reps", "1", "--autoquant-windows", "2", "--prefill", "32", "--algo-samples", str(ALGO_SAMPLES)]

# glassllm's float32 perplexity on the first 16 x 128 tokens of pydoc_data.topics: measured 411.09
# (a uniform guess over its 1,024-token vocabulary scores 1,024; a broken load is far off).
GLASSLLM_FLOAT_PPL_BAND = (300.0, 600.0)
# |perplexity change| vs float32 on those windows, in %: measured int8 weight-only -0.06,
# static int8 (per-tensor activations, 1 calibration window) +0.51, int4 g32 -0.07 (tied lm_head float),
# int4 g32 GPTQ (8 x 128 calibration tokens) +0.23 (glassllm's int4 deltas are within its noise here).
MAX_DELTA_PCT = {"int8 wo": 1.0, "W8A8 static": 2.0, "int4 g32": 2.0, "int4 g32 GPTQ": 2.0}
CONFIGS = {"int8 wo": "Int8WeightOnlyConfig()", "W8A8 static": "StaticQuantConfig()",
           "int4 g32": "Int4WeightOnlyConfig(group_size=32)",
           "int4 g32 GPTQ": "Int4WeightOnlyConfig(group_size=32) + GPTQ (lowbit.algorithms.gptq)"}
# a short label fits the plot's legend and the md table's first column
MAX_LABEL_CHARS = 22


@pytest.mark.slow
def test_demo_quick_mode_writes_its_files(tmp_path, capsys):
    import torch

    from lowbit.eval.glassllm import glassllm_tokenizer, load_glassllm
    from lowbit.eval.models import load_text
    from lowbit.eval.perplexity import perplexity, tokenize_for_perplexity

    assert demo.main([*SMALL, "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ["fp32", *CONFIGS.values(), "autoquant (1% budget)", f"wrote {tmp_path.resolve()}",
                 f"perplexity on {WINDOWS} x {SEQ_LEN} tokens of pydoc_data.topics (no special token prepended",
                 f"GPTQ/AWQ calibration {ALGO_SAMPLES} x {SEQ_LEN} from its second half"]:
        assert name in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["settings"]["windows"] == WINDOWS and saved["command"].startswith("python -m lowbit.eval.demo")
    res = saved["models"]["glassllm"]
    assert (res["windows"], res["seq_len"], res["prefix"]) == (WINDOWS, SEQ_LEN, [])
    assert res["special_tokens"] == "no special token prepended: the tokenizer adds none"
    assert res["algorithm_calibration"] == [ALGO_SAMPLES, SEQ_LEN]

    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows)[:5] == ["fp32", *MAX_DELTA_PCT]
    assert {label: rows[label]["config"] for label in CONFIGS} == CONFIGS  # the json keeps the full config
    assert rows["int4 g32 GPTQ"]["algorithm"] == "gptq" and rows["int4 g32"]["algorithm"] is None
    ref = res["rows"][0]
    lo, hi = GLASSLLM_FLOAT_PPL_BAND
    assert lo < ref["perplexity"] < hi
    text = tokenize_for_perplexity(glassllm_tokenizer(), load_text("pydoc"))  # the float row is perplexity() itself
    expected = perplexity(load_glassllm(torch.float32, attention="eager"), text.ids, SEQ_LEN, WINDOWS, batch_size=4)
    assert ref["perplexity"] == pytest.approx(expected, rel=1e-9)
    for label, bound in MAX_DELTA_PCT.items():
        r = rows[label]
        assert math.isfinite(r["perplexity"]) and abs(r["delta_pct"]) < bound, r
        assert r["delta_pct"] == pytest.approx(100 * (r["perplexity"] / ref["perplexity"] - 1), rel=1e-12)
    # a quarter of fp32 plus scales, and the tied lm_head (1024 x 128, 15% of the linear bytes) kept float32
    assert 0.36 < rows["int8 wo"]["bytes"] / ref["bytes"] < 0.38
    assert rows["int8 wo"]["note"] == "lm_head float (tied to the embedding)"
    assert rows["W8A8 static"]["note"] == "lm_head float (tied to the embedding)"  # calibrated: the same policy
    assert rows["int4 g32 GPTQ"]["bytes"] == rows["int4 g32"]["bytes"]  # GPTQ writes the same tensors
    assert rows["int4 g32 GPTQ"]["perplexity"] != rows["int4 g32"]["perplexity"]  # ... with other codes
    aq = res["autoquant"]
    assert aq["within_budget"] and aq["delta_pct"] <= 100 * demo.AUTOQUANT_BUDGET
    assert aq["weight_bytes"] < aq["int8_bytes"] and math.isfinite(res["rows"][-1]["perplexity"])
    assert (tmp_path / "glassllm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "demo.md").read_text()
    assert f"GPTQ/AWQ calibrated on {ALGO_SAMPLES} x {SEQ_LEN} tokens" in md
    assert "| int4 g32 GPTQ |" in md and "`Int4WeightOnlyConfig(group_size=32) + GPTQ (lowbit.algorithms.gptq)`" in md


@pytest.mark.parametrize("rows", [demo.demo_rows(), demo.quick_rows()], ids=["demo", "quick"])
def test_short_labels_are_unique_and_short(rows):
    labels = [r.label for r in rows]
    assert len(set(labels)) == len(labels), labels
    assert all(label.strip() == label and 0 < len(label) <= MAX_LABEL_CHARS for label in labels), labels
    assert len({r.describe() for r in rows}) == len(rows)  # the full config tells every row apart as well
    for r in rows:
        assert r.describe().startswith(repr(r.config))
        assert (r.algorithm is None) == (r.describe() == repr(r.config))


def test_hqq_and_every_calibrated_algorithm_is_in_the_demo_at_int4_g64():
    rows = demo.demo_rows()
    g64 = Int4WeightOnlyConfig(group_size=64)
    assert {r.algorithm for r in rows if r.config == g64} == {None, *demo.ALGORITHMS}
    assert any(r.config == Int4WeightOnlyConfig(group_size=64, qparams="hqq") for r in rows)
    assert any(r.algorithm == "gptq" for r in demo.quick_rows())


def test_algorithm_calibration_is_disjoint_from_the_scored_windows():
    ids = torch.arange(1000)
    calib = demo._algorithm_calibration(ids, 16, 64, (), scored_tokens=400)
    assert calib.shape == (16, 64) and calib.dtype == torch.int64
    assert torch.equal(calib - calib[:, :1], torch.arange(64).expand(16, -1))  # consecutive tokens
    assert int(calib.min()) >= 500 and int(calib.max()) < 1000  # the second half, none of the first 400
    with_bos = demo._algorithm_calibration(ids, 4, 64, (7,), scored_tokens=400)
    assert with_bos.shape == (4, 64) and torch.equal(with_bos[:, 0], torch.full((4,), 7))
    assert int(with_bos[:, 1:].min()) >= 500
    with pytest.raises(ValueError, match="scored windows .501 tokens. reach into the second half"):
        demo._algorithm_calibration(ids, 4, 64, (), scored_tokens=501)


def test_every_config_family_is_in_the_demo():
    configs = [r.config for r in demo.demo_rows()]
    names = {type(c).__name__ for c in configs}
    from lowbit.configs import registered_configs

    calibrated = {"Int8StaticActivationInt8WeightConfig", "Float8StaticActivationFloat8WeightConfig"}
    assert set(registered_configs()) - {"QATConfig"} - calibrated <= names
    assert any(isinstance(c, StaticQuantConfig) and c.dtype == "int8" for c in configs)
    assert any(isinstance(c, StaticQuantConfig) and c.dtype != "int8" for c in configs)
    assert any(isinstance(c, SmoothQuantConfig) for c in configs)


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--windows", "0"])
    with pytest.raises(SystemExit):
        demo.main(["--models", "gpt5"])
    with pytest.raises(SystemExit):
        demo.main(["--new-tokens", "-1"])
    with pytest.raises(SystemExit):
        demo.main(["--algo-samples", "0"])


def test_static_row_note_names_linears_whose_int8_inputs_round_to_zero():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    calib = torch.randn(4, 16, 32, generator=g)
    calib[0, 0, 5] = 5000.0  # one huge input: the first linear's per-tensor scale is set by it
    _, note = demo._quantized(base, demo.DemoRow("W8A8 static", StaticQuantConfig()), calib, None, lambda m: m)
    assert "1 linear(s): most static int8 inputs round to 0" in note
    _, note = demo._quantized(base, demo.DemoRow("W8A8 static", StaticQuantConfig()), calib.clamp(-4, 4), None,
                              lambda m: m)
    assert "round to 0" not in note
