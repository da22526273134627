"""benchmarks/accuracy.py's rows: every weight algorithm at int4 g64 and g128, calibrated away from the scored text."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("glassllm")

import torch  # noqa: E402

from lowbit.configs import Int4WeightOnlyConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _accuracy():
    spec = importlib.util.spec_from_file_location("lowbit_accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = _accuracy()


def test_glassllm_rows_have_each_algorithm_at_g64_and_g128():
    from lowbit.eval.glassllm import load_glassllm

    model = load_glassllm(torch.float32)
    rows = accuracy.rows_for(model, "glassllm")
    labels = [r[0] for r in rows]
    assert len(set(labels)) == len(labels), labels
    odd = {f"blocks.{i}.mlp.down_proj": None for i in range(4)}  # in_features 341: no int4 group fits
    by_label = {r[0]: r for r in rows}
    for group in accuracy.ALGO_GROUPS:
        config = Int4WeightOnlyConfig(group_size=group)
        hqq = by_label[f"Int4WeightOnlyConfig(group_size={group}, qparams='hqq')"]
        assert hqq[1] == {**odd, "re:.*": Int4WeightOnlyConfig(group_size=group, qparams="hqq")} and hqq[3] is None
        for name in accuracy.ALGORITHMS:
            label, arg, _, algorithm = by_label[f"Int4WeightOnlyConfig(group_size={group}) + {name}"]
            assert arg == {**odd, "re:.*": config} and algorithm == name


def test_a_576_wide_model_gets_g128_with_its_576_wide_layers_at_g64():
    model = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576))
    label, arg = accuracy.int4_argument(model, 128)
    assert label == "Int4WeightOnlyConfig(group_size=128), in_features 576 at group_size=64"
    assert arg == {"0": Int4WeightOnlyConfig(group_size=64), "re:.*": Int4WeightOnlyConfig(group_size=128)}
    assert accuracy.int4_argument(model, 64) == ("Int4WeightOnlyConfig(group_size=64)", Int4WeightOnlyConfig(group_size=64))


def test_algorithm_calibration_comes_from_the_second_half():
    ids = torch.arange(20_000)
    calib = accuracy.algorithm_calibration(ids, 128, (), scored_tokens=16 * 128)
    assert calib.shape == (accuracy.ALGO_SAMPLES, 128)
    assert int(calib.min()) >= 10_000 and torch.equal(calib - calib[:, :1], torch.arange(128).expand_as(calib))
    with pytest.raises(SystemExit, match="reach into the text's second half"):
        accuracy.algorithm_calibration(ids, 128, (), scored_tokens=10_001)
