"""``lowbit quantize --algorithm hqq|gptq|awq``: each writes the checkpoint the Python API makes (same codes),
calibration sources resolve, and bad flag combinations fail naming the flag."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lowbit.algorithms
from lowbit.algorithms import calibration_batches, calibration_text, gptq, quantize_hqq_
from lowbit.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from lowbit.configs import Int4WeightOnlyConfig
from lowbit.eval.perplexity import tokenize_for_perplexity
from lowbit.pretrained import from_pretrained
from lowbit.quantize import quantize_
from lowbit.tensors.base import QuantizedTensor

transformers = pytest.importorskip("transformers")
pytest.importorskip("glassllm")

CONFIG = Int4WeightOnlyConfig(group_size=32)  # glassllm's 341-wide down_proj stays float (no group fits)
ARGS = ["--config", "int4", "--group-size", "32"]
CALIB = ["--samples", "4", "--seq-len", "32"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json", "--quiet")
    assert code == EXIT_OK, err
    return json.loads(out)


def float_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def calibration(path, source="builtin:pydoc-second-half", samples=4, seq_len=32):
    """What the command feeds gptq / awq, built from the public API (glassllm's tokenizer adds no BOS)."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tt = tokenize_for_perplexity(tok, calibration_text(source))
    assert tt.prefix == ()
    return calibration_batches(tt.ids, n_samples=samples, seq_len=seq_len, seed=0)


def assert_same_weights(saved, direct, same_config=True):
    """Every linear of the reloaded checkpoint holds the same codes and qparams (or float weights) as ``direct``."""
    got, want = dict(saved.named_modules()), dict(direct.named_modules())
    n_quantized = 0
    for name, m in want.items():
        if not isinstance(m, torch.nn.Linear):
            continue
        a, b = got[name].weight, m.weight
        assert isinstance(a, QuantizedTensor) == isinstance(b, QuantizedTensor), name
        if isinstance(b, QuantizedTensor):
            assert type(a) is type(b), name
            assert not same_config or repr(got[name].lowbit_config) == repr(m.lowbit_config), name
            names, _ = b.__tensor_flatten__()
            assert a.__tensor_flatten__()[0] == names, name
            for t in names:
                assert torch.equal(getattr(a, t), getattr(b, t)), (name, t)
            n_quantized += 1
        else:
            assert torch.equal(a, b), name
    return n_quantized


@pytest.fixture(scope="module")
def gptq_direct(glassllm_dir):
    """glassllm quantized by the API: ``gptq`` on the command's default calibration text, 4 x 32 tokens."""
    model = float_model(glassllm_dir)
    with pytest.warns(UserWarning, match="gptq: 24 module"):  # the plan line: down_proj float, tied head float
        report = gptq(model, CONFIG, calibration(glassllm_dir))
    return model, report


def test_gptq_writes_the_codes_gptq_makes(tmp_path, capsys, glassllm_dir, gptq_direct):
    out = tmp_path / "gptq"
    code, stdout, err = run(capsys, "quantize", glassllm_dir, *ARGS, "--algorithm", "gptq", *CALIB, "--out", out)
    assert code == EXIT_OK, err
    direct, report = gptq_direct
    assert assert_same_weights(from_pretrained(out), direct) == 24
    # the per-layer report: damping and SQNR GPTQ vs RTN, one row per linear, then the damping line
    assert stdout.startswith(report.to_table().split("\n", 1)[0])
    assert "| model.layers.3.mlp.up_proj | 341x128 | 0.01 |" in stdout
    assert "damping raised for 0 of 24 linear(s)" in stdout
    assert "calibration: 4 x 32 tokens of builtin:pydoc-second-half" in stdout
    assert "quantized 24 modules (24 x Int4WeightOnlyConfig(group_size=32))" in stdout
    assert "gptq: 24 module(s) quantized; left float: 4 that no allowed group fits" in stdout
    assert f"load it: lowbit.from_pretrained({str(out)!r})" in stdout
    assert "gptq" in err and "block" in err  # the progress bar, on stderr
    assert "UserWarning" not in err  # the plan line is printed once, not warned
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the source's files come along
        assert (out / name).read_bytes() == (glassllm_dir / name).read_bytes()


def test_gptq_skip_json_and_a_file(tmp_path, capsys, glassllm_dir, gptq_direct):
    """--skip leaves the last block float; blocks 0-2 see the same inputs, so they get the codes of a full run.
    The calibration comes from a file holding the default builtin text: the same samples."""
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text("builtin:pydoc-second-half"), encoding="utf-8")
    r = run_json(capsys, "quantize", glassllm_dir, *ARGS, "--algorithm", "gptq", *CALIB, "--calibration", text,
                 "--skip", r"re:model\.layers\.3\..*", "--out", tmp_path / "g")
    assert r["algorithm"] == "gptq" and r["configs"] == {"Int4WeightOnlyConfig(group_size=32)": 18}
    assert r["calibration"] == {"source": str(text), "samples": 4, "seq_len": 32,
                                "text_tokens": r["calibration"]["text_tokens"],
                                "special_tokens": "no special token prepended: the tokenizer adds none"}
    assert len(r["layers"]) == 18 and r["raised_damping"] == []
    assert all(x["sqnr_db"] > x["rtn_sqnr_db"] for x in r["layers"])
    assert sorted(r["skipped"]) == sorted(f"model.layers.3.{p}" for p in
                                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    direct, _ = gptq_direct
    saved, source = from_pretrained(tmp_path / "g"), float_model(glassllm_dir)
    n = 0
    for name, m in saved.named_modules():
        if name.startswith("model.layers.3.") and isinstance(m, torch.nn.Linear):
            assert not isinstance(m.weight, QuantizedTensor) and torch.equal(m.weight, source.get_submodule(name).weight)
        elif isinstance(m, torch.nn.Linear) and isinstance(m.weight, QuantizedTensor):
            w = direct.get_submodule(name).weight
            assert torch.equal(m.weight.qdata, w.qdata) and torch.equal(m.weight.scale, w.scale), name
            assert torch.equal(m.weight.zero_point, w.zero_point), name
            n += 1
    assert n == 18


# HQQ and AWQ on block 0's attention only (the CLI's --skip, the API's mapping): each takes seconds per block
SKIP = ["--skip", r"re:model\.layers\.[1-3]\..*", "--skip", "re:.*mlp.*"]
ONLY = {r"re:model\.layers\.0\.self_attn\..*": CONFIG}


def test_gptq_qparams_minmax_writes_the_codes_gptq_minmax_makes(tmp_path, capsys, glassllm_dir):
    """--gptq-qparams minmax gives gptq(qparams="minmax")'s codes; gptq's default, the search, others."""
    r = run_json(capsys, "quantize", glassllm_dir, *ARGS, *SKIP, "--algorithm", "gptq", *CALIB,
                 "--gptq-qparams", "minmax", "--out", tmp_path / "s")
    assert r["gptq_qparams"] == "minmax" and r["configs"] == {"Int4WeightOnlyConfig(group_size=32)": 4}
    direct, default = float_model(glassllm_dir), float_model(glassllm_dir)
    gptq(direct, ONLY, calibration(glassllm_dir), qparams="minmax")
    gptq(default, ONLY, calibration(glassllm_dir))
    assert assert_same_weights(from_pretrained(tmp_path / "s"), direct, same_config=False) == 4
    q = "model.layers.0.self_attn.q_proj"  # and the default (the search) differs: not the min/max qparams
    assert not torch.equal(direct.get_submodule(q).weight.scale, default.get_submodule(q).weight.scale)


def test_gptq_qparams_needs_gptq(capsys):
    for argv in (["--algorithm", "awq"], [], ["--algorithm", "hqq"]):
        with pytest.raises(SystemExit) as e:
            main(["quantize", "x", "--config", "int4", "--out", "o", *argv, "--gptq-qparams", "search"])
        assert e.value.code == EXIT_USAGE
        assert "argument --gptq-qparams: only --algorithm gptq takes it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", "x", "--config", "int4", "--out", "o", "--algorithm", "gptq", "--gptq-qparams", "mse"])
    assert e.value.code == EXIT_USAGE
    assert "argument --gptq-qparams: invalid choice: 'mse'" in capsys.readouterr().err


