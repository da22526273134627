"""The ``lowbit`` command: quantize, eval, bench, report and info on transformers checkpoints.

    lowbit quantize MODEL_DIR --config int4 --group-size 128 --skip 're:.*lm_head' --out OUT_DIR
    lowbit quantize MODEL_DIR --config int4 --algorithm gptq --calibration builtin:pydoc-second-half --out OUT_DIR
    lowbit eval MODEL_DIR --text FILE            # perplexity (a float or a lowbit checkpoint)
    lowbit bench MODEL_DIR [--against DIR]       # prefill and decode tokens/s (and the ratio)
    lowbit report MODEL_DIR --config int8wo --config int4 --text FILE    # per-layer sensitivity
    lowbit export SRC --format compressed-tensors --out DIR   # for vLLM / SGLang (or --format gguf --out F.gguf)
    lowbit info CHECKPOINT                       # format version, configs per layer, sizes
    lowbit info --kernels                        # which C++ CPU kernels run on this machine

Every MODEL / SRC may be a transformers directory, a lowbit checkpoint, a compressed-tensors directory
(llm-compressor, GPTQModel, AutoAWQ) or a GGUF file (llama.cpp); quantized ones load with their own codes.

Exit codes: 0 success; 1 an error in the input (missing path, unknown config, a model with no
linears, a checkpoint from a newer lowbit...), printed as one line ``lowbit: error: ...``;
2 bad command-line usage (one line); 3 an unexpected internal error (one line; ``--debug`` shows
the traceback for every error); 130 interrupted. Progress bars go to stderr, results to stdout
(``--json``: one JSON object).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# CLI name -> config class name; every class name is accepted as well (as in the Python API)
CONFIG_ALIASES = {
    "int8wo": "Int8WeightOnlyConfig",
    "int8": "Int8WeightOnlyConfig",
    "w8a8": "Int8DynamicActivationInt8WeightConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig",
    "int4": "Int4WeightOnlyConfig",
    "8da4w": "Int8DynamicActivationInt4WeightConfig",
    "fp8wo": "Float8WeightOnlyConfig",
    "fp8": "Float8DynamicActivationFloat8WeightConfig",
    "fp8dq": "Float8DynamicActivationFloat8WeightConfig",
    "fp8a-int4w": "Float8DynamicActivationInt4WeightConfig",
}
_CALIBRATED = {"Int8StaticActivationInt8WeightConfig", "Float8StaticActivationFloat8WeightConfig"}


class CLIError(Exception):
    """An error in what the user asked for: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (with a pointer to --help) and exit 2."""

    def error(self, message: str):  # noqa: D102
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


# --- configs ------------------------------------------------------------------------------------------


def _config_classes() -> dict[str, type]:
    from lowbit.configs.base import config_classes

    return {c.__name__: c for c in config_classes() if c.__name__ != "QATConfig"}


def config_names() -> list[str]:
    """Every name ``--config`` accepts."""
    return sorted(CONFIG_ALIASES) + sorted(n for n in _config_classes() if n not in _CALIBRATED)


def build_config(name: str, *, group_size: int | None = None, granularity: str | None = None,
                 symmetric: bool | None = None, float8_dtype: str | None = None):
    """The config ``--config NAME`` and its options describe (the options map onto the class's fields).

    Raises:
        CLIError: an unknown name, a config that needs calibration, or an option the config lacks.
    """
    from lowbit.granularity import PerGroup, PerRow, PerTensor

    classes = _config_classes()
    cls_name = CONFIG_ALIASES.get(name.lower(), name)
    if cls_name not in classes:
        raise CLIError(f"--config {name!r} is unknown; allowed: {', '.join(config_names())}")
    if cls_name in _CALIBRATED:
        raise CLIError(f"--config {name!r} needs activation scales from calibration: use lowbit.static.prepare / "
                       "convert in Python (or the dynamic config: w8a8, fp8)")
    cls = classes[cls_name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict = {}
    if group_size is not None:
        if "group_size" in fields:
            kwargs["group_size"] = group_size
        elif "granularity" in fields and granularity in (None, "per-group"):
            kwargs["granularity"] = PerGroup(group_size)
        else:
            raise CLIError(f"--group-size does not apply to {cls_name}")
    if granularity is not None and "granularity" not in kwargs:
        if "granularity" not in fields:
            raise CLIError(f"--granularity does not apply to {cls_name} (it has group_size)")
        choices = {"per-row": PerRow(), "per-tensor": PerTensor()}
        if granularity == "per-group":
            raise CLIError("--granularity per-group needs --group-size N")
        kwargs["granularity"] = choices[granularity]
    if symmetric is not None:
        key = "symmetric" if "symmetric" in fields else "act_symmetric" if "act_symmetric" in fields else None
        if key is None:
            raise CLIError(f"--symmetric/--asymmetric does not apply to {cls_name}")
        kwargs[key] = symmetric
    if float8_dtype is not None:
        if "dtype" not in fields:
            raise CLIError(f"--float8-dtype does not apply to {cls_name}")
        kwargs["dtype"] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[float8_dtype]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from e


def _add_config_options(p: argparse.ArgumentParser, repeat: bool = False) -> None:
    help_ = f"config name: {', '.join(sorted(CONFIG_ALIASES))} or a class name (Int4WeightOnlyConfig, ...)"
    if repeat:
        p.add_argument("--config", action="append", required=True, metavar="NAME", help=help_ + "; repeatable")
    else:
        p.add_argument("--config", required=True, metavar="NAME", help=help_)
    p.add_argument("--group-size", type=int, metavar="N", help="group_size (int4 configs) or PerGroup(N) (int8wo)")
    p.add_argument("--granularity", choices=["per-row", "per-tensor", "per-group"],
                   help="weight granularity of int8 / float8 configs")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="int4: symmetric; w8a8: symmetric activations")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--float8-dtype", choices=["e4m3", "e5m2"], help="float8 configs: the float8 format")


def _configs_from(args) -> list:
    names = args.config if isinstance(args.config, list) else [args.config]
    return [build_config(n, group_size=args.group_size, granularity=args.granularity, symmetric=args.symmetric,
                         float8_dtype=args.float8_dtype) for n in names]


# --- loading ------------------------------------------------------------------------------------------




def _existing_source(path: str) -> tuple[Path, str]:
    """``(path, kind)`` for a model source: a transformers or lowbit directory, a compressed-tensors
    directory or a GGUF file (``kind`` as ``lowbit.formats.detect_format`` says)."""
    from lowbit.formats import detect_format

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p} does not exist")
    if p.is_dir() and not (p / "config.json").is_file() and not any(p.glob("*.gguf")):
        raise CLIError(f"{p} has no config.json: not a transformers model directory (nor a folder with a GGUF file)")
    try:
        return p, detect_format(p)
    except ValueError as e:
        raise CLIError(str(e)) from e


def load_model(path: str, dtype: str = "auto"):
    """``(model, tokenizer or None, kind)`` for a float transformers directory (kind ``"float"``), a lowbit
    checkpoint, a compressed-tensors directory or a GGUF file (kinds ``"lowbit"``, ``"compressed-tensors"``,
    ``"gguf"``: loaded by ``lowbit.from_pretrained`` with the file's own codes and scales)."""
    from lowbit.formats import from_pretrained
    from lowbit.pretrained.checkpoint import _resolve_dtype, _transformers

    p, kind = _existing_source(path)
    tf = _transformers()
    tf.logging.set_verbosity_error()  # its info lines and weight-loading bars would drown ours
    tf.utils.logging.disable_progress_bar()
    if kind == "transformers":
        with open(p / "config.json") as f:
            torch_dtype = _resolve_dtype(dtype, json.load(f))
        model = tf.AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, local_files_only=True).eval()
        kind = "float"
    else:
        if dtype != "auto":
            raise CLIError(f"--dtype {dtype}: {p} is a quantized {kind} checkpoint, whose dtype is fixed by the file")
        model = from_pretrained(p)
    try:
        if kind == "gguf":
            from lowbit.formats import _gguf_file
            from lowbit.formats.gguf import gguf_tokenizer

            tok = gguf_tokenizer(_gguf_file(p))
        else:
            tok = tf.AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model, tok, kind


def _read_text(spec: str) -> str:
    from lowbit.algorithms.calibration import BUILTIN_TEXTS, calibration_text

    if spec.startswith("builtin:"):
        try:
            return calibration_text(spec)
        except ValueError as e:
            raise CLIError(f"--text {spec}: {e}") from e
    p = Path(spec)
    if not p.is_file():
        raise CLIError(f"--text {spec}: no such file (or builtin:NAME: {', '.join(BUILTIN_TEXTS)})")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"--text {spec} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _tokenized(tok, text: str, seq_len: int, max_windows: int | None, what: str):
    """(the text's tokens with the tokenizer's prefix and note, windows scored), as ``lowbit.eval`` takes them."""
    from lowbit.eval.perplexity import perplexity_windows, tokenize_for_perplexity

    if tok is None:
        raise CLIError(f"{what} has no tokenizer files: eval needs one to turn --text into tokens")
    tt = tokenize_for_perplexity(tok, text)
    try:
        _, targets = perplexity_windows(tt.ids, seq_len, max_windows, prefix=tt.prefix, name="--text")
    except ValueError as e:
        raise CLIError(str(e).replace("seq_len=", "--seq-len ")) from e
    return tt, targets.shape[0]


class _Logits(torch.nn.Module):
    """``model(ids) -> logits`` for transformers causal LMs, ticking a progress bar per call."""

    def __init__(self, model, bar=None):
        super().__init__()
        self.model, self.bar = model, bar

    def forward(self, ids):
        out = self.model(input_ids=ids, use_cache=False).logits
        if self.bar is not None:
            self.bar.update(ids.shape[0])
        return out


def _bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=not enabled)


