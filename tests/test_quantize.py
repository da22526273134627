"""quantize_'s policy: all or nothing, group-size fallback (strict), names it can't act on, what stays float
(fused MoE experts), tied weights (glassllm), and the one summary line."""

import re
import warnings

import pytest
import torch
from torch import nn

from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.configs.base import _HANDLERS, QuantConfig, get_handler
from lowbit.eval.metrics import sqnr
from lowbit.granularity import PerGroup
from lowbit.qat import QATConfig
from lowbit.quantize import quantize_, state_bytes
from lowbit.tensors.base import QuantizedTensor

# glassllm logits, every linear and the tied head + embedding in int4 g32 (one tensor), vs float32: measured 23.2 dB
TIED_INT4_LOGITS_SQNR_DB = 21.0


def _summary(fn):
    """Run ``fn`` and return the one quantize_ summary warning's text (asserting there is exactly one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    lines = [str(w.message) for w in caught if str(w.message).startswith("quantize_: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(model: nn.Module) -> dict:
    """Everything that must be bit for bit the same after a failed quantize_."""
    return {
        "repr": repr(model),
        "types": [type(m) for m in model.modules()],
        "params": {k: (v, v.detach().clone()) for k, v in model.named_parameters(remove_duplicate=False)},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    assert repr(model) == snap["repr"]
    assert [type(m) for m in model.modules()] == snap["types"]
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params.keys() == snap["params"].keys()
    for k, (obj, value) in snap["params"].items():
        assert params[k] is obj and type(params[k]) is nn.Parameter, k  # the original parameter object is back
        assert torch.equal(params[k].detach(), value), k
    for k, v in model.named_buffers():
        assert torch.equal(v, snap["buffers"][k]), k
    assert not any(hasattr(m, "lowbit_config") or "extra_repr" in vars(m) for m in model.modules())


def _stack(widths=(64, 96, 128, 64), tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = nn.Sequential(nn.Embedding(widths[-1], widths[0]), *layers, nn.LayerNorm(widths[-1]))
    model.register_buffer("pos", torch.arange(4.0))
    if tied:  # the last linear (out=vocab) shares the embedding's (vocab, d) weight
        model.append(nn.Linear(widths[0], widths[-1], bias=False))
        model[-1].weight = model[0].weight
    return model


# --- all or nothing -----------------------------------------------------------------------------------


class _FailAtLast(QuantConfig):
    """Test config: runs ``inner``'s handler on every module, then raises at the module named ``last``."""

    def __init__(self, inner, last, exc):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "last", last)
        object.__setattr__(self, "exc", exc)

    def __repr__(self):
        return f"_FailAtLast({self.inner!r})"

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__


def _fail_at_last(module, config, fqn):
    get_handler(config.inner)(module, config.inner, fqn)
    if fqn == config.last:
        raise config.exc


@pytest.mark.parametrize("exc", [ValueError("boom at the last module"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("inner", [Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32),
                                   QATConfig(Int4WeightOnlyConfig(group_size=32))], ids=["int8wo", "int4", "qat-prepare"])
def test_a_failure_at_the_last_module_leaves_the_model_bit_for_bit(monkeypatch, inner, exc):
    """The handler of the LAST module raises after every other module was quantized (and the last one too):
    every parameter object, value, buffer, module class and repr is what it was."""
    monkeypatch.setitem(_HANDLERS, _FailAtLast, _fail_at_last)
    model = _stack(tied=True)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    snap = _snapshot(model)
    with pytest.raises(type(exc)):
        quantize_(model, {last: _FailAtLast(inner, last, exc), "re:.*": _FailAtLast(inner, last, exc)})
    _assert_unchanged(model, snap)
    quantize_(model, {last: inner, "re:.*": inner})  # and it still quantizes afterwards
    assert sum(isinstance(m, nn.Linear) and hasattr(m, "lowbit_config") or type(m).__name__.startswith("FakeQuant")
               for m in model.modules()) == 4


def test_errors_found_up_front_change_nothing():
    model = _stack()
    model[3].weight = nn.Parameter(model[3].weight.detach().to(torch.int32), requires_grad=False)
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"module '3' weight has dtype torch.int32"):
        quantize_(model, Int8WeightOnlyConfig())
    _assert_unchanged(model, snap)
    # every problem in one error: the int weight of '3' and the 1-D weight of the LayerNorm '4'
    with pytest.raises(ValueError, match=r"2 selected modules can't be quantized: .*'3'.*int32.*'4'.*2-D weight"):
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in ("1", "3", "4"))
    _assert_unchanged(model, snap)


