"""`make demo`'s code path, in a reduced mode (glassllm only), so CI keeps the main job working."""

import json

import pytest

pytest.importorskip("glassllm")
pytest.importorskip("tabulate")

from lowbit.eval import demo  # noqa: E402
from lowbit.static import SmoothQuantConfig, StaticQuantConfig  # noqa: E402

SMALL = ["--models", "glassllm", "--windows", "2", "--seq-len", "64", "--calib-windows", "1", "--reps", "1",
         "--autoquant-windows", "2", "--prefill", "32"]


@pytest.mark.slow
def test_demo_quick_mode_writes_its_files(tmp_path, capsys):
    assert demo.main([*SMALL, "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ["float32", "Int8WeightOnlyConfig()", "StaticQuantConfig()", "Int4WeightOnlyConfig(group_size=32)",
                 "autoquant (1% budget)", f"wrote {tmp_path.resolve()}"]:
        assert name in out
    res = json.loads((tmp_path / "demo.json").read_text())["glassllm"]
    int8 = next(r for r in res["rows"] if r["label"] == "Int8WeightOnlyConfig()")
    assert 0.25 < int8["bytes"] / res["rows"][0]["bytes"] < 0.27  # int8 per-row: a quarter of fp32, plus scales
    assert res["autoquant"]["within_budget"] and res["autoquant"]["weight_bytes"] < res["autoquant"]["int8_bytes"]
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