def test_hqq_writes_the_codes_quantize_hqq_makes(tmp_path, capsys, glassllm_dir):
    r = run_json(capsys, "quantize", glassllm_dir, *ARGS, *SKIP, "--algorithm", "hqq", "--out", tmp_path / "h")
    assert r["algorithm"] == "hqq" and list(r["configs"].values()) == [4]
    direct = quantize_hqq_(float_model(glassllm_dir), ONLY)  # nothing notable: no warning
    rtn = quantize_(float_model(glassllm_dir), ONLY)
    saved = from_pretrained(tmp_path / "h")
    # streamed with the config's qparams="hqq" where the config has that field, else quantize_hqq_ in memory
    hqq_config = (dataclasses.replace(CONFIG, qparams="hqq") if "qparams" in {f.name for f in dataclasses.fields(CONFIG)}
                  else CONFIG)
    assert {repr(m.lowbit_config) for m in saved.modules() if hasattr(m, "lowbit_config")} == {repr(hqq_config)}
    assert assert_same_weights(saved, direct, same_config=False) == 4
    w_hqq, w_rtn = saved.model.layers[0].self_attn.q_proj.weight, rtn.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w_hqq.qdata, w_rtn.qdata)  # HQQ's qparams, not round-to-nearest's


def test_awq_writes_the_codes_awq_makes(tmp_path, capsys, glassllm_dir):
    awq = getattr(lowbit.algorithms, "awq", None)
    if awq is None:
        pytest.skip("lowbit.algorithms.awq is not there yet")
    out = tmp_path / "awq"
    code, stdout, err = run(capsys, "quantize", glassllm_dir, *ARGS, *SKIP, "--algorithm", "awq", *CALIB, "--out", out,
                            "-q")
    assert code == EXIT_OK, err
    direct = float_model(glassllm_dir)
    report = awq(direct, ONLY, calibration(glassllm_dir))
    assert stdout.startswith(report.to_table().split("\n", 1)[0])
    assert "quantized 4 modules (4 x Int4WeightOnlyConfig(group_size=32))" in stdout
    saved = from_pretrained(out)
    assert assert_same_weights(saved, direct) == 4
    want = direct.state_dict()
    for name, t in saved.state_dict().items():  # the scales AWQ folded into the norms are saved too
        if not isinstance(t, QuantizedTensor):
            assert torch.equal(t, want[name]), name
    assert not torch.equal(saved.model.layers[0].input_layernorm.weight,
                           float_model(glassllm_dir).model.layers[0].input_layernorm.weight)