# --- group sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, fallback", [
    (Int4WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=64)),
    (Int4WeightOnlyConfig(group_size=256, symmetric=True), Int4WeightOnlyConfig(group_size=64, symmetric=True)),
    (Int8DynamicActivationInt4WeightConfig(group_size=128), Int8DynamicActivationInt4WeightConfig(group_size=64)),
    (Float8DynamicActivationInt4WeightConfig(group_size=256), Float8DynamicActivationInt4WeightConfig(group_size=64)),
    (Int8WeightOnlyConfig(PerGroup(256)), Int8WeightOnlyConfig(PerGroup(64))),
], ids=lambda v: repr(v))
def test_a_576_wide_layer_falls_back_to_group_64(config, fallback):
    """SmolLM2's width: 576 = 64 x 9. The 576-input layer gets groups of 64 (repr and summary line say so), the
    1536-input one keeps the config; the result equals asking for group 64 on that layer; strict=True raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"strict=True: 1 module\(s\) can't take their config as given: '0': "
                                         rf"{re.escape(repr(config))} would fall back to {re.escape(repr(fallback))}"):
        quantize_(model, config, strict=True)
    _assert_unchanged(model, snap)
    ref = quantize_(_copy(model), {"0": fallback, "1": config})
    line = _summary(lambda: quantize_(model, config))
    assert line.startswith(f"quantize_: 2 module(s) quantized; 1 got a smaller group size (in_features not divisible "
                           f"by theirs: {fallback!r} x 1); left float: 0; state ")
    assert model[0].lowbit_config == fallback and model[1].lowbit_config == config
    assert f"quant={fallback!r}" in repr(model[0]) and f"quant={config!r}" in repr(model[1])
    for got, want in zip(model, ref):
        names, _ = want.weight.__tensor_flatten__()
        assert all(torch.equal(getattr(got.weight, n), getattr(want.weight, n)) for n in names)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_a_layer_no_group_fits_stays_float_and_is_named():
    """glassllm's down_proj has 341 inputs (odd): no int4 group fits; it stays float, named in the line."""
    model = nn.Sequential(nn.Linear(64, 341), nn.Linear(341, 64))
    line = _summary(lambda: quantize_(model, Int4WeightOnlyConfig(group_size=32)))
    assert "1 module(s) quantized" in line
    assert "left float: 1 that no allowed group fits (1; Int4WeightOnlyConfig(group_size=32): in_features 341 is " \
           "not divisible by group_size=32 (no smaller one is allowed))" in line
    assert isinstance(model[0].weight, QuantizedTensor) and type(model[1].weight) is nn.Parameter
    with pytest.raises(ValueError, match=r"strict=True: 1 module\(s\).*'1': .*in_features 341"):
        quantize_(nn.Sequential(nn.Linear(64, 341), nn.Linear(341, 64)), Int4WeightOnlyConfig(group_size=32),
                  strict=True)


def test_nothing_to_do_is_said():
    line = _summary(lambda: quantize_(nn.Sequential(nn.ReLU()), Int8WeightOnlyConfig()))
    assert line.startswith("quantize_: 0 module(s) quantized; left float: 0")


def test_a_clean_run_logs_its_line_instead_of_warning(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("INFO", logger="lowbit"):
            quantize_(_stack(), Int8WeightOnlyConfig())
    assert any(r.getMessage().startswith("quantize_: 3 module(s) quantized; left float: 0; state") for r in caplog.records)


# --- names and modules quantize_ can't act on ----------------------------------------------------------------


def test_a_mapping_key_filter_fn_excludes_is_an_error():
    model = _stack()
    with pytest.raises(ValueError, match=r"config mapping names module\(s\) that filter_fn does not select, so the key "
                                         r"would do nothing: '0' \(Embedding\), '4' \(LayerNorm\)"):
        quantize_(model, {"0": Int8WeightOnlyConfig(), "4": None, "1": Int8WeightOnlyConfig()})
    with pytest.raises(ValueError, match=r"'1' \(Linear\)"):
        quantize_(model, {"1": Int8WeightOnlyConfig()}, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    assert not any(hasattr(m, "lowbit_config") for m in model.modules())


class _Experts(nn.Module):
    """A fused MoE block: every expert's weights in one 3-D parameter (not nn.Linear)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 128))
        self.down_proj = nn.Parameter(torch.randn(4, 64, 32))
        self.router = nn.Linear(32, 4)


def test_fused_moe_experts_are_named_as_left_float():
    model = nn.Sequential(nn.Linear(32, 32), _Experts(), nn.Conv1d(4, 4, 3))
    line = _summary(lambda: quantize_(model, Int8WeightOnlyConfig()))
    assert "2 module(s) quantized" in line
    assert ("left float: 2 parameter(s) of 3+ dims outside nn.Linear, e.g. fused MoE experts "
            "(1.gate_up_proj [4, 32, 128], 1.down_proj [4, 64, 32])") in line
    assert "2.weight" not in line  # a convolution's weight is not an expert


# --- tied weights -------------------------------------------------------------------------------------------


def test_tied_weights_default_float_named_quantized_once():
    model = _stack(tied=True)
    line = _summary(lambda: quantize_(model, Int8WeightOnlyConfig()))
    assert "left float: 1 tied weight(s), kept float and tied (5 = 0;" in line
    assert model[5].weight is model[0].weight and type(model[0].weight) is nn.Parameter
    named = _stack(tied=True)
    quantize_(named, {"5": Int4WeightOnlyConfig(group_size=32), "re:.*": Int8WeightOnlyConfig()})
    assert named[5].weight is named[0].weight and isinstance(named[0].weight, QuantizedTensor)
    assert repr(named[0]).endswith("quant=Int4WeightOnlyConfig(group_size=32))")
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(named[0](ids), named[0].weight.dequantize()[ids])


@pytest.mark.parametrize("config", [Int8DynamicActivationInt8WeightConfig(), Int8DynamicActivationInt4WeightConfig(),
                                    Float8DynamicActivationFloat8WeightConfig()], ids=["w8a8", "8da4w", "fp8dq"])
def test_tied_head_with_activation_config_shares_one_tensor(config):
    """A config that quantizes activations on a head tied to the embedding: one quantized tensor serves both; the
    head quantizes its input as an untied head with the same config does (bit for bit), the embedding's lookup
    reads the weight's rows (a lookup has no activation)."""
    model = _stack(tied=True)
    untied = _stack(tied=True)
    untied[-1].weight = nn.Parameter(untied[0].weight.detach().clone())
    quantize_(model, {"5": config})
    quantize_(untied, {"5": config})
    head = model[5].weight
    assert head is model[0].weight and isinstance(head, QuantizedTensor) and head.act_spec is not None
    assert type(untied[0].weight) is nn.Parameter  # untied: the embedding stays float
    ids = torch.tensor([[1, 5, 7], [0, 63, 2]])
    assert torch.equal(model[0](ids), head.dequantize()[ids])
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model[5](x), untied[5](x))


def test_tied_weight_errors_change_nothing():
    model = _stack(tied=True)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"names the second with None"):
        quantize_(model, {"5": Int8WeightOnlyConfig(), "0": None},
                  filter_fn=lambda m, fqn: isinstance(m, (nn.Linear, nn.Embedding)))
    _assert_unchanged(model, snap)


