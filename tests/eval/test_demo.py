"""`make demo`'s code path, in a reduced mode (glassllm only), so CI keeps the main job working."""

import json
import math

import pytest

pytest.importorskip("glassllm")
pytest.importorskip("tabulate")

from lowbit.eval import demo  # noqa: E402
from lowbit.static import SmoothQuantConfig, StaticQuantConfig  # noqa: E402

WINDOWS, SEQ_LEN = 16, 128
SMALL = ["--models", "glassllm", "--windows", str(WINDOWS), "--seq-len", str(SEQ_LEN), "--calib-windows", "1",
         "--reps", "1", "--autoquant-windows", "2", "--prefill", "32"]

# glassllm's float32 perplexity on the first 16 x 128 tokens of pydoc_data.topics: measured 411.09
# (a uniform guess over its 1,024-token vocabulary scores 1,024; a broken load is far off).
GLASSLLM_FLOAT_PPL_BAND = (300.0, 600.0)
# |perplexity change| vs float32 on those windows, in %: measured int8 weight-only -0.06,
# static int8 (per-tensor activations, 1 calibration window) +0.51, int4 g32 -0.07 (tied lm_head float).
MAX_DELTA_PCT = {"Int8WeightOnlyConfig()": 1.0, "StaticQuantConfig()": 2.0, "Int4WeightOnlyConfig(group_size=32)": 2.0}


@pytest.mark.slow
def test_demo_quick_mode_writes_its_files(tmp_path, capsys):
    import torch

    from lowbit.eval.glassllm import glassllm_tokenizer, load_glassllm
    from lowbit.eval.models import load_text
    from lowbit.eval.perplexity import perplexity, tokenize_for_perplexity

    assert demo.main([*SMALL, "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ["float32", "Int8WeightOnlyConfig()", "StaticQuantConfig()", "Int4WeightOnlyConfig(group_size=32)",
                 "autoquant (1% budget)", f"wrote {tmp_path.resolve()}",
                 f"perplexity on {WINDOWS} x {SEQ_LEN} tokens of pydoc_data.topics (no special token prepended"]:
        assert name in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["settings"]["windows"] == WINDOWS and saved["command"].startswith("python -m lowbit.eval.demo")
    res = saved["models"]["glassllm"]
    assert (res["windows"], res["seq_len"], res["prefix"]) == (WINDOWS, SEQ_LEN, [])
    assert res["special_tokens"] == "no special token prepended: the tokenizer adds none"

    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows)[:4] == ["float32 (speed: bf16)", *MAX_DELTA_PCT]
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
    assert 0.36 < rows["Int8WeightOnlyConfig()"]["bytes"] / ref["bytes"] < 0.38
    assert rows["Int8WeightOnlyConfig()"]["note"] == "lm_head float (tied to the embedding)"
    assert rows["StaticQuantConfig()"]["note"] == "lm_head float (tied to the embedding)"  # calibrated: the same policy
    aq = res["autoquant"]
    assert aq["within_budget"] and aq["delta_pct"] <= 100 * demo.AUTOQUANT_BUDGET
    assert aq["weight_bytes"] < aq["int8_bytes"] and math.isfinite(res["rows"][-1]["perplexity"])
    assert (tmp_path / "glassllm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_config_family_is_in_the_demo():
    configs = demo.demo_configs()
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
