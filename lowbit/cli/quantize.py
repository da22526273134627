"""``lowbit quantize``: streaming round-to-nearest (and HQQ where the config has a ``qparams`` field) through
``quantize_pretrained``; GPTQ and AWQ (and HQQ otherwise) on the whole model in memory, from calibration text."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from lowbit.cli import (
    CLIError,
    _add_config_options,
    _bar,
    _configs_from,
    _existing_source,
    _mb,
    _positive,
    _say,
    load_model,
)

ALGORITHMS = ("rtn", "hqq", "gptq", "awq")
_DATA_ALGORITHMS = ("gptq", "awq")  # need calibration data and the whole model in memory
DEFAULT_SAMPLES, DEFAULT_CALIB_SEQ_LEN = 128, 256
_QUANTIZED_SOURCES = ("compressed-tensors", "gguf")  # re-quantized from their dequantized weights
_PLAN_LINES = ("gptq: ", "awq: ", "quantize_hqq_: ", "quantize_: ")  # the algorithms' warned plan lines


def add_quantize_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``quantize`` subcommand and its options."""
    q = sub.add_parser("quantize", parents=[common], help="quantize a transformers checkpoint (rtn: streaming, low memory; gptq/awq: from calibration text)",
                       description="Quantize a transformers safetensors checkpoint into a lowbit checkpoint. "
                       "--algorithm rtn (default) streams tensor by tensor (peak memory about one tensor); gptq and "
                       "awq load the whole float model in memory (in --dtype) and run it on calibration text, and "
                       "hqq does too for configs without a qparams field. Calibration and evaluation text must "
                       "differ: the default calibration, builtin:pydoc-second-half, is disjoint from "
                       "builtin:pydoc-first-half and from the first half of builtin:pydoc.")
    q.add_argument("model_dir", metavar="MODEL", help="transformers model directory (safetensors weights); a "
                   "compressed-tensors directory or a GGUF file is dequantized and quantized again (in memory)")
    _add_config_options(q)
    q.add_argument("--skip", action="append", metavar="NAME|re:REGEX",
                   help="leave these linears float (exact module name, or re: + a regex); repeatable")
    q.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float dtype of the result (default: the checkpoint's)")
    q.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT_DIR")
    q.add_argument("--max-shard-mb", type=float, default=512, help="output shard size (default 512)")
    q.add_argument("--strict", action="store_true",
                   help="fail (listing them) when a layer's in_features does not fit --group-size, instead of giving "
                        "it the largest smaller group that fits (or leaving it float when none does)")
    q.add_argument("--algorithm", choices=ALGORITHMS, default="rtn",
                   help="rtn: round to nearest (streaming); hqq: HQQ's qparams, no data; gptq / awq: from calibration "
                        "data, the whole model in memory (default rtn)")
    q.add_argument("--calibration", metavar="builtin:NAME|FILE",
                   help="gptq/awq: calibration text, a UTF-8 file or builtin:pydoc-second-half (default), "
                        "builtin:pydoc-first-half, builtin:pydoc, builtin:britannica, builtin:shakespeare[:PLAY]; "
                        "keep it apart from the text you evaluate on")
    q.add_argument("--samples", type=_positive, metavar="N",
                   help=f"gptq/awq: calibration windows, at seeded random starts (default {DEFAULT_SAMPLES})")
    q.add_argument("--seq-len", type=_positive, metavar="L",
                   help=f"gptq/awq: tokens per calibration window (default {DEFAULT_CALIB_SEQ_LEN}, or the model's "
                        "max_position_embeddings when smaller)")
    q.add_argument("--gptq-qparams", choices=("minmax", "search"), default=None,
                   help="gptq: each group's scale and zero point from a search over its min/max shrunk by 1.00 .. 0.90, "
                        "weighted by the Hessian's diagonal (default: lower perplexity on SmolLM2 at g64 and g128, see "
                        "benchmarks/results/algorithms.md), or from its min/max (llm-compressor's default observer)")
    q.set_defaults(fn=cmd_quantize, usage_check=functools.partial(_check_quantize_usage, q))


def _check_quantize_usage(parser: argparse.ArgumentParser, args) -> None:
    """Flag combinations argparse cannot express: calibration flags only go with a data algorithm."""
    if args.algorithm not in _DATA_ALGORITHMS:
        for flag, value in (("--calibration", args.calibration), ("--samples", args.samples),
                            ("--seq-len", args.seq_len)):
            if value is not None:
                parser.error(f"argument {flag}: only --algorithm gptq or awq take calibration data; "
                             f"--algorithm {args.algorithm} uses none")
    if args.gptq_qparams is not None and args.algorithm != "gptq":
        parser.error(f"argument --gptq-qparams: only --algorithm gptq takes it; --algorithm {args.algorithm} was given")


def cmd_quantize(args) -> dict:
    src, kind = _existing_source(args.model_dir)
    (config,) = _configs_from(args)
    skip = args.skip or []
    algorithm = args.algorithm
    if kind in _QUANTIZED_SOURCES:  # dequantized in memory first: never streamed
        return _quantize_in_memory(args, src, config, skip, kind)
    if algorithm == "hqq" and "qparams" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, qparams="hqq")  # HQQ's qparams need no data: it streams
        algorithm = "rtn"
    if algorithm != "rtn":
        return _quantize_in_memory(args, src, config, skip)
    _say(args, f"lowbit: quantizing {src} with {config!r}" + (f", skipping {skip}" if skip else ""))
    with warnings.catch_warnings():  # its one summary line is printed below, not warned
        warnings.filterwarnings("ignore", message="quantize_pretrained: ", category=UserWarning)
        summary = _stream(src, args, config, skip)
    result = summary.to_dict()
    result["configs"] = _summarize(summary.configs)
    result["algorithm"] = args.algorithm
    _say(args, f"lowbit: wrote {summary.out_dir} ({len(summary.shards)} shard(s))")
    if not args.json:
        _print_summary(result, summary.configs, summary.skipped, summary.fallback or summary.left_float)
    return result


