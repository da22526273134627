"""Writes the llm-compressor checkpoints of glassllm that tests/formats read (a foreign tool's output, so CI
needs no llm-compressor):

* ``llmc_glassllm_w4a16/``: GPTQModifier, scheme W4A16 (int4 symmetric, groups of 128, llm-compressor's
  default static act order), ``lm_head`` and the 341-wide ``down_proj`` (no group of 128 divides it) left float;
* ``llmc_glassllm_w4a16_asym/``: the same with W4A16_ASYM (uint4 with a zero point per group, what AWQ tools write);
* ``llmc_glassllm_w8a8/``: GPTQModifier, scheme W8A8 (int8 per-channel symmetric weights, dynamic per-token
  symmetric int8 activations), ``lm_head`` left float;
* beside each, ``<dir>_dequant.safetensors``: llm-compressor's own dequantized weight of every quantized linear
  in layers 0 and 3 (``compressed_tensors``' ``fake_quantize`` with the scale and zero point it chose), float32,
  taken in its process before the checkpoint is compressed.

Run from the repository root with lowbit's venv: ``.venv/bin/python tests/data/make_llmc_glassllm.py``. It
saves glassllm as a transformers folder and 16 calibration windows of 64 tokens (lowbit's default calibration
text, disjoint from the evaluation text), then runs itself under llm-compressor's venv (``.venv-llmc``:
``pip install torch==2.13.0 llmcompressor``; it pins its own transformers) with ``--llmc``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCHEMES = {"w4a16": ("W4A16", ["lm_head", "re:.*down_proj$"]), "w4a16_asym": ("W4A16_ASYM", ["lm_head", "re:.*down_proj$"]),
           "w8a8": ("W8A8", ["lm_head"])}
DEQUANT_LAYERS = ("model.layers.0.", "model.layers.3.")  # the reference weights kept (the files stay small)
SAMPLES, SEQ_LEN = 16, 64


def _prepare(work: Path) -> None:
    import torch

    from lowbit.algorithms.calibration import DEFAULT_CALIBRATION, calibration_batches, calibration_text
    from lowbit.eval.models import glassllm_hf_tokenizer, save_glassllm_hf

    save_glassllm_hf(work / "float")
    ids = calibration_batches(calibration_text(DEFAULT_CALIBRATION), glassllm_hf_tokenizer(), SAMPLES, SEQ_LEN)
    torch.save(ids, work / "calibration.pt")


def _llmc(work: Path, key: str) -> None:
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    scheme, ignore = SCHEMES[key]
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "float", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "float")
    calib = torch.load(work / "calibration.pt", weights_only=True)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
    model = oneshot(model=model, processor=tokenizer, dataset=DataLoader(rows, batch_size=1),
                    recipe=[GPTQModifier(scheme=scheme, targets="Linear", ignore=ignore)],
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1])
    dequant = {}
    for name, module in model.named_modules():
        qs = getattr(module, "quantization_scheme", None)
        if qs is not None and qs.weights is not None and name.startswith(DEQUANT_LAYERS):
            with torch.no_grad():
                w = fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None), qs.weights)
            dequant[f"{name}.weight"] = w.detach().float().contiguous()
    out = HERE / f"llmc_glassllm_{key}"
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    versions = {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    save_file(dequant, HERE / f"llmc_glassllm_{key}_dequant.safetensors", metadata={"versions": json.dumps(versions)})
    print(f"{out.name}: {len(dequant)} quantized linears, {versions}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--llmc"]:
        _llmc(Path(argv[1]), argv[2])
        return 0
    llmc_python = ROOT / ".venv-llmc" / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        _prepare(Path(tmp))
        for key in SCHEMES:
            subprocess.run([str(llmc_python), __file__, "--llmc", tmp, key], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
