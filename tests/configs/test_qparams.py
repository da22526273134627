"""The ``qparams`` field of the int4/int8 configs: "minmax" (default) or "hqq" (HQQ's solver,
``lowbit.primitives.hqq``). The config path makes the very tensor HQQ's solver and the primitives
make; it saves, loads, streams (``quantize_pretrained``) and trains (QAT) like any config."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.algorithms import gptq, quantize_hqq_
from lowbit.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8StaticActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.granularity import PerGroup
from lowbit.kernels.preference import KernelPreference
from lowbit.primitives.affine import quantize_affine
from lowbit.primitives.hqq import hqq_qparams
from lowbit.primitives.packing import unpack_int4
from lowbit.qat import QATConfig
from lowbit.quantize import quantize_
from lowbit.serialization import load, save
from lowbit.tensors.int4_tensor import Int4Tensor

P = 0.7  # HQQ's error norm exponent (hqq_optimize's default)
KINDS = {
    "int4-int-zp": Int4WeightOnlyConfig(group_size=32),
    "int4-float-zp": Int4WeightOnlyConfig(group_size=32, zero_point_domain="float"),
    "int4-sym": Int4WeightOnlyConfig(group_size=32, symmetric=True),
    "8da4w": Int8DynamicActivationInt4WeightConfig(group_size=32),
    "int8-row": Int8WeightOnlyConfig(),
    "int8-g32": Int8WeightOnlyConfig(PerGroup(32)),
    "w8a8": Int8DynamicActivationInt8WeightConfig(),
    "w8a8-static": Int8StaticActivationInt8WeightConfig(act_scale=0.05, act_zero_point=3),
}
HQQ = {k: dataclasses.replace(c, qparams="hqq") for k, c in KINDS.items()}


def _weight(n=32, k=128, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.02] *= 8  # a few outliers: where HQQ's p < 1 matters
    return w.to(dtype)


def _linear(w):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def _codes(t):
    return unpack_int4(t.qdata, t.spec.dtype.name == "int4") if isinstance(t, Int4Tensor) else t.qdata


def _fields(t):
    names, attrs = t.__tensor_flatten__()
    return {n: getattr(t, n) for n in names}, attrs


def _same_tensor(a, b):
    (fa, aa), (fb, ab) = _fields(a), _fields(b)
    assert type(a) is type(b) and aa == ab and a.spec == b.spec and a.act_spec == b.act_spec and a.dtype == b.dtype
    assert fa.keys() == fb.keys()
    assert all(torch.equal(fa[n], fb[n]) for n in fa), [n for n in fa if not torch.equal(fa[n], fb[n])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_config_path_is_the_solver_and_quantize_hqq_bit_for_bit(kind, dtype):
    """quantize_ with qparams="hqq" == hqq_qparams + quantize_affine, and == quantize_hqq_'s own write
    path (explicit default options: the solver's qparams written into the handler's tensor)."""
    w = _weight(dtype=dtype)
    layer = quantize_(_linear(w), HQQ[kind])
    t = layer.weight
    spec = KINDS[kind].weight_spec()
    scale, zp = hqq_qparams(w, spec)
    assert t.spec == spec and t.act_spec == KINDS[kind].act_spec()
    assert torch.equal(_codes(t), quantize_affine(w, scale, zp, spec))
    assert torch.equal(t.scale, scale) and (zp is None and t.zero_point is None or torch.equal(t.zero_point, zp))
    assert layer.lowbit_config == HQQ[kind]
    written = quantize_hqq_(_linear(w), KINDS[kind], iters=20, p=P, beta=10.0, kappa=1.01)
    _same_tensor(written.weight, t)
    assert written.lowbit_config == HQQ[kind]
    # quantize_hqq_ without options is quantize_ with the field set
    _same_tensor(quantize_hqq_(_linear(w), KINDS[kind]).weight, t)
    # and differs from round-to-nearest (else the test above proves nothing)
    assert not torch.equal(_codes(quantize_(_linear(w), KINDS[kind]).weight), _codes(t)) or \
        not torch.equal(quantize_(_linear(w), KINDS[kind]).weight.scale, t.scale)


def _objective(w, t):
    return float((w.float() - t.dequantize(torch.float32)).abs().pow(P).sum())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", list(KINDS))
def test_hqq_is_never_worse_than_minmax_on_the_objective(kind, seed):
    if KINDS[kind].weight_spec().zero_point_domain == "float":
        pytest.skip("a float zero point uses the hqq package's selection (tensor mean |error|, from the rounded "
                    "zero point), not the l_p objective: tests/algorithms/test_hqq.py::test_tensor_l1_*")
    w = _weight(seed=seed)
    rtn = quantize_(_linear(w), KINDS[kind]).weight
    hqq = quantize_(_linear(w), HQQ[kind]).weight
    assert _objective(w, hqq) <= _objective(w, rtn), (kind, seed)


@pytest.mark.parametrize("cls", [Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig, Int8WeightOnlyConfig,
                                 Int8DynamicActivationInt8WeightConfig])
@pytest.mark.parametrize("bad", ["HQQ", "gptq", "", None, 1])
def test_bad_qparams_rejected_naming_the_argument(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(qparams={bad!r}\); allowed: 'minmax', 'hqq'"):
        cls(qparams=bad)
    with pytest.raises(ValueError, match=r"qparams=.*allowed: 'minmax', 'hqq'"):
        Int8StaticActivationInt8WeightConfig(act_scale=0.1, qparams=bad)


def test_default_repr_and_configs_without_the_field():
    assert Int4WeightOnlyConfig().qparams == "minmax" and repr(Int4WeightOnlyConfig()) == "Int4WeightOnlyConfig()"
    assert repr(HQQ["8da4w"]) == "Int8DynamicActivationInt4WeightConfig(qparams='hqq')"
    for cls in (Float8WeightOnlyConfig, Float8DynamicActivationFloat8WeightConfig,
                Float8DynamicActivationInt4WeightConfig):
        assert "qparams" not in {f.name for f in dataclasses.fields(cls)}
        with pytest.raises(TypeError, match="qparams"):
            cls(qparams="hqq")
    assert "qparams" not in {f.name for f in dataclasses.fields(Float8StaticActivationFloat8WeightConfig)}
    assert Float8DynamicActivationInt4WeightConfig().scale_rule == "float8_then_int4"


def test_group_fallback_keeps_hqq():
    """A 96-wide layer under group_size=64 falls back to g32 and stays HQQ."""
    w = _weight(16, 96)
    with pytest.warns(UserWarning, match="smaller group size"):
        layer = quantize_(_linear(w), Int4WeightOnlyConfig(group_size=64, qparams="hqq"))
    assert layer.lowbit_config == Int4WeightOnlyConfig(group_size=32, qparams="hqq")
    spec = layer.lowbit_config.weight_spec()
    assert torch.equal(layer.weight.scale, hqq_qparams(w, spec)[0])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.Linear(64, 32), nn.Linear(32, 64))


MIXED = {"0": HQQ["int4-int-zp"], "2": HQQ["int4-float-zp"], "3": HQQ["8da4w"], "4": HQQ["int8-g32"]}


def test_save_load_round_trip(tmp_path):
    model = quantize_(_model(), MIXED)
    save(model, tmp_path / "m.safetensors")
    fresh = load(_model(), tmp_path / "m.safetensors")
    for name, config in MIXED.items():
        assert fresh.get_submodule(name).lowbit_config == config
        _same_tensor(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))
    # the state dict route, weights_only
    buf = tmp_path / "sd.pt"
    torch.save(model.state_dict(), buf)
    sd = torch.load(buf, weights_only=True)
    for name in MIXED:
        _same_tensor(sd[f"{name}.weight"], model.get_submodule(name).weight)


def test_a_file_written_before_the_field_loads_as_minmax(tmp_path):
    """Checkpoints written before ``qparams`` existed have no such key: the config gets the default."""
    config = {"0": KINDS["int4-int-zp"], "4": KINDS["int8-g32"]}
    model = quantize_(_model(), config)
    save(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["lowbit"])
    assert all(header["modules"][n]["qparams"] == "minmax" for n in config)
    for n in config:
        del header["modules"][n]["qparams"]
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "old.safetensors",
              metadata={"lowbit": json.dumps(header)})
    fresh = load(_model(), tmp_path / "old.safetensors")
    for n, c in config.items():
        assert fresh.get_submodule(n).lowbit_config == c and c.qparams == "minmax"
        _same_tensor(fresh.get_submodule(n).weight, model.get_submodule(n).weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["int4-int-zp", "int4-float-zp", "8da4w", "int8-g32", "w8a8"])
def test_qat_honours_hqq_prepare_equals_convert(kind, dtype):
    """QATConfig(base with qparams="hqq"): the fake quantizer runs HQQ on the weight each step, so the
    prepared output equals the converted model's with the reference kernels bit for bit."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(_weight(32, 64, dtype=dtype))
    x = torch.randn(4, 64, dtype=dtype)
    rtn = quantize_(copy.deepcopy(model), dataclasses.replace(KINDS[kind], kernel=KernelPreference.REFERENCE))
    quantize_(model, QATConfig(HQQ[kind], step="prepare"))
    with torch.no_grad():
        prepared = model(x)
    quantize_(model, QATConfig(HQQ[kind], step="convert"))
    assert model[0].lowbit_config == HQQ[kind]
    model[0].weight = nn.Parameter(model[0].weight._replace(kernel=KernelPreference.REFERENCE), requires_grad=False)
    with torch.no_grad():
        converted = model(x)
    assert torch.equal(prepared, converted)
    with torch.no_grad():
        assert not torch.equal(rtn(x), converted)  # HQQ's weight, not round-to-nearest's