def _stream(src: Path, args, config, skip: list[str]):
    """``quantize_pretrained`` with the command's options."""
    from lowbit.pretrained import quantize_pretrained

    return quantize_pretrained(src, args.out, config, skip=skip, dtype=args.dtype, overwrite=args.overwrite,
                               max_shard_bytes=int(args.max_shard_mb * 2**20), progress=not args.quiet,
                               strict=args.strict)


def _summarize(configs: dict[str, str]) -> dict[str, int]:
    from lowbit.pretrained import summarize_configs

    return summarize_configs(configs)


def _print_summary(result: dict, configs: dict, skipped: list[str], notable: bool) -> None:
    print(f"quantized {len(configs)} modules ({', '.join(f'{n} x {c}' for c, n in result['configs'].items())})"
          + (f"; skipped: {len(skipped)} ({', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''})"
             if skipped else ""))
    if notable:
        print(result["message"])
    print(f"{_mb(result['source_bytes'])} read -> {_mb(result['output_bytes'])} written ({result['dtype']}); "
          f"{result['seconds']:.1f} s ({result['quantize_seconds']:.1f} s quantizing)")
    print(f"load it: lowbit.from_pretrained({str(result['out_dir'])!r})")


def _check_out_dir(out: Path, src: Path, overwrite: bool) -> None:
    """The output directory checks the writer makes, made before minutes of quantizing (nothing is changed)."""
    if out.exists() and out.resolve() == src.resolve():
        raise CLIError(f"--out {out} is the source directory; write the quantized model elsewhere")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--out {out} is not empty (pass --overwrite to replace it)")


def _skip_mapping(config, skip: list[str]):
    """``config`` with ``--skip`` as a quantize_ mapping: exact names and regexes to None, then every linear."""
    if not skip:
        return config
    mapping = {k: None for k in skip}
    mapping.setdefault("re:.*", config)  # a skip of "re:.*" itself already leaves everything float
    return mapping