def _say(args, msg: str) -> None:
    """A progress line on stderr (silent with --quiet)."""
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# --- commands -----------------------------------------------------------------------------------------


def _kernel_rows() -> list[list[str]]:
    """One row per compiled CPU kernel: its name, its status (``ok (<isa>)``, or why it does not run here) and
    the builds it has with the CPU features each needs."""
    from lowbit.kernels._ext import BUILDS, ISA_ENV, forced_isa, status

    st = status()
    rows = [[name, st[name], "; ".join(f"{b.isa}: {', '.join(b.features)}" for b in builds)]
            for name, builds in BUILDS.items()]
    if forced_isa():
        rows.append([ISA_ENV, f"{forced_isa()} forced", ""])
    return rows


def cmd_info(args) -> dict:
    from lowbit.pretrained import checkpoint_info

    if args.kernels:
        rows = _kernel_rows()
        if not args.json:
            from tabulate import tabulate

            print(tabulate(rows, headers=["C++ kernel", "status", "builds (CPU features)"], tablefmt="github"))
        from lowbit.kernels import host, prefetch

        paths = host.host_report() + prefetch.report()
        if not args.json:
            print()
            print(tabulate(paths, headers=["CPU path", "choice"], tablefmt="github"))
        if args.checkpoint is None:
            return {"kernels": {r[0]: r[1] for r in rows}, "cpu_paths": dict(paths)}
    elif args.checkpoint is None:
        raise CLIError("info needs a CHECKPOINT (or --kernels)")
    p = Path(args.checkpoint)
    if not p.exists():
        raise CLIError(f"{p} does not exist")
    if p.is_dir() and not (p / "config.json").is_file() or p.is_file() and p.suffix != ".safetensors":
        return _info_foreign(args, p)
    from lowbit.formats import detect_format

    if p.is_dir() and detect_format(p) == "compressed-tensors":
        return _info_foreign(args, p)
    info = checkpoint_info(p)
    if args.kernels:
        info["kernels"] = {r[0]: r[1] for r in _kernel_rows()}
    if not args.json:
        from tabulate import tabulate

        print(f"{info['path']}: lowbit format version {info['format_version']}"
              + (f", written by lowbit {info['lowbit_version']}" if info.get("lowbit_version") else "")
              + (f"; {info['model_type']} ({', '.join(info.get('architectures') or [])}), dtype {info['dtype']}"
                 if info.get("model_type") else ""))
        print(f"files: {', '.join(info['files'])}; {_mb(info['bytes'])} of tensors "
              f"({_mb(info['quantized_bytes'])} quantized, {_mb(info['float_bytes'])} float)")
        rows = [[c, n] for c, n in sorted(info["configs"].items(), key=lambda kv: -kv[1])]
        print(tabulate(rows, headers=["config", "modules"], tablefmt="github"))
        if args.modules:
            print(tabulate(list(info["modules"].items()), headers=["module", "config"], tablefmt="github"))
    return info


