"""smooth_(): SmoothQuant's scales folded into a float model before GPTQ or quantize_."""

import copy

import pytest
import torch

from lowbit.algorithms import gptq, smooth_
from lowbit.configs import Int8DynamicActivationInt8WeightConfig
from lowbit.eval import sqnr
from lowbit.quantize import quantize_
from lowbit.static.flow import smoothing_factors

transformers = pytest.importorskip("transformers")

# the smoothed float model against the original (float32 logits): the same function up to float32
# rounding of the folded weights
FOLDED_EQUALS_ORIGINAL_DB = 100.0


def _llama(outliers=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
        if outliers:  # a few input channels 30x larger: what SmoothQuant is for
            for layer in model.model.layers:
                layer.input_layernorm.weight[:3] = 30.0
                layer.post_attention_layernorm.weight[5:7] = 30.0
    return model


def _calib(n=8, seq=32, seed=1):
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    return model(input_ids=ids).logits


def test_folded_model_computes_the_same_function():
    model = _llama()
    ids = _calib(2, 16, seed=5)
    ref = _logits(model, ids)
    report = smooth_(model, _calib(), alpha=0.5)
    assert report.prescaled == {}
    # every q/k/v, o (GQA-tied), gate/up and down of both layers was folded
    assert len(report.folded) == 2 * 7
    assert sqnr(ref, _logits(model, ids)) >= FOLDED_EQUALS_ORIGINAL_DB


def test_scales_are_smoothquants_from_the_observed_maxima():
    model = _llama()
    calib = _calib()
    x = {}
    norm = model.model.layers[0].input_layernorm
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: x.setdefault("amax", []).append(a[0].abs().reshape(-1, 64).amax(0)))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    amax = torch.stack(x["amax"]).amax(0)
    attn = model.model.layers[0].self_attn
    want = smoothing_factors(amax, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0.5)
    w_norm = norm.weight.detach().clone()
    report = smooth_(model, calib, alpha=0.5, batch_size=len(calib))
    assert torch.equal(norm.weight.detach(), w_norm / want)
    # the s the weight columns got: weight / new weight (the norm's rounding), i.e. want to float32
    assert torch.allclose(report.scales["model.layers.0.self_attn.q_proj"], want, rtol=1e-6, atol=0)


def test_smoothing_helps_w8a8_on_outlier_channels():
    ids = _calib(2, 16, seed=5)
    base = _llama()
    ref = _logits(base, ids)
    plain = quantize_(copy.deepcopy(base), Int8DynamicActivationInt8WeightConfig())
    smoothed = copy.deepcopy(base)
    smooth_(smoothed, _calib(), alpha=0.5)
    quantize_(smoothed, Int8DynamicActivationInt8WeightConfig())
    assert sqnr(ref, _logits(smoothed, ids)) > sqnr(ref, _logits(plain, ids))


def test_then_gptq_runs_on_the_smoothed_model():
    ids = _calib(2, 16, seed=5)
    model = _llama()
    ref = _logits(model, ids)
    smooth_(model, _calib(), alpha=0.5)
    report = gptq(model, Int8DynamicActivationInt8WeightConfig(), _calib())
    assert len(report.layers) == 2 * 7 + 1  # the untied lm_head too
    assert all(r.sqnr_db >= r.rtn_sqnr_db for r in report.layers)
    assert sqnr(ref, _logits(model, ids)) > 20.0


def test_filter_fn_and_alpha_zero():
    model = _llama()
    report = smooth_(model, _calib(), alpha=0.5, filter_fn=lambda m, fqn: "mlp" in fqn)
    assert report.folded and all(".mlp." in c for c in report.folded)
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smooth_(model, _calib(), alpha=0.0, filter_fn=lambda m, fqn: False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, err, match", [
    ({"alpha": 1.5}, ValueError, r"alpha=1.5 must be a float in \[0, 1\]"),
    ({"alpha": True}, ValueError, "alpha=True"),
    ({"filter_fn": 3}, TypeError, "filter_fn must be callable"),
    ({"batch_size": 0}, ValueError, "batch_size=0"),
])
def test_errors_change_nothing(kwargs, err, match):
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        smooth_(model, _calib(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="calibration must be"):
        smooth_(model, "text")
