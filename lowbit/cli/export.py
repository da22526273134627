"""``lowbit export``: a quantized checkpoint (lowbit, compressed-tensors or GGUF) written in another format:
compressed-tensors (a directory vLLM and SGLang serve) or GGUF (one file llama.cpp and ollama run)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.cli import CLIError, _existing_source, _mb, _say


def add_export_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``export`` subcommand and its options."""
    from lowbit.formats import FORMATS

    e = sub.add_parser("export", parents=[common], help="write a quantized checkpoint as compressed-tensors (vLLM) or GGUF "
                       "(llama.cpp)",
                       description="Write a quantized checkpoint (a lowbit or compressed-tensors directory, or a GGUF "
                       "file) in another format, with its integer codes and scales unchanged. Layers the target format "
                       "cannot state exactly are refused in one error that lists them; nothing is re-quantized.")
    e.add_argument("source", metavar="SRC", help="a lowbit or compressed-tensors checkpoint directory, or a GGUF file")
    e.add_argument("--format", required=True, choices=FORMATS, help="the format to write")
    e.add_argument("--out", required=True, metavar="OUT",
                   help="output directory (compressed-tensors) or .gguf file (gguf)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.set_defaults(fn=cmd_export)


def cmd_export(args) -> dict:
    from lowbit.formats import export

    src, kind = _existing_source(args.source)
    if kind == "transformers":
        raise CLIError(f"{src} is a float transformers checkpoint: quantize it first (lowbit quantize {src} --config "
                       "... --out DIR), then export that")
    out = Path(args.out)
    if args.format == "gguf" and out.suffix != ".gguf":
        raise CLIError(f"--out {out}: --format gguf writes one file; name it *.gguf")
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        raise CLIError(f"--out {out} already exists{'' if out.is_file() else ' and is not empty'}; pass --overwrite to "
                       "replace it")
    _say(args, f"lowbit: exporting {src} ({kind}) as {args.format} to {out}")
    t0 = time.perf_counter()
    written = Path(export(src, out, args.format, overwrite=args.overwrite))
    files = [written] if written.is_file() else sorted(f for f in written.iterdir() if f.is_file())
    nbytes = sum(f.stat().st_size for f in files)
    result = {"source": str(src), "source_format": kind, "format": args.format, "out": str(written),
              "files": [f.name for f in files], "bytes": nbytes, "seconds": time.perf_counter() - t0}
    if not args.json:
        print(f"wrote {written} ({args.format}, {_mb(nbytes)} in {len(files)} file(s), {result['seconds']:.1f} s)")
    return result