def _info_foreign(args, p: Path) -> dict:
    """``info`` on a compressed-tensors directory or a GGUF file: loaded (no re-quantization), then the lowbit
    config each module maps to, and the bytes held."""
    from lowbit.formats import describe

    model, _, kind = load_model(str(p))
    info = {"path": str(p), "format": kind, "model_type": getattr(model.config, "model_type", None),
            **describe(model)}
    info["bytes"] = info["quantized_bytes"] + info["float_bytes"]
    if args.kernels:
        info["kernels"] = {r[0]: r[1] for r in _kernel_rows()}
    if not args.json:
        from tabulate import tabulate

        print(f"{p}: {kind} checkpoint; {info['model_type']}; in memory {_mb(info['bytes'])} of tensors "
              f"({_mb(info['quantized_bytes'])} quantized, {_mb(info['float_bytes'])} float)")
        rows = [[c, n] for c, n in sorted(info["configs"].items(), key=lambda kv: -kv[1])]
        print(tabulate(rows, headers=["lowbit config", "modules"], tablefmt="github"))
        if args.modules:
            print(tabulate(list(info["modules"].items()), headers=["module", "config"], tablefmt="github"))
    return info


def cmd_eval(args) -> dict:
    from lowbit.eval.perplexity import perplexity

    text = _read_text(args.text)
    t0 = time.perf_counter()
    _say(args, f"lowbit: loading {args.model_dir}")
    model, tok, kind = load_model(args.model_dir, args.dtype)
    load_s = time.perf_counter() - t0
    tt, n_windows = _tokenized(tok, text, args.seq_len, args.max_windows, args.model_dir)
    bar = _bar(n_windows, "perplexity", not args.quiet, "window")
    t1 = time.perf_counter()
    with torch.inference_mode():
        ppl = perplexity(_Logits(model, bar), tt.ids, args.seq_len, n_windows, batch_size=args.batch_size,
                         prefix=tt.prefix)
    bar.close()
    result = {"model_dir": args.model_dir, "kind": kind, "text": args.text, "perplexity": ppl, "seq_len": args.seq_len,
              "windows": n_windows, "tokens_scored": n_windows * args.seq_len, "prefix": list(tt.prefix),
              "special_tokens": tt.note, "eval_seconds": time.perf_counter() - t1, "load_seconds": load_s}
    if not args.json:
        print(f"perplexity {ppl:.4f} over {n_windows} windows x {args.seq_len} tokens ({kind} model, "
              f"{result['eval_seconds']:.1f} s)")
        print(f"windows: {n_windows} x {args.seq_len} tokens, {tt.note}")
    return result


