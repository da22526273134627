"""lowbit.eval.sensitivity: per-layer SQNR and the one-layer-at-a-time sensitivity report."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.configs import Int4WeightOnlyConfig, Int8WeightOnlyConfig
from lowbit.eval.metrics import sqnr
from lowbit.eval.perplexity import perplexity
from lowbit.eval.sensitivity import SensitivityReport, layer_sqnr, sensitivity_report
from lowbit.quantize import quantize_
from lowbit.tensors import QuantizedTensor

pytest.importorskip("glassllm")
pytest.importorskip("tabulate")

from lowbit.eval.demo import linear_weight_bytes  # noqa: E402
from lowbit.eval.glassllm import eval_text, glassllm_tokenizer, load_glassllm  # noqa: E402

SEQ_LEN = 128
WINDOWS = 4
INT4, INT8 = Int4WeightOnlyConfig(group_size=32), Int8WeightOnlyConfig()

# Bounds in dB. A layer's own output with int8 per-row weights: 8 bits leave ~40 dB once the
# row max sets the scale; int4 in groups of 32 ~20 dB. Measured on glassllm: 43-52 / 21-30 dB.
INT8_LAYER_SQNR_MIN_DB = 40.0
INT4_LAYER_SQNR_MIN_DB = 18.0
# In the all-int8 model each linear's output includes the error of the layers before it (measured 38-49 dB).
INT8_IN_MODEL_SQNR_MIN_DB = 35.0
# The report's running SQNR against lowbit.eval.sqnr on the same tensors (float32 differences).
SQNR_AGREEMENT_DB = 1e-4
# Quantizing one layer alone with int8 must beat int4 on the logits for nearly every layer.
INT8_BEATS_INT4_MIN_SHARE = 0.9


@pytest.fixture(scope="module")
def glass():
    torch.manual_seed(0)
    model = load_glassllm(torch.float32)
    ids = torch.tensor(glassllm_tokenizer().encode(eval_text()[:60_000]))
    return model, ids


@pytest.fixture(scope="module")
def report(glass):
    model, ids = glass
    return sensitivity_report(model, [INT4, INT8], ids, seq_len=SEQ_LEN, max_windows=WINDOWS)


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_report_has_a_row_per_linear_and_a_column_group_per_config(glass, report):
    model, _ = glass
    assert isinstance(report, SensitivityReport)
    assert sorted(r.fqn for r in report.rows) == sorted(_linears(model))  # 28 projections + lm_head
    assert report.labels == [repr(INT4), repr(INT8)]
    for row in report.rows:
        assert set(row.results) == set(report.labels)
        assert row.float_bytes == math.prod(row.shape) * 4
        i8 = row.results[repr(INT8)]
        assert i8.applicable and i8.bytes < row.float_bytes
        assert i8.metric > 0 and math.isfinite(i8.output_sqnr) and math.isfinite(i8.layer_sqnr)


def test_layers_a_config_cannot_split_are_na_with_the_reason(report):
    na = {r.fqn: r.results[repr(INT4)] for r in report.rows if not r.results[repr(INT4)].applicable}
    assert sorted(na) == [f"blocks.{i}.mlp.down_proj" for i in range(4)]  # in_features 341
    for res in na.values():
        assert "341" in res.error and res.bytes is None and res.output_sqnr is None
    table = report.to_table()
    assert "n/a" in table and "blocks.0.mlp.down_proj" in table and "341" in table


def test_rows_are_sorted_most_sensitive_first(report):
    scores = [r.score() for r in report.rows]
    assert scores == sorted(scores)
    worst = [min(res.output_sqnr for res in r.results.values() if res.applicable) for r in report.rows]
    assert worst == sorted(worst)  # lowest logits SQNR first; every glassllm layer takes int8


def test_int8_alone_beats_int4_alone_for_most_layers(report):
    both = [r for r in report.rows if all(res.applicable for res in r.results.values())]
    better = [r for r in both if r.results[repr(INT8)].output_sqnr > r.results[repr(INT4)].output_sqnr]
    assert len(better) >= INT8_BEATS_INT4_MIN_SHARE * len(both), [r.fqn for r in both if r not in better]
    for r in report.rows:
        assert r.results[repr(INT8)].layer_sqnr >= INT8_LAYER_SQNR_MIN_DB, r.fqn
        if r.results[repr(INT4)].applicable:
            assert r.results[repr(INT4)].layer_sqnr >= INT4_LAYER_SQNR_MIN_DB, r.fqn


def test_float_metric_is_lowbit_perplexity_and_model_is_left_unchanged(glass, report):
    model, ids = glass
    assert report.float_metric == pytest.approx(perplexity(model, ids, SEQ_LEN, WINDOWS), rel=1e-12)
    assert not any(isinstance(p, QuantizedTensor) for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight  # the tied weight was put back, not copied
    row = report.row("blocks.0.attn.q_proj")
    assert row.results[repr(INT8)].delta_pct == pytest.approx(
        100 * (row.results[repr(INT8)].metric / report.float_metric - 1))


def test_one_row_matches_quantize_on_that_layer_alone(glass, report):
    model, ids = glass
    fqn = report.rows[0].fqn
    res = report.row(fqn).results[repr(INT8)]
    q = quantize_(copy.deepcopy(model), {fqn: INT8})
    windows = ids[: WINDOWS * SEQ_LEN].view(WINDOWS, SEQ_LEN)
    with torch.no_grad():
        assert res.output_sqnr == pytest.approx(sqnr(model(windows), q(windows)), abs=SQNR_AGREEMENT_DB)
    assert res.metric == pytest.approx(perplexity(q, ids, SEQ_LEN, WINDOWS), rel=1e-12)
    assert res.bytes == linear_weight_bytes(q.get_submodule(fqn))


def test_json_round_trip_and_save(report, tmp_path):
    data = json.loads(report.to_json())
    assert data["configs"] == report.labels and len(data["rows"]) == len(report.rows)
    assert data["rows"][0]["fqn"] == report.rows[0].fqn
    na = next(r for r in data["rows"] if r["fqn"] == "blocks.0.mlp.down_proj")["results"][repr(INT4)]
    assert na["error"] and na["metric"] is None
    path = report.save(tmp_path / "sens.json")
    assert json.loads(path.read_text()) == data


def test_table_is_one_line_per_layer_with_a_legend(report):
    table = report.to_table()
    assert f"A = {INT4!r}" in table and f"B = {INT8!r}" in table
    assert table.index(report.rows[0].fqn) < table.index(report.rows[-1].fqn)
    layer_lines = [line for line in table.splitlines() if line.startswith(("blocks.", "lm_head"))]
    assert len(layer_lines) == len(report.rows)


def test_layer_sqnr_of_an_int8_model(glass):
    model, ids = glass
    windows = ids[: 2 * SEQ_LEN].view(2, SEQ_LEN)
    q = quantize_(copy.deepcopy(model), INT8)
    db = layer_sqnr(model, q, windows)
    assert list(db) == _linears(model)
    assert min(db.values()) >= INT8_IN_MODEL_SQNR_MIN_DB, db
    with torch.no_grad():  # lm_head's output is the logits
        assert db["lm_head"] == pytest.approx(sqnr(model(windows), q(windows)), abs=SQNR_AGREEMENT_DB)
    assert all(v == math.inf for v in layer_sqnr(model, copy.deepcopy(model), windows).values())


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_eval_fn_mode_for_a_model_that_is_not_an_lm():
    torch.manual_seed(0)
    net, x = _MLP(), torch.randn(32, 64)
    y = net(x).detach() + 0.1 * torch.randn(32, 64)
    rep = sensitivity_report(net, [INT4, INT8], eval_fn=lambda m: F.mse_loss(m(x), y), inputs=x)
    assert rep.metric_name == "loss" and {r.fqn for r in rep.rows} == {"fc1", "fc2"}
    for r in rep.rows:
        assert r.results[repr(INT8)].output_sqnr > r.results[repr(INT4)].output_sqnr
    no_outputs = sensitivity_report(net, INT8, eval_fn=lambda m: F.mse_loss(m(x), y).item(), sort=False)
    assert [r.fqn for r in no_outputs.rows] == ["fc1", "fc2"]
    assert all(r.results[repr(INT8)].output_sqnr is None for r in no_outputs.rows)
    assert "loss %" in no_outputs.to_table()


def test_bad_arguments_name_the_argument(glass):
    model, ids = glass
    with pytest.raises(ValueError, match="configs is empty"):
        sensitivity_report(model, [], ids)
    with pytest.raises(TypeError, match=r"configs\[1\]"):
        sensitivity_report(model, [INT8, "int4"], ids)
    with pytest.raises(ValueError, match="more than once"):
        sensitivity_report(model, [INT8, Int8WeightOnlyConfig()], ids)
    with pytest.raises(ValueError, match="data has 100 tokens; seq_len=128"):
        sensitivity_report(model, INT8, ids[:100])
    with pytest.raises(TypeError, match="data must be a 1-D integer tensor"):
        sensitivity_report(model, INT8, ids.float())
    with pytest.raises(ValueError, match="needs eval_fn"):
        sensitivity_report(model, INT8)
    with pytest.raises(ValueError, match="max_windows"):
        sensitivity_report(model, INT8, ids, max_windows=0)
