"""`make demo`'s code path, in a reduced mode, so CI keeps the main job working."""

import pytest

pytest.importorskip("glassllm")
pytest.importorskip("tabulate")

from lowbit.eval import demo  # noqa: E402


@pytest.mark.slow
def test_demo_runs_and_reports_every_config(capsys):
    assert demo.main(["--windows", "2", "--seq-len", "64", "--calib-windows", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for name in [
        "fp32",
        "Int8WeightOnlyConfig()",
        "Int8WeightOnlyConfig(PerGroup(32))",
        "Int8DynamicActivationInt8WeightConfig()",
        "Int8DynamicActivationInt8WeightConfig(act_symmetric=False)",
        "Int8StaticActivationInt8WeightConfig",
        "Int4WeightOnlyConfig(group_size=32)",
        "Int4WeightOnlyConfig()",
        "Int8DynamicActivationInt4WeightConfig()",
        "Float8DynamicActivationInt4WeightConfig(group_size=32)",
        "Float8WeightOnlyConfig()",
        "Float8DynamicActivationFloat8WeightConfig(PerRow())",
    ]:
        assert name in out
    assert "0.26x" in out  # int8 per-row weights: a quarter of the fp32 bytes


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--seq-len", "500"])
    with pytest.raises(SystemExit):
        demo.main(["--windows", "0"])
