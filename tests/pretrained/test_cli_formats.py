"""The lowbit command on other projects' formats: export to compressed-tensors and GGUF, and eval / info /
bench / quantize reading them (glassllm, a real model, in a temp dir), with their error paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lowbit.cli import EXIT_ERROR, EXIT_OK, main

pytest.importorskip("transformers")
pytest.importorskip("glassllm")
pytest.importorskip("compressed_tensors")
pytest.importorskip("gguf")

DATA = Path(__file__).resolve().parents[1] / "data"
EVAL = ["--text", "builtin:pydoc-first-half", "--seq-len", "64", "--max-windows", "4"]
# GGUF stores each group's scale in float16: the exported model's logits stay this close to lowbit's (measured 75 dB)
GGUF_FP16_SCALE_LOGITS_SQNR_DB = 60.0


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json", "--quiet")
    assert code == EXIT_OK, err
    return json.loads(out)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def q4_dir(glassllm_dir, tmp_path_factory):
    """glassllm quantized to symmetric int4 g32 (what both compressed-tensors and GGUF Q4_0 state exactly)."""
    out = tmp_path_factory.mktemp("q4") / "q4"
    code = main(["quantize", str(glassllm_dir), "--config", "int4", "--group-size", "32", "--symmetric", "--out",
                 str(out), "--quiet"])
    assert code == EXIT_OK
    return out


@pytest.mark.slow
def test_export_compressed_tensors_then_eval_info_bench(tmp_path, capsys, q4_dir):
    ct = tmp_path / "ct"
    result = run_json(capsys, "export", q4_dir, "--format", "compressed-tensors", "--out", ct)
    assert result["source_format"] == "lowbit" and result["format"] == "compressed-tensors"
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (ct / "tokenizer.json").is_file()

    info = run_json(capsys, "info", ct)
    assert info["format"] == "compressed-tensors"
    assert sum(info["configs"].values()) == 24  # q, k, v, o, gate, up of 4 layers; down_proj (341 wide) float
    # the same codes and scales: the same perplexity, to the last bit of float32 math
    ppl_lowbit = run_json(capsys, "eval", q4_dir, *EVAL)["perplexity"]
    ppl_ct = run_json(capsys, "eval", ct, *EVAL)
    assert ppl_ct["kind"] == "compressed-tensors" and ppl_ct["perplexity"] == ppl_lowbit
    bench = run_json(capsys, "bench", ct, "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1")
    assert bench["results"][0]["kind"] == "compressed-tensors"

    code, _, err = run(capsys, "export", q4_dir, "--format", "compressed-tensors", "--out", ct)
    assert code == EXIT_ERROR and "already exists and is not empty; pass --overwrite" in one_error_line(err)
    assert run_json(capsys, "export", q4_dir, "--format", "compressed-tensors", "--out", ct, "--overwrite")["out"] == str(ct)


@pytest.mark.slow
def test_export_gguf_then_eval_info_and_reexport(tmp_path, capsys, q4_dir):
    f = tmp_path / "q4.gguf"
    result = run_json(capsys, "export", q4_dir, "--format", "gguf", "--out", f)
    assert result["files"] == ["q4.gguf"] and f.read_bytes()[:4] == b"GGUF"
    info = run_json(capsys, "info", f)
    assert info["format"] == "gguf" and sum(info["configs"].values()) == 24
    import lowbit

    ids = torch.arange(3, 67).reshape(1, -1)  # glassllm's own BPE has no GGUF equivalent: compare on the same ids
    with torch.no_grad():
        ref, got = lowbit.from_pretrained(q4_dir)(ids).logits, lowbit.from_pretrained(f)(ids).logits
    assert lowbit.sqnr(ref, got) >= GGUF_FP16_SCALE_LOGITS_SQNR_DB
    ppl_gguf = run_json(capsys, "eval", f, *EVAL)["perplexity"]  # with the file's tokenizer
    assert math.isfinite(ppl_gguf)
    # GGUF -> compressed-tensors: the formats convert into each other through lowbit's tensors
    ct = tmp_path / "from-gguf"
    assert run_json(capsys, "export", f, "--format", "compressed-tensors", "--out", ct)["source_format"] == "gguf"
    assert run_json(capsys, "eval", ct, *EVAL)["perplexity"] == ppl_gguf


@pytest.mark.slow
def test_quantize_from_a_foreign_checkpoint_dequantizes_first(tmp_path, capsys):
    out = tmp_path / "re"
    code, _, err = run(capsys, "quantize", DATA / "llmc_glassllm_w8a8", "--config", "int8wo", "--out", out)
    assert code == EXIT_OK, err
    assert "is a quantized compressed-tensors checkpoint" in err and "dequantized and quantized again" in err
    info = run_json(capsys, "info", out)
    assert info["configs"] == {"Int8WeightOnlyConfig()": 28}
    assert (out / "tokenizer.json").is_file() and not (out / "recipe.yaml").exists()


def test_export_errors_are_one_line(tmp_path, capsys, glassllm_dir):
    code, _, err = run(capsys, "export", glassllm_dir, "--format", "compressed-tensors", "--out", tmp_path / "o")
    assert code == EXIT_ERROR and "is a float transformers checkpoint: quantize it first" in one_error_line(err)
    code, _, err = run(capsys, "export", DATA / "llmc_glassllm_w4a16", "--format", "gguf", "--out", tmp_path / "o.bin")
    assert code == EXIT_ERROR and "name it *.gguf" in one_error_line(err)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    code, _, err = run(capsys, "eval", bad, *EVAL, "--quiet")
    assert code == EXIT_ERROR and "is a file but not a GGUF file" in one_error_line(err)
    code, _, err = run(capsys, "export", tmp_path / "nope", "--format", "gguf", "--out", tmp_path / "o.gguf")
    assert code == EXIT_ERROR and one_error_line(err).endswith("does not exist")


def test_info_kernels(capsys):
    info = run_json(capsys, "info", "--kernels")
    assert set(info["kernels"]) >= {"int4_cpu", "int8_gemv"}
    code, out, _ = run(capsys, "info", "--kernels")
    assert code == EXIT_OK and "C++ kernel" in out and "int4_cpu" in out
    if info["kernels"]["int8_gemv"].startswith("ok"):
        assert "weight-stream prefetch (int8_gemv and the kernels not measured apart)" in info["cpu_paths"]
    code, _, err = run(capsys, "info")
    assert code == EXIT_ERROR and "needs a CHECKPOINT (or --kernels)" in one_error_line(err)


def test_from_pretrained_dispatch(tmp_path):
    import lowbit

    assert lowbit.formats.detect_format(DATA / "llmc_glassllm_w4a16") == "compressed-tensors"
    assert lowbit.formats.detect_format(DATA / "llama_tiny_v1") == "lowbit"
    (tmp_path / "config.json").write_text("{}")
    assert lowbit.formats.detect_format(tmp_path) == "transformers"
    with pytest.raises(ValueError, match="float transformers checkpoint, not a quantized one"):
        lowbit.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="format='onnx'; allowed: 'compressed-tensors', 'gguf'"):
        lowbit.export(torch.nn.Linear(2, 2), tmp_path / "o", "onnx")
    with pytest.raises(TypeError, match="model_or_path must be an nn.Module or a checkpoint path, got int"):
        lowbit.export(3, tmp_path / "o")
