"""Serve lowbit's compressed-tensors exports with vLLM on a GPU and check the greedy answer (issue: interop).

SmolLM2-135M-Instruct in bf16 is quantized by lowbit (W4A16: ``Int4WeightOnlyConfig(group_size=128,
symmetric=True)``; W8A8: ``Int8DynamicActivationInt8WeightConfig()``, int8 per-channel weights and dynamic
per-token int8 activations), exported with ``lowbit.export(..., "compressed-tensors")``, then each directory is
served by ``vllm.LLM`` with ``tensor_parallel_size`` 1 (and 2 when the machine has two GPUs). The prompt's
greedy continuation from vLLM is compared with lowbit's own greedy continuation of the same quantized model
(on the CPU, where lowbit's numerics are the reference): the script prints both, the number of leading tokens
that agree, and exits 1 when vLLM fails to load a checkpoint or the first generated token differs.
Small differences after the first few tokens are expected: vLLM's W4A16 / W8A8 GEMMs accumulate in another
order (and W8A8 quantizes activations in its own fused kernel), so near-ties can flip.

    python benchmarks/vllm_serve.py                     # writes results/vllm_serve.json
    python benchmarks/vllm_serve.py --schemes w4a16 --tp 1 2

Needs a CUDA GPU and vLLM (``pip install vllm``); without them it says so and exits 0 (nothing to run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT = "The capital of France is"


def _configs():
    import lowbit

    return {"w4a16": lowbit.Int4WeightOnlyConfig(group_size=128, symmetric=True),
            "w8a8": lowbit.Int8DynamicActivationInt8WeightConfig()}


def export_smollm2(scheme: str, out: str) -> list[int]:
    """Quantize SmolLM2 (bf16) with ``scheme``, export it as compressed-tensors to ``out`` and return lowbit's
    greedy token ids for PROMPT (CPU)."""
    import lowbit
    from lowbit.eval.models import load_smollm2

    model, tok = load_smollm2()
    model = model.to(torch.bfloat16)
    lowbit.quantize_(model, _configs()[scheme])
    lowbit.export(model, out, "compressed-tensors", tokenizer=tok)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=ARGS.max_tokens, do_sample=False)
    return gen[0, ids.shape[1]:].tolist()


def serve(path: str, tp: int) -> list[int]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, tensor_parallel_size=tp, dtype="bfloat16", enforce_eager=True, max_model_len=512,
              gpu_memory_utilization=0.3)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=ARGS.max_tokens))
    ids = list(out[0].outputs[0].token_ids)
    del llm
    torch.cuda.empty_cache()
    return ids


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", nargs="+", default=["w4a16", "w8a8"], choices=["w4a16", "w8a8"])
    ap.add_argument("--tp", nargs="+", type=int, default=None, help="tensor_parallel_size values (default 1, and 2 "
                    "when two GPUs are visible)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(RESULTS, "vllm_serve.json"))
    ARGS = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("vllm_serve: no CUDA GPU here; nothing to run")
        return 0
    try:
        import vllm
    except ImportError:
        print("vllm_serve: vLLM is not installed (pip install vllm); nothing to run")
        return 0
    tps = ARGS.tp or ([1, 2] if torch.cuda.device_count() >= 2 else [1])
    results, failed = [], False
    with tempfile.TemporaryDirectory() as work:
        for scheme in ARGS.schemes:
            path = os.path.join(work, f"smollm2-{scheme}")
            ref = export_smollm2(scheme, path)
            for tp in tps:
                row = {"scheme": scheme, "tensor_parallel_size": tp, "lowbit_cpu_ids": ref}
                try:
                    got = serve(path, tp)
                    agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
                    row.update(vllm_ids=got, leading_tokens_equal=agree, ok=agree >= 1)
                except Exception as e:  # noqa: BLE001 - a load failure is the result to report
                    row.update(error=f"{type(e).__name__}: {e}", ok=False)
                failed |= not row["ok"]
                print(json.dumps(row))
                results.append(row)
    os.makedirs(RESULTS, exist_ok=True)
    with open(ARGS.out, "w") as f:
        json.dump({"vllm": vllm.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                   "prompt": PROMPT, "results": results}, f, indent=2)
    return 1 if failed else 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