def test_awq_missing_is_a_clear_error(tmp_path, capsys, glassllm_dir, monkeypatch):
    monkeypatch.delattr(lowbit.algorithms, "awq", raising=False)
    code, _, err = run(capsys, "quantize", glassllm_dir, *ARGS, "--algorithm", "awq", *CALIB, "--out", tmp_path / "a",
                       "-q")
    assert code == EXIT_ERROR
    assert err.strip() == "lowbit: error: --algorithm awq: this lowbit has no lowbit.algorithms.awq (not implemented yet)"
    assert not (tmp_path / "a").exists()


def test_calibration_defaults(tmp_path, capsys, glassllm_dir):
    """128 samples; 256 tokens, cut to glassllm's max_position_embeddings (128); pydoc's second half."""
    r = run_json(capsys, "quantize", glassllm_dir, "--config", "int8wo", "--algorithm", "gptq", "--skip",
                 r"re:model\.layers\.[1-3]\..*", "--skip", "re:.*(mlp|[kvo]_proj).*", "--out", tmp_path / "d")
    assert (r["calibration"]["source"], r["calibration"]["samples"], r["calibration"]["seq_len"]) == \
        ("builtin:pydoc-second-half", 128, 128)
    assert r["configs"] == {"Int8WeightOnlyConfig()": 1}


@pytest.mark.parametrize("argv, flag", [
    (["--calibration", "builtin:pydoc"], "--calibration"),
    (["--samples", "8"], "--samples"),
    (["--seq-len", "64"], "--seq-len"),
    (["--algorithm", "hqq", "--calibration", "builtin:pydoc"], "--calibration"),
    (["--algorithm", "hqq", "--samples", "8"], "--samples"),
])
def test_calibration_flags_without_a_data_algorithm_are_usage_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "x", "--config", "int4", "--out", "o", *argv])
    assert e.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    algorithm = "hqq" if "hqq" in argv else "rtn"
    assert err == (f"lowbit quantize: error: argument {flag}: only --algorithm gptq or awq take calibration data; "
                   f"--algorithm {algorithm} uses none (see lowbit quantize --help)")