def test_gptq_refuses_a_hqq_config():
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 64)]))
    with pytest.raises(NotImplementedError, match="scale rule 'hqq'"):
        gptq(model, Int4WeightOnlyConfig(group_size=32, qparams="hqq"), torch.zeros(2, 4, dtype=torch.long))


def test_quantize_hqq_mapping_errors_and_rollback():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotImplementedError, match="HQQ makes int4/int8 weights"):
        quantize_hqq_(model, {"0": KINDS["int4-int-zp"], "2": Float8WeightOnlyConfig()})
    with pytest.raises(TypeError, match="unknown options"):
        quantize_hqq_(model, KINDS["int4-int-zp"], lr=1)
    with pytest.raises(ValueError, match="p=1.5"):
        quantize_hqq_(model, {"0": KINDS["int4-int-zp"]}, p=1.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a config already set to hqq and None entries pass through
    quantize_hqq_(model, {"0": HQQ["int4-int-zp"], "2": None, "3": KINDS["8da4w"]})
    assert model[0].lowbit_config == HQQ["int4-int-zp"] and model[3].lowbit_config == HQQ["8da4w"]
    assert not hasattr(model[2], "lowbit_config")


def test_quantize_pretrained_streams_hqq_as_quantize_in_memory(tmp_path):
    """quantize_pretrained (one tensor at a time from disk, several shards) with qparams="hqq" configs ==
    quantize_ on the loaded model, bit for bit; the checkpoint records the configs."""
    transformers = pytest.importorskip("transformers")
    from lowbit.pretrained import from_pretrained, quantize_pretrained

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    src = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in src.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    src.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    config = {"re:.*mlp.*": HQQ["int4-int-zp"], "re:.*self_attn.[qk]_proj": HQQ["w8a8"],
              "re:.*self_attn.v_proj": HQQ["8da4w"], "lm_head": HQQ["int4-float-zp"], "re:.*": HQQ["int8-row"]}
    quantize_pretrained(tmp_path / "src", tmp_path / "q", config, progress=False)
    streamed = from_pretrained(tmp_path / "q")
    ref = quantize_(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", local_files_only=True).eval(),
                    config)
    configs = {n: m.lowbit_config for n, m in ref.named_modules() if hasattr(m, "lowbit_config")}
    assert configs == {n: m.lowbit_config for n, m in streamed.named_modules() if hasattr(m, "lowbit_config")}
    assert len(configs) == 15 and all(c.qparams == "hqq" for c in configs.values())
    for name in configs:
        _same_tensor(streamed.get_submodule(name).weight, ref.get_submodule(name).weight)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, ref(input_ids=ids).logits)
