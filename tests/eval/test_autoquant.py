"""lowbit.autoquant: the chosen mapping, applied with quantize_, measures within the budget."""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.configs import Int4WeightOnlyConfig, Int8WeightOnlyConfig
from lowbit.eval.autoquant import AutoQuantResult, autoquant
from lowbit.eval.perplexity import perplexity
from lowbit.quantize import quantize_
from lowbit.tensors import QuantizedTensor

pytest.importorskip("glassllm")

from lowbit.eval.demo import linear_weight_bytes  # noqa: E402
from lowbit.eval.glassllm import eval_text, glassllm_tokenizer, load_glassllm  # noqa: E402

aq = sys.modules["lowbit.eval.autoquant"]  # the module (lowbit.eval.autoquant the attribute is the function)

SEQ_LEN = 128
WINDOWS = 4
BUDGET = 0.01  # perplexity within 1% of float, the default
# Tight enough that glassllm's all-smallest choice with symmetric int4 is over it on these windows
# (measured +0.5%), so the search has to upgrade layers.
TIGHT_BUDGET = 0.001
INT4, INT4_SYM = Int4WeightOnlyConfig(group_size=32), Int4WeightOnlyConfig(group_size=32, symmetric=True)
INT8 = Int8WeightOnlyConfig()


@pytest.fixture(scope="module")
def glass():
    model = load_glassllm(torch.float32)
    ids = torch.tensor(glassllm_tokenizer().encode(eval_text()[:120_000]))
    choose = ids[: WINDOWS * SEQ_LEN + 1]  # the search sees these windows only
    holdout = ids[-(WINDOWS * SEQ_LEN + 1):]  # reported, never used to choose
    return model, choose, holdout


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _measure(model, mapping, ids):
    q = quantize_(copy.deepcopy(model), mapping)
    return q, perplexity(q, ids, SEQ_LEN, WINDOWS)


@pytest.fixture(scope="module")
def int4_int8(glass):
    model, choose, holdout = glass
    before = _state(model)
    result = lowbit.autoquant(model, [INT4, INT8], choose, BUDGET, max_windows=WINDOWS, holdout=holdout)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return result