def test_usage_errors_of_the_new_flags(capsys):
    for argv, message in [(["--algorithm", "awqq"], "argument --algorithm: invalid choice: 'awqq'"),
                          (["--algorithm", "gptq", "--samples", "0"], "argument --samples: 0 must be positive"),
                          (["--algorithm", "gptq", "--seq-len", "x"], "argument --seq-len: 'x' is not an integer")]:
        with pytest.raises(SystemExit) as e:
            main(["quantize", "x", "--config", "int4", "--out", "o", *argv])
        assert e.value.code == EXIT_USAGE
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--calibration", "builtin:nope"], "lowbit: error: --calibration builtin:nope: 'builtin:nope' is not a builtin "
     "text; available: builtin:pydoc, builtin:pydoc-first-half, builtin:pydoc-second-half, builtin:britannica, "
     "builtin:shakespeare, builtin:shakespeare:PLAY"),
    (["--calibration", "{tmp}/missing.txt"], "lowbit: error: --calibration {tmp}/missing.txt: '{tmp}/missing.txt': "
     "no such file"),
    (["--calibration", "{tmp}/short.txt"], "lowbit: error: --calibration {tmp}/short.txt: the text has"),
    (["--seq-len", "256"], "lowbit: error: --seq-len 256 is longer than the model's max_position_embeddings=128"),
    (["--config", "fp8wo"], "lowbit: error: --algorithm gptq with --config fp8wo: "),
    (["--out", "{src}"], "is the source directory"),
    (["--out", "{tmp}"], "lowbit: error: --out {tmp} is not empty (pass --overwrite to replace it)"),
    (["--strict"], "strict=True: 4 module(s) can't take their config as given"),
    (["--skip", "re:.*"], "every linear is skipped"),
    (["--skip", "model.nope"], "model.nope"),
])
def test_data_algorithm_errors_are_one_line(tmp_path, capsys, glassllm_dir, argv, message):
    (tmp_path / "short.txt").write_text("far too short")
    paths = {"tmp": str(tmp_path), "src": str(glassllm_dir)}
    argv = [a.format(**paths) for a in argv]
    base = ["quantize", glassllm_dir, *(ARGS if "--config" not in argv else []), "--algorithm", "gptq"]
    out = [] if "--out" in argv else ["--out", tmp_path / "o"]
    code, _, err = run(capsys, *base, *argv, *out, "--quiet")
    assert code == EXIT_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message.format(**paths) in lines[0], err


def test_a_lowbit_checkpoint_is_not_a_source(tmp_path, capsys, glassllm_dir):
    assert main(["quantize", str(glassllm_dir), "--config", "int8wo", "--out", str(tmp_path / "q"), "-q"]) == 0
    code, _, err = run(capsys, "quantize", tmp_path / "q", "--config", "int8wo", "--algorithm", "hqq", "--out",
                       tmp_path / "o", "-q")
    assert code == EXIT_ERROR and "is already a lowbit checkpoint; quantize its float source instead" in err


def test_hqq_needs_an_integer_weight(tmp_path, capsys, glassllm_dir):
    code, _, err = run(capsys, "quantize", glassllm_dir, "--config", "fp8wo", "--algorithm", "hqq", "--out",
                       tmp_path / "o", "-q")
    assert code == EXIT_ERROR and err.startswith("lowbit: error: --algorithm hqq with --config fp8wo: HQQ")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_samples_start_with_the_tokenizers_bos(tmp_path, capsys, glassllm_dir):
    """A tokenizer that puts BOS before a sequence (Llama 3's does) gets it before every calibration sample."""
    import shutil

    from tokenizers import processors

    bos_dir = tmp_path / "glassllm-bos"
    shutil.copytree(glassllm_dir, bos_dir)
    tok = transformers.AutoTokenizer.from_pretrained(bos_dir)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save_pretrained(bos_dir)
    only_q = ["--skip", r"re:model\.layers\.[1-3]\..*", "--skip", "re:.*(mlp|[kvo]_proj).*"]
    r = run_json(capsys, "quantize", bos_dir, *ARGS, *only_q, "--algorithm", "gptq", *CALIB, "--out", tmp_path / "q")
    assert r["calibration"]["seq_len"] == 32
    assert r["calibration"]["special_tokens"] == "each window prefixed with BOS '<bos>' (id 2), as the tokenizer does"
    tt = tokenize_for_perplexity(tok, calibration_text("builtin:pydoc-second-half"))
    samples = torch.cat([torch.full((4, 1), 2), calibration_batches(tt.ids, n_samples=4, seq_len=31, seed=0)], dim=1)
    direct = float_model(bos_dir)
    gptq(direct, {"model.layers.0.self_attn.q_proj": CONFIG}, samples)
    assert assert_same_weights(from_pretrained(tmp_path / "q"), direct) == 1
    plain = float_model(bos_dir)  # the same windows without the BOS give other codes: the test can fail
    gptq(plain, {"model.layers.0.self_attn.q_proj": CONFIG}, samples[:, 1:])
    assert not torch.equal(plain.model.layers[0].self_attn.q_proj.weight.qdata,
                           direct.model.layers[0].self_attn.q_proj.weight.qdata)