def _timed_model(path: str, dtype: str):
    model, _, kind = load_model(path, dtype)
    return model, kind


def _bench_one(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds for new_tokens steps, tokens decoded) with a transformers DynamicCache."""
    decoded = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            decoded += out.logits.shape[1]  # one new position per step, read off the model's output
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, decoded


def cmd_bench(args) -> dict:
    paths = [args.model_dir] + ([args.against] if args.against else [])
    models = []
    for path in paths:
        _say(args, f"lowbit: loading {path}")
        models.append(_timed_model(path, args.dtype))
    vocab = min(getattr(m.config, "vocab_size", 1000) for m, _ in models)
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    times: list[list[tuple[float, float, int]]] = [[] for _ in models]
    for m, _ in models:  # warm-up (first-call allocations, kernel builds)
        _bench_one(m, ids[:, : min(16, args.prompt_len)], 2)
    bar = _bar(args.repeats * len(models), "bench", not args.quiet, "run")
    for _ in range(args.repeats):  # interleaved: drift in the machine's load hits every model alike
        for i, (m, _) in enumerate(models):
            times[i].append(_bench_one(m, ids, args.new_tokens))
            bar.update(1)
    bar.close()
    rows = []
    for path, (m, kind), t in zip(paths, models, times):
        pre = statistics.median(x[0] for x in t)
        dec = statistics.median(x[1] for x in t)
        decoded = {x[2] for x in t}
        if decoded != {args.new_tokens}:  # a model that stops early or returns more positions: no honest ratio
            raise CLIError(f"{path} decoded {sorted(decoded)} tokens per run; --new-tokens asked for {args.new_tokens}")
        rows.append({"model_dir": path, "kind": kind, "prefill_tokens_per_s": args.prompt_len / pre,
                     "decode_tokens_per_s": args.new_tokens / dec if args.new_tokens else None,
                     "prefill_ms": pre * 1e3, "decode_ms_per_token": dec * 1e3 / max(args.new_tokens, 1),
                     "prefill_tokens": ids.shape[1], "decode_tokens": args.new_tokens,
                     "prefill_ms_runs": [x[0] * 1e3 for x in t], "decode_ms_runs": [x[1] * 1e3 for x in t]})
    result = {"threads": torch.get_num_threads(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "results": rows}
    if len(rows) == 2:
        result["prefill_speedup"] = rows[0]["prefill_tokens_per_s"] / rows[1]["prefill_tokens_per_s"]
        if args.new_tokens:
            result["decode_speedup"] = rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
    if not args.json:
        from tabulate import tabulate

        print(tabulate([[r["model_dir"], r["kind"], f"{r['prefill_tokens_per_s']:.1f}",
                         f"{r['decode_tokens_per_s']:.2f}" if r["decode_tokens_per_s"] else "-"] for r in rows],
                       headers=["model", "kind", f"prefill tok/s ({args.prompt_len})", "decode tok/s"], tablefmt="github"))
        if len(rows) == 2:
            print(f"{paths[0]} vs {paths[1]}: prefill {result['prefill_speedup']:.2f}x"
                  + (f", decode {result['decode_speedup']:.2f}x" if args.new_tokens else "")
                  + f" (median of {args.repeats} interleaved runs, {result['threads']} threads)")
    return result


def cmd_report(args) -> dict:
    from lowbit.eval.sensitivity import sensitivity_report

    configs = _configs_from(args)
    text = _read_text(args.text)
    _say(args, f"lowbit: loading {args.model_dir}")
    model, tok, kind = load_model(args.model_dir, args.dtype)
    if kind != "float":
        raise CLIError(f"{args.model_dir} is already quantized; report needs the float model")
    tt, _ = _tokenized(tok, text, args.seq_len, args.max_windows, args.model_dir)
    report = sensitivity_report(model, configs, tt.ids, seq_len=args.seq_len, max_windows=args.max_windows,
                                batch_size=args.batch_size, progress_bar=not args.quiet, prefix=tt.prefix)
    if not args.json:
        shown = dataclasses.replace(report, rows=report.rows[: args.top]) if args.top else report
        print(shown.to_table())
        print(f"windows: {tt.note}")
    return {**report.to_dict(), "special_tokens": tt.note}


# --- main ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from lowbit.version import __version__

    p = _Parser(prog="lowbit", description="Quantize transformers checkpoints and measure them.",
                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or progress lines")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    from lowbit.cli.export import add_export_parser
    from lowbit.cli.quantize import add_quantize_parser

    add_quantize_parser(sub, common)
    add_export_parser(sub, common)

    i = sub.add_parser("info", parents=[common], help="what a checkpoint holds (lowbit, compressed-tensors, GGUF); "
                       "--kernels: which C++ kernels run here")
    i.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                   help="a lowbit checkpoint directory or .safetensors file, a compressed-tensors directory or a GGUF file")
    i.add_argument("--modules", action="store_true", help="also list every module's config")
    i.add_argument("--kernels", action="store_true", help="list lowbit's C++ CPU kernels and whether each runs here")
    i.set_defaults(fn=cmd_info)

    def model_opts(sp):
        sp.add_argument("model_dir", metavar="MODEL", help="a transformers model directory, a lowbit or compressed-tensors "
                        "checkpoint directory, or a GGUF file")
        sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of a float model (default: its config's)")

    e = sub.add_parser("eval", parents=[common], help="perplexity on a text")
    model_opts(e)
    e.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file, or builtin:pydoc|pydoc-first-half|pydoc-second-half|britannica|"
                   "shakespeare[:PLAY]; not the text a gptq/awq model was calibrated on (default: pydoc-second-half)")
    e.add_argument("--seq-len", type=_positive, default=256, help="tokens per window (default 256)")
    e.add_argument("--max-windows", type=_positive, default=None, help="score at most this many windows")
    e.add_argument("--batch-size", type=_positive, default=4)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", parents=[common], help="prefill and decode tokens/s (batch 1)")
    model_opts(b)
    b.add_argument("--against", metavar="DIR", help="a second model, timed interleaved; prints the speed ratio")
    b.add_argument("--prompt-len", type=_positive, default=128)
    b.add_argument("--new-tokens", type=_non_negative, default=32)
    b.add_argument("--repeats", type=_positive, default=5)
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("report", parents=[common], help="per-layer sensitivity table (each linear quantized alone)")
    model_opts(r)
    _add_config_options(r, repeat=True)
    r.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file, or builtin:NAME")
    r.add_argument("--seq-len", type=_positive, default=128)
    r.add_argument("--max-windows", type=_positive, default=4)
    r.add_argument("--batch-size", type=_positive, default=4)
    r.add_argument("--top", type=_positive, default=None, help="show only the N most sensitive layers")
    r.set_defaults(fn=cmd_report)
    return p


def _int_at_least(low: int):
    """An argparse type: an int >= ``low``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{s} must be positive" if low == 1 else f"{s} must be >= {low}")
        return v

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


_USER_ERRORS = (CLIError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ValueError,
                TypeError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lowbit`` command; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "usage_check", None) is not None:
        args.usage_check(args)
    try:
        result = args.fn(args)
        if args.json:
            print(json.dumps(result, indent=2, default=_json_default))
        return EXIT_OK
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("lowbit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as e:
        if args.debug:
            raise
        print(f"lowbit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001  (a bug of ours: still one line, the traceback with --debug)
        if args.debug:
            raise
        print(f"lowbit: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(e: BaseException) -> str:
    """The exception's message on one line ("path: reason" for an OS error that only says [Errno n])."""
    msg = str(e)
    if isinstance(e, OSError) and e.filename and e.strerror and "Errno" in msg:
        msg = f"{e.filename}: {e.strerror}"
    return " ".join(msg.split()) or type(e).__name__


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    return repr(o)


def console_main() -> None:
    """The console-script entry point."""
    sys.exit(main())