def test_glassllm_tied_head_and_embedding_bytes():
    """glassllm ties lm_head to the embedding (1024 x 128). Default: both stay float and tied (one tensor); naming
    lm_head: one int4 tensor serves both, logits close to float, and the state shrinks by the embedding's bytes
    too; the summary line reports the bytes measured here."""
    pytest.importorskip("glassllm")
    pytest.importorskip("transformers")
    from lowbit.eval.models import load_glassllm_hf

    base, _ = load_glassllm_hf()
    ids = torch.randint(4, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    float_bytes = state_bytes(base)
    assert float_bytes[1] == 0
    config = Int4WeightOnlyConfig(group_size=32)
    default, _ = load_glassllm_hf()
    line = _summary(lambda: quantize_(default, config))
    assert default.lm_head.weight is default.model.embed_tokens.weight
    assert type(default.lm_head.weight) is nn.Parameter
    assert "1 tied weight(s), kept float and tied (lm_head = model.embed_tokens;" in line
    default_bytes = state_bytes(default)
    assert line.endswith(f"state {float_bytes[0] / 1e6:,.2f} MB float + 0.00 MB quantized -> "
                         f"{default_bytes[0] / 1e6:,.2f} MB float + {default_bytes[1] / 1e6:,.2f} MB quantized")

    named, _ = load_glassllm_hf()
    quantize_(named, {"lm_head": config, "re:.*": config})
    head = named.lm_head.weight
    assert head is named.model.embed_tokens.weight and isinstance(head, QuantizedTensor)
    with torch.no_grad():
        got = named(input_ids=ids).logits
    assert sqnr(ref, got) >= TIED_INT4_LOGITS_SQNR_DB
    named_bytes = state_bytes(named)
    embed = 1024 * 128 * 4
    head_q = sum(getattr(head, n).numel() * getattr(head, n).element_size() for n in head.__tensor_flatten__()[0])
    assert named_bytes[0] == default_bytes[0] - embed  # the float embedding is gone ...
    assert named_bytes[1] == default_bytes[1] + head_q  # ... and one int4 copy came instead, counted once
    assert sum(named_bytes) < sum(default_bytes) < sum(float_bytes)


def test_qat_prepare_and_convert_fall_back_alike():
    """QATConfig asks its base config: a 576-wide layer is prepared and converted at group 64, and the converted
    model equals the prepared one (reference kernels) bit for bit."""
    from lowbit.kernels.preference import KernelPreference

    base = Int4WeightOnlyConfig(kernel=KernelPreference.REFERENCE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 256), nn.Linear(256, 576))
    line = _summary(lambda: quantize_(model, QATConfig(base)))
    assert "1 got a smaller group size" in line
    assert model[0].qat_config == Int4WeightOnlyConfig(group_size=64, kernel=KernelPreference.REFERENCE)
    assert model[1].qat_config == base
    x = torch.randn(3, 576)
    with torch.no_grad():
        prepared = model(x)
    _summary(lambda: quantize_(model, QATConfig(base, step="convert")))
    assert model[0].lowbit_config.group_size == 64 and model[1].lowbit_config == base
    with torch.no_grad():
        assert torch.equal(model(x), prepared)