def test_mapping_measures_within_budget_and_smaller_than_all_int8(glass, int4_int8):
    model, choose, holdout = glass
    result = int4_int8
    assert isinstance(result, AutoQuantResult) and set(result) == {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    float_ppl = perplexity(model, choose, SEQ_LEN, WINDOWS)
    q, ppl = _measure(model, result, choose)  # the result is the mapping quantize_ takes
    assert ppl <= float_ppl * (1 + BUDGET)
    assert ppl == pytest.approx(result.metric, rel=1e-12) and result.float_metric == pytest.approx(float_ppl, rel=1e-12)
    # every linear named (a bare config would keep the tied head float)
    int8_bytes = linear_weight_bytes(quantize_(copy.deepcopy(model), dict.fromkeys(result, INT8)))
    assert linear_weight_bytes(q) == result.weight_bytes < int8_bytes == result.int8_bytes
    assert result.within_budget and result.holdout_metric is not None
    assert result.holdout_float_metric == pytest.approx(perplexity(model, holdout, SEQ_LEN), rel=1e-12)
    assert result.holdout_metric == pytest.approx(perplexity(q, holdout, SEQ_LEN), rel=1e-12)
    # down_proj (341 inputs) can't take int4: int8 is its smallest option.
    assert all(result[f"blocks.{i}.mlp.down_proj"] == INT8 for i in range(4))
    assert not any(isinstance(p, QuantizedTensor) for p in model.parameters())


def test_tight_budget_upgrades_layers_until_the_measured_model_fits(glass):
    model, choose, _ = glass
    result = autoquant(model, [INT4_SYM, INT8], choose, TIGHT_BUDGET, max_windows=WINDOWS)
    assert not result.evaluations[0]["within_budget"], "precondition: the all-smallest choice is over budget"
    assert result.n_upgrades > 0 and len(result.evaluations) > 1
    q, ppl = _measure(model, result, choose)
    assert ppl <= result.float_metric * (1 + TIGHT_BUDGET) and ppl == pytest.approx(result.metric, rel=1e-12)
    assert any(e["upgrades"] == result.n_upgrades and e["within_budget"] for e in result.evaluations)
    smallest = sum(min(r.results[lab].bytes for lab in result.report.labels if r.results[lab].applicable)
                   for r in result.report.rows)
    assert smallest < result.weight_bytes <= result.float_bytes
    # every upgrade applied is one of the ordered list's first n_upgrades
    assert len(result.upgrades) >= result.n_upgrades
    assert "within" in result.to_table() and "upgrades" in result.to_dict()


def test_report_is_reused_and_checked(glass, int4_int8):
    model, choose, _ = glass
    again = autoquant(model, [INT4, INT8], choose, BUDGET, max_windows=WINDOWS, report=int4_int8.report)
    assert dict(again) == dict(int4_int8) and again.metric == int4_int8.metric
    with pytest.raises(ValueError, match="not the candidates"):
        autoquant(model, [INT8, INT4], choose, BUDGET, max_windows=WINDOWS, report=int4_int8.report)
    with pytest.raises(ValueError, match="other data"):
        autoquant(model, [INT4, INT8], choose[SEQ_LEN:], BUDGET, max_windows=WINDOWS, report=int4_int8.report)


def _option(label, nbytes, damage, order=0):
    return aq._Option(None, label, nbytes, damage, order)


def test_upgrade_path_follows_the_lower_hull():
    opts = [_option("a", 10, 1.0), _option("b", 20, 0.9), _option("c", 30, 0.2), _option("d", 40, 0.0),
            _option("dominated", 35, 0.5)]
    start, path = aq._hull_path("x", opts)
    assert start.label == "a"
    assert [(u.old.label, u.new.label) for u in path] == [("a", "c"), ("c", "d")]  # b lies above the hull
    assert all(p.score >= q.score for p, q in zip(path, path[1:]))
    start, path = aq._hull_path("x", [_option("small", 1, 0.0), _option("big", 2, 0.0)])
    assert start.label == "small" and path == []  # nothing to gain


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("with_inputs", [True, False], ids=["order-by-output-sqnr", "order-by-loss"])
def test_eval_fn_for_a_model_that_is_not_an_lm(with_inputs):
    torch.manual_seed(0)
    net, x = _MLP(), torch.randn(128, 64)
    y = net(x).detach() + 0.05 * torch.randn(128, 64)

    def loss(m):
        return F.mse_loss(m(x), y).item()

    budget = 0.02
    result = autoquant(net, [INT4, INT8], eval_fn=loss, inputs=x if with_inputs else None, budget=budget)
    assert result.metric_name == "loss" and set(result) == {"fc1", "fc2", "fc3"}
    q = quantize_(copy.deepcopy(net), result)
    assert loss(q) == pytest.approx(result.metric, rel=1e-12) and loss(q) <= loss(net) * (1 + budget)
    assert (result.output_sqnr is not None) == with_inputs


def test_over_budget_without_float_fallback_warns_and_returns_the_largest():
    torch.manual_seed(0)
    net, x = _MLP(), torch.randn(64, 64)
    ref = net(x).detach()

    def loss(m):  # 1.0 for the float model, more for any change of its outputs
        return 1.0 + F.mse_loss(m(x), ref).item()

    with pytest.warns(UserWarning, match="no choice among the candidates"):
        result = autoquant(net, [INT4, INT8], eval_fn=loss, inputs=x, budget=1e-12, allow_float=False)
    assert not result.within_budget and all(config == INT8 for config in result.values())
    fallback = autoquant(net, [INT4, INT8], eval_fn=loss, inputs=x, budget=1e-12)
    assert fallback.within_budget and all(config is None for config in fallback.values())


def test_bad_arguments_name_the_argument(glass):
    model, choose, _ = glass
    with pytest.raises(ValueError, match="candidates is empty"):
        autoquant(model, [], choose)
    with pytest.raises(TypeError, match=r"candidates\[1\]='int8' is not a lowbit config"):
        autoquant(model, [INT4, "int8"], choose)
    with pytest.raises(TypeError, match="candidates must be a list"):
        autoquant(model, INT4, choose)
    with pytest.raises(ValueError, match="more than once"):
        autoquant(model, [INT8, Int8WeightOnlyConfig()], choose)
    for bad in (0, -0.01, math.nan, math.inf, True, "1%"):
        with pytest.raises(ValueError, match="budget="):
            autoquant(model, [INT8], choose, budget=bad)
    with pytest.raises(ValueError, match=r"data has 50 tokens; seq_len=128 needs at least 129"):
        autoquant(model, [INT8], choose[:50])
    with pytest.raises(ValueError, match=r"holdout has 10 tokens"):
        autoquant(model, [INT8], choose, holdout=choose[:10])
    with pytest.raises(ValueError, match="needs eval_fn"):
        autoquant(model, [INT8])
    with pytest.raises(TypeError, match="eval_fn must be callable"):
        autoquant(model, [INT8], eval_fn=1.0)
    with pytest.raises(ValueError, match="holdout"):
        autoquant(model, [INT8], choose, eval_fn=lambda m: 1.0, holdout=choose)
    with pytest.raises(ValueError, match="positive finite loss"):
        autoquant(nn.Sequential(nn.Linear(4, 4)), [INT8], eval_fn=lambda m: 0.0)
