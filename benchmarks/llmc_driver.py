"""Runs llm-compressor's ``oneshot`` (GPTQModifier or AWQModifier) on a saved float model, for
``benchmarks/algorithms.py``. It runs with llm-compressor's own venv (``.venv-llmc/bin/python``:
llm-compressor pins its own transformers), never imports lowbit, and talks to its parent through
files only.

Input: one JSON job (``python llmc_driver.py JOB.json``) with ``model`` (a ``save_pretrained``
folder, float32), ``calibration`` (a ``torch.save``'d int64 ``(samples, seq_len)`` tensor: the
same windows lowbit's GPTQ sees), ``algorithm`` (``"gptq"`` or ``"awq"``), ``groups`` (module
name -> int4 group size: the modules lowbit quantizes, with the group size its plan fits to each,
so ``lm_head`` stays float), ``symmetric`` (bool), ``actorder`` (GPTQ only: ``"static"``,
llm-compressor's default, or null), ``batch_size``, ``threads`` and ``out`` (a folder).

Output in ``out``: ``state.pt``, the model's float state dict after ``oneshot`` with each
quantized linear's weight replaced by its quantize-dequantize under the scale and zero point
llm-compressor chose (``compressed_tensors``' ``fake_quantize``: what the compressed checkpoint
decodes to; AWQ's folded norms and scaled weights included), and ``stats.json``: ``seconds``
(wall time of ``oneshot`` alone), ``rss_start_mb``, ``rss_peak_mb``, ``rss_growth_mb`` (peak
resident memory while ``oneshot`` ran, over the resident memory just before it) and the versions.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rss import PeakRSS  # noqa: E402

_QPARAM_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")


def _awq_mappings(model: torch.nn.Module, names: list[str]) -> tuple[list | None, list[str]]:
    """AWQ's default mappings for ``model`` without those whose balance layers stay float (on glassllm
    the 341-wide down_proj fits no int4 group: AWQ would divide by zero on it): ``(None, [])`` when
    every default mapping stays (AWQModifier then infers them itself), else ``(kept, dropped)``."""
    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

    def quantized(pattern: str) -> bool:
        if pattern.startswith("re:"):
            return any(re.match(pattern[3:], n) for n in names)
        return pattern in names

    kept, dropped = [], []
    for m in get_layer_mappings_from_model(model):
        (kept if all(quantized(b) for b in m.balance_layers) else dropped).append(m)
    return (None, []) if not dropped else (kept, [f"{m.smooth_layer} -> {m.balance_layers}" for m in dropped])


def _recipe(job: dict, model: torch.nn.Module) -> tuple[list, list[str]]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    by_group: dict[int, list[str]] = {}
    for name, g in job["groups"].items():
        by_group.setdefault(int(g), []).append(name)
    config_groups = {
        f"group_{g}": QuantizationScheme(
            targets=names,
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=job["symmetric"], strategy="group",
                                     group_size=g))
        for g, names in sorted(by_group.items())
    }
    if job["algorithm"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        extra = {} if job.get("actorder", "static") == "static" else {"actorder": job["actorder"]}
        return [GPTQModifier(config_groups=config_groups, ignore=["lm_head"], **extra)], []
    if job["algorithm"] == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        mappings, dropped = _awq_mappings(model, list(job["groups"]))
        awq = AWQModifier() if mappings is None else AWQModifier(mappings=mappings)
        return [awq, QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])], dropped
    raise ValueError(f"job algorithm={job['algorithm']!r}; allowed: 'gptq', 'awq'")


def _cpu_only_workaround() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (``IntermediatesCache.pin_memory``)
    unconditionally, which raises "Cannot access accelerator device when none is available" on a
    machine without one. Pinning only speeds host-to-device copies, so without an accelerator it is
    made a no-op; nothing it computes changes."""
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {k: v for k, v in model.state_dict().items() if not k.endswith(_QPARAM_SUFFIXES)}
    n = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            w = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, scheme.weights)
        state[f"{name}.weight"] = w.detach().to(torch.float32).contiguous()
        n += 1
    if n == 0:
        raise RuntimeError("oneshot left no module with a quantization scheme")
    return state


def main(argv=None) -> int:
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    torch.set_num_threads(int(job["threads"]))
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["model"])  # unused on token ids; oneshot wants one
    calib = torch.load(job["calibration"], weights_only=True)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
    loader = DataLoader(rows, batch_size=int(job["batch_size"]), shuffle=False)
    recipe, dropped = _recipe(job, model)
    _cpu_only_workaround()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model = oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=loader,
                        num_calibration_samples=calib.shape[0],
                        max_seq_length=calib.shape[1])
        seconds = time.perf_counter() - t0
    missing = [n for n in job["groups"] if getattr(model.get_submodule(n), "quantization_scheme", None) is None]
    if missing:
        raise RuntimeError(f"oneshot did not quantize {len(missing)} module(s) it was given, e.g. {missing[:3]}")
    out = Path(job["out"])
    torch.save(_dequantized_state(model), out / "state.pt")
    stats = {"seconds": seconds, "rss_start_mb": mem.start_mb, "rss_peak_mb": mem.peak_mb,
             "rss_growth_mb": mem.growth_mb, "rss_how": mem.how, "awq_mappings_dropped": dropped, "threads": torch.get_num_threads(),
             "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                          "transformers": transformers.__version__, "torch": torch.__version__}}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