def _calibration_samples(args, tok, model, src: Path) -> tuple[torch.Tensor, dict]:
    """``(samples x seq_len token ids, what they are)`` from ``--calibration``, as gptq / awq take them."""
    from lowbit.algorithms.calibration import DEFAULT_CALIBRATION, calibration_batches, calibration_text
    from lowbit.eval.perplexity import tokenize_for_perplexity

    source = args.calibration or DEFAULT_CALIBRATION
    if tok is None:
        raise CLIError(f"{src} has no tokenizer files: --algorithm {args.algorithm} needs one to turn --calibration "
                       "into tokens")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seq_len = args.seq_len or (min(DEFAULT_CALIB_SEQ_LEN, max_pos) if max_pos else DEFAULT_CALIB_SEQ_LEN)
    if max_pos and seq_len > max_pos:
        raise CLIError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings={max_pos}")
    samples = args.samples or DEFAULT_SAMPLES
    try:
        text = calibration_text(source)
    except ValueError as e:
        raise CLIError(f"--calibration {source}: {e}") from e
    tt = tokenize_for_perplexity(tok, text)
    body = seq_len - len(tt.prefix)  # each sample starts as the tokenizer starts a sequence (its BOS, if any)
    if body < 1:
        raise CLIError(f"--seq-len {seq_len} leaves no room after the tokenizer's {len(tt.prefix)} prefix token(s)")
    try:
        windows = calibration_batches(tt.ids, n_samples=samples, seq_len=body, seed=0)
    except ValueError as e:
        raise CLIError(f"--calibration {source}: {str(e).replace('seq_len=', '--seq-len ')}") from e
    if tt.prefix:
        windows = torch.cat([torch.tensor(tt.prefix, dtype=windows.dtype).expand(samples, -1), windows], dim=1)
    info = {"source": source, "samples": samples, "seq_len": seq_len, "text_tokens": int(tt.ids.numel()),
            "special_tokens": tt.note}
    return windows, info


def _algorithm(name: str):
    import lowbit.algorithms as algorithms

    fn = getattr(algorithms, name, None)
    if not callable(fn):
        raise CLIError(f"--algorithm {name}: this lowbit has no lowbit.algorithms.{name} (not implemented yet)")
    return fn


def _dequantize_model_(model) -> int:
    """Replace every lowbit tensor weight by the float tensor it stands for (its ``dequantize()``); returns how many."""
    from torch import nn

    n = 0
    for m in model.modules():
        if getattr(m, "lowbit_config", None) is None:
            continue
        w = m.weight
        m.weight = nn.Parameter(w.dequantize(), requires_grad=False)
        del m.lowbit_config
        m.__dict__.pop("extra_repr", None)
        n += 1
    return n


