"""The lowbit command end to end on glassllm (a real model, in a temp dir), and every error path."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from lowbit.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, build_config, config_names, main
from lowbit.eval.models import load_text
from lowbit.pretrained import from_pretrained
from lowbit.serialization import FORMAT_VERSION

transformers = pytest.importorskip("transformers")
pytest.importorskip("glassllm")

# perplexity of glassllm on 8 windows x 64 tokens of pydoc: int8 weight-only stays this close to float
INT8WO_PPL_REL_TOL = 0.005


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json", "--quiet")
    assert code == EXIT_OK, err
    return json.loads(out)


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.slow
def test_quantize_info_eval_reload_end_to_end(tmp_path, capsys, glassllm_dir):
    out_dir = tmp_path / "g8"
    code, out, err = run(capsys, "quantize", glassllm_dir, "--config", "int8wo", "--out", out_dir)
    assert code == EXIT_OK, err
    assert "quantized 28 modules (28 x Int8WeightOnlyConfig())" in out  # the tied lm_head stays float
    assert "left float: 1 tied weight(s), kept float and tied (lm_head = model.embed_tokens" in out
    assert f"lowbit: quantizing {glassllm_dir}" in err and f"lowbit: wrote {out_dir}" in err  # progress on stderr

    info = run_json(capsys, "info", out_dir)
    assert info["configs"] == {"Int8WeightOnlyConfig()": 28} and info["format_version"] == FORMAT_VERSION
    code, out, _ = run(capsys, "info", out_dir, "--modules")
    assert "| Int8WeightOnlyConfig() |        28 |" in out and "model.layers.3.mlp.down_proj" in out

    text = ["--text", "builtin:pydoc", "--seq-len", "64", "--max-windows", "8"]
    ref = run_json(capsys, "eval", glassllm_dir, *text)
    got = run_json(capsys, "eval", out_dir, *text)
    assert ref["kind"] == "float" and got["kind"] == "lowbit" and got["tokens_scored"] == 512
    assert abs(got["perplexity"] / ref["perplexity"] - 1) < INT8WO_PPL_REL_TOL, (got, ref)

    model = from_pretrained(out_dir)  # reload in Python: generate works, same greedy tokens as quantize_
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = torch.tensor([tok("It is a truth universally")["input_ids"]])
    from lowbit import Int8WeightOnlyConfig, quantize_

    ref_model = quantize_(transformers.AutoModelForCausalLM.from_pretrained(glassllm_dir).eval(), Int8WeightOnlyConfig())
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref_model.generate(ids, **kw))


@pytest.mark.slow
def test_quantize_int4_skip_json_and_report_and_bench(tmp_path, capsys, glassllm_dir):
    r = run_json(capsys, "quantize", glassllm_dir, "--config", "Int4WeightOnlyConfig", "--group-size", "32",
                 "--skip", "lm_head", "--skip", "re:.*down_proj", "--out", tmp_path / "g4")  # 341 inputs: odd
    assert r["configs"] == {"Int4WeightOnlyConfig(group_size=32)": 24}
    assert sorted(r["skipped"]) == ["lm_head"] + [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    assert r["output_bytes"] < r["source_bytes"]

    rep = run_json(capsys, "report", glassllm_dir, "--config", "int4", "--group-size", "32", "--text", "builtin:pydoc",
                   "--max-windows", "1", "--seq-len", "32")
    assert len(rep["rows"]) == 29 and rep["configs"] == ["Int4WeightOnlyConfig(group_size=32)"]
    code, out, _ = run(capsys, "report", glassllm_dir, "--config", "w8a8", "--text", "builtin:pydoc",
                       "--max-windows", "1", "--seq-len", "32", "--top", "3", "--quiet")
    assert code == EXIT_OK and "A = Int8DynamicActivationInt8WeightConfig()" in out

    b = run_json(capsys, "bench", tmp_path / "g4", "--against", glassllm_dir, "--prompt-len", "16",
                 "--new-tokens", "3", "--repeats", "2")
    assert (b["prompt_len"], b["new_tokens"], b["repeats"], b["threads"]) == (16, 3, 2, torch.get_num_threads())
    assert [(x["model_dir"], x["kind"]) for x in b["results"]] == [(str(tmp_path / "g4"), "lowbit"),
                                                                    (str(glassllm_dir), "float")]
    for r in b["results"]:  # both timed, every run; the tokens each run fed and decoded; rates from the times
        assert (r["prefill_tokens"], r["decode_tokens"]) == (16, 3)
        assert len(r["prefill_ms_runs"]) == len(r["decode_ms_runs"]) == 2
        assert all(0 < t < 60_000 for t in r["prefill_ms_runs"] + r["decode_ms_runs"])
        assert r["prefill_ms"] == pytest.approx(statistics.median(r["prefill_ms_runs"]), rel=1e-12)
        assert r["decode_ms_per_token"] == pytest.approx(statistics.median(r["decode_ms_runs"]) / 3, rel=1e-12)
        assert r["prefill_tokens_per_s"] == pytest.approx(16e3 / r["prefill_ms"], rel=1e-12)
        assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms_per_token"], rel=1e-12)
    quant, ref = b["results"]
    assert b["prefill_speedup"] == pytest.approx(ref["prefill_ms"] / quant["prefill_ms"], rel=1e-12)
    assert b["decode_speedup"] == pytest.approx(ref["decode_ms_per_token"] / quant["decode_ms_per_token"], rel=1e-12)
    code, out, _ = run(capsys, "bench", glassllm_dir, "--prompt-len", "8", "--new-tokens", "0", "--repeats", "1", "-q")
    assert code == EXIT_OK and " vs " not in out and "float" in out  # one model: no ratio line


def test_eval_prepends_what_the_tokenizer_adds(tmp_path, capsys, glassllm_dir):
    from tokenizers import processors

    bos_dir = tmp_path / "glassllm-bos"  # the same model; its tokenizer now adds <bos> (id 2), as Llama 3's does
    shutil.copytree(glassllm_dir, bos_dir)
    tok = transformers.AutoTokenizer.from_pretrained(bos_dir)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save_pretrained(bos_dir)
    text = ["--text", "builtin:pydoc", "--seq-len", "32", "--max-windows", "2"]

    plain = run_json(capsys, "eval", glassllm_dir, *text)
    assert plain["prefix"] == [] and plain["special_tokens"] == "no special token prepended: the tokenizer adds none"
    with_bos = run_json(capsys, "eval", bos_dir, *text)
    assert with_bos["prefix"] == [2] and with_bos["tokens_scored"] == 64
    assert with_bos["special_tokens"] == "each window prefixed with BOS '<bos>' (id 2), as the tokenizer does"

    # what the model is fed: BOS, then the text's tokens (scored from BOS on)
    model = transformers.AutoModelForCausalLM.from_pretrained(bos_dir).eval()
    ids = torch.tensor(tok(load_text("pydoc"), add_special_tokens=False)["input_ids"][:64]).view(2, 32)
    x = torch.cat([torch.full((2, 1), 2), ids[:, :-1]], dim=1)
    logp = model(input_ids=x).logits.double().log_softmax(-1)
    expected = math.exp(-logp.gather(-1, ids.unsqueeze(-1)).mean().item())
    assert with_bos["perplexity"] == pytest.approx(expected, rel=1e-6) and with_bos["perplexity"] != plain["perplexity"]

    code, out, _ = run(capsys, "eval", bos_dir, *text, "--quiet")
    assert code == EXIT_OK and "windows: 2 x 32 tokens, each window prefixed with BOS '<bos>' (id 2)" in out


def test_config_names_match_the_python_api():
    from lowbit import Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerGroup

    assert build_config("int4", group_size=64, symmetric=True) == Int4WeightOnlyConfig(group_size=64, symmetric=True)
    assert build_config("Int4WeightOnlyConfig") == Int4WeightOnlyConfig()
    assert build_config("int8wo", group_size=32) == Int8WeightOnlyConfig(PerGroup(32))
    assert build_config("fp8", float8_dtype="e5m2") == Float8DynamicActivationFloat8WeightConfig(dtype=torch.float8_e5m2)
    for name in config_names():
        build_config(name)  # every advertised name builds with its defaults


# --- error paths: one line on stderr, documented exit codes -------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "{tmp}/nope", "--config", "int8wo", "--out", "{tmp}/o"], "lowbit: error: {tmp}/nope does not exist"),
        (["quantize", "{tmp}/file.txt", "--config", "int8wo", "--out", "{tmp}/o"], "is a file but not a GGUF file"),
        (["quantize", "{tmp}", "--config", "int8wo", "--out", "{tmp}/o"], "has no config.json"),
        (["quantize", "{src}", "--config", "int5", "--out", "{tmp}/o"], "--config 'int5' is unknown; allowed: 8da4w"),
        (["quantize", "{src}", "--config", "Int8StaticActivationInt8WeightConfig", "--out", "{tmp}/o"],
         "needs activation scales from calibration"),
        (["quantize", "{src}", "--config", "int4", "--group-size", "48", "--out", "{tmp}/o"], "group_size=48"),
        (["quantize", "{src}", "--config", "int4", "--strict", "--out", "{tmp}/o"],
         "strict=True: 4 module(s) can't take their config as given: 'model.layers.0.mlp.down_proj', "),
        (["quantize", "{src}", "--config", "8da4w", "--granularity", "per-row", "--out", "{tmp}/o"],
         "--granularity does not apply to Int8DynamicActivationInt4WeightConfig"),
        (["quantize", "{src}", "--config", "int8wo", "--skip", "re:(", "--out", "{tmp}/o"], "not a valid regex"),
        (["quantize", "{src}", "--config", "int8wo", "--skip", "re:.*", "--out", "{tmp}/o"], "every linear is skipped"),
        (["quantize", "{gpt2}", "--config", "int8wo", "--out", "{tmp}/o"], "has no nn.Linear modules to quantize"),
        (["quantize", "{src}", "--config", "int8wo", "--out", "{src}"], "is the source directory"),
        (["quantize", "{src}", "--config", "int8wo", "--out", "{tmp}"], "is not empty"),
        (["info", "{tmp}/nope"], "does not exist"),
        (["info", "{src}"], "is not a lowbit checkpoint"),
        (["info", "{newer}"], f"format_version={FORMAT_VERSION + 1}; this lowbit (0.1.0) reads versions "
                              f"1..{FORMAT_VERSION}: upgrade lowbit"),
        (["eval", "{newer}", "--text", "builtin:pydoc"], f"format_version={FORMAT_VERSION + 1}"),
        (["eval", "{src}", "--text", "{tmp}/missing.txt"], "--text {tmp}/missing.txt: no such file"),
        (["eval", "{src}", "--text", "builtin:nope"], "--text builtin:nope"),
        (["eval", "{src}", "--text", "{tmp}/file.txt", "--seq-len", "64"], "needs at least 65"),
        (["eval", "{src}", "--text", "{tmp}/binary.txt"], "is not UTF-8 text"),
        (["report", "{q}", "--config", "int8wo", "--text", "builtin:pydoc"], "already quantized"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, glassllm_dir, argv, message):
    tmp = tmp_path
    (tmp / "file.txt").write_text("a short text")
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    paths = {"tmp": str(tmp), "src": str(glassllm_dir), "gpt2": str(tmp / "gpt2"), "newer": str(tmp / "newer"),
             "q": str(tmp / "q")}
    if "{gpt2}" in " ".join(argv):
        config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                         architectures=["GPT2Model"])
        transformers.GPT2Model(config).save_pretrained(tmp / "gpt2")
    if "{newer}" in " ".join(argv) or "{q}" in " ".join(argv):
        assert main(["quantize", str(glassllm_dir), "--config", "int8wo", "--out", str(tmp / "q"), "-q"]) == 0
        shutil.copytree(tmp / "q", tmp / "newer")
        cfg = json.loads((tmp / "newer" / "config.json").read_text())
        cfg["lowbit"]["format_version"] = FORMAT_VERSION + 1
        (tmp / "newer" / "config.json").write_text(json.dumps(cfg))
        capsys.readouterr()
    code, _, err = run(capsys, *[a.format(**paths) for a in argv], "--quiet")
    assert code == EXIT_ERROR, err
    line = one_error_line(err)
    assert line.startswith("lowbit: error: ") and message.format(**paths) in line, line


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["quantize", "x"], "the following arguments are required: --config, --out"),
    (["eval", "x", "--text", "t", "--seq-len", "0"], "argument --seq-len: 0 must be positive"),
    (["quantize", "x", "--config", "int4", "--out", "o", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "--help" in line


def test_debug_shows_the_traceback(tmp_path):
    from lowbit.cli import CLIError

    with pytest.raises(CLIError, match="does not exist"):
        main(["info", str(tmp_path / "nope"), "--debug"])


def test_console_script_runs(tmp_path):
    """The installed entry point (python -m lowbit.cli is the same main): exit code and one stderr line."""
    exe = shutil.which("lowbit")
    cmd = [exe] if exe else [sys.executable, "-m", "lowbit.cli"]
    r = subprocess.run(cmd + ["info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == EXIT_ERROR and r.stdout == ""
    assert one_error_line(r.stderr) == f"lowbit: error: {tmp_path / 'nope'} does not exist"
    r = subprocess.run(cmd + ["--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("lowbit ")