def _quantize_in_memory(args, src: Path, config, skip: list[str], kind: str = "transformers") -> dict:
    """hqq (configs without a qparams field), gptq, awq, and any algorithm on a compressed-tensors or GGUF source
    (dequantized first): the whole model loaded, quantized in place, saved."""
    from lowbit.pretrained.checkpoint import _NOT_COPIED, is_lowbit_checkpoint, save_pretrained
    from lowbit.pretrained.streaming import _source_files
    from lowbit.quantize.plan import plan_quantization, state_bytes

    t0 = time.perf_counter()
    if is_lowbit_checkpoint(src):
        raise CLIError(f"{src} is already a lowbit checkpoint; quantize its float source instead")
    foreign = kind in _QUANTIZED_SOURCES
    if foreign:
        files = {f.name: f for f in ([src] if src.is_file() else src.glob("*.safetensors"))}
        if args.dtype != "auto":
            raise CLIError(f"--dtype {args.dtype}: {src} is a quantized {kind} checkpoint, whose dtype is fixed by the file")
    else:
        files = _source_files(src)  # safetensors only, as the streaming path
    out = Path(args.out)
    _check_out_dir(out, src, args.overwrite)
    mapping = _skip_mapping(config, skip)
    fn = _algorithm(args.algorithm) if args.algorithm in _DATA_ALGORITHMS else None
    _say(args, f"lowbit: loading {src} (--algorithm {args.algorithm} needs the whole model in memory)")
    model, tok, _ = load_model(str(src), args.dtype)
    if foreign:
        n = _dequantize_model_(model)
        _say(args, f"lowbit: {src} is a quantized {kind} checkpoint: its {n} quantized weight(s) are dequantized and "
                   "quantized again (lowbit.from_pretrained loads it without re-quantizing)")
    plan = plan_quantization(model, mapping, strict=args.strict)  # --strict and --skip errors before any work
    if not plan.steps:
        if plan.skipped and not plan.unfit and not plan.tied:
            raise CLIError(f"{src}: every linear is skipped ({len(plan.skipped)} matched --skip): nothing to quantize")
        raise CLIError(f"{src}: nothing to quantize: {plan.describe()}")
    before = state_bytes(model)
    calibration, report = None, None
    if fn is not None:
        samples, calibration = _calibration_samples(args, tok, model, src)
        _say(args, f"lowbit: {args.algorithm} on {calibration['samples']} x {calibration['seq_len']} tokens of "
                   f"{calibration['source']} with {config!r}" + (f", skipping {skip}" if skip else ""))
    else:
        from lowbit.algorithms import quantize_hqq_
        from lowbit.quantize import quantize_

        # rtn reaches this path only from a compressed-tensors / GGUF source: round to nearest in memory
        apply_ = quantize_ if args.algorithm == "rtn" else quantize_hqq_

        _say(args, f"lowbit: {args.algorithm} with {config!r}" + (f", skipping {skip}" if skip else ""))
    bar = _bar(None, args.algorithm, not args.quiet, "block")  # the total comes with the first block

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    tq = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if fn is not None:
                extra = {"qparams": args.gptq_qparams} if args.gptq_qparams is not None else {}
                report = fn(model, mapping, samples, progress=progress, **extra)
            else:
                apply_(model, mapping)
        except NotImplementedError as e:
            raise CLIError(f"--algorithm {args.algorithm} with --config {args.config}: {e}") from e
        finally:
            bar.close()
    quant_s = time.perf_counter() - tq
    for w in caught:  # the plan line is printed below as the streaming path prints it; others one line each
        text = " ".join(str(w.message).split())
        if not text.startswith(_PLAN_LINES):
            _say(args, f"lowbit: warning: {text}")
    after = state_bytes(model)
    _say(args, f"lowbit: writing {out}")
    save_pretrained(model, out, max_shard_bytes=int(args.max_shard_mb * 2**20), overwrite=args.overwrite)
    if src.is_dir():
        for f in src.iterdir():  # tokenizer and generation files, as the streaming path copies them
            if f.is_file() and not _NOT_COPIED.fullmatch(f.name) and f.name != "recipe.yaml":
                shutil.copy2(f, out / f.name)
    elif tok is not None:  # a GGUF file: its tokenizer, as transformers reads it
        tok.save_pretrained(out)
    shards = json.loads((out / "config.json").read_text())["lowbit"]["shards"]
    configs = {s.fqn: repr(s.config) for s in plan.steps}
    configs.update({fqn: repr(s.config) for s in plan.steps for fqn, _ in s.shares})
    left_float = {**plan.unfit, **{k: f"tied to {', '.join(v)}" for k, v in plan.tied.items()},
                  **{k: f"{len(v)}-D parameter outside nn.Linear" for k, v in plan.unhandled.items()}}
    result = {"out_dir": str(out), "algorithm": args.algorithm, "configs": _summarize(configs),
              "skipped": plan.skipped, "source_bytes": sum(p.stat().st_size for p in set(files.values())),
              "output_bytes": sum(after), "quantized_bytes": after[1], "shards": shards,
              "seconds": time.perf_counter() - t0, "quantize_seconds": quant_s,
              "dtype": str(_float_param_dtype(model)).removeprefix("torch."),
              "fallback": {s.fqn: f"{s.asked!r} -> {s.config!r}" for s in plan.fallbacks}, "left_float": left_float,
              "message": f"{args.algorithm}: " + plan.describe(before=before, after=after), "calibration": calibration}
    if args.algorithm == "gptq":
        result["gptq_qparams"] = args.gptq_qparams or "search"
    raised = getattr(report, "raised_damping", None)  # GPTQ's
    for key in ("layers", "groups"):  # GPTQ: one row per linear; AWQ: one per scaling group
        if hasattr(report, key):
            result[key] = [dataclasses.asdict(r) for r in getattr(report, key)]
    if hasattr(report, "block_sqnr_db"):
        result["block_sqnr_db"] = dict(report.block_sqnr_db)
    if raised is not None:
        result["raised_damping"] = [r.fqn for r in raised]
    _say(args, f"lowbit: wrote {out} ({len(shards)} shard(s))")
    if not args.json:
        if report is not None:
            print(report.to_table())
            if raised is not None:
                print(f"damping raised for {len(result['raised_damping'])} of {len(result['layers'])} linear(s)"
                      + (": " + ", ".join(f"{r.fqn} -> {r.damp:g}" for r in raised) if raised else ""))
            print(f"calibration: {calibration['samples']} x {calibration['seq_len']} tokens of {calibration['source']} "
                  f"(keep the evaluation text apart from it); {calibration['special_tokens']}")
        _print_summary(result, configs, plan.skipped, plan.notable)
    return result


def _float_param_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
