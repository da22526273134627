"""The peers of lowbit's HQQ, GPTQ and AWQ for ``benchmarks/algorithms.py``: the ``hqq`` package's
optimizer (in this process) and llm-compressor's GPTQModifier / AWQModifier (in a subprocess with
its own venv, ``benchmarks/llmc_driver.py``).

Each peer quantizes exactly the modules ``quantize_``'s plan picks for the config, each at the
group size the plan fits to it (a 576-wide layer under ``group_size=128`` gets 64), and puts its
dequantized weights into the float model, so the benchmark's perplexity measures the peer's own
qparams (and, for AWQ, its scaled weights and folded norms) with lowbit's evaluation code.

The peers' specs:

* ``hqq`` (``HQQLinear`` with ``BaseQuantizeConfig(nbits=4, group_size=g)``, the package's
  defaults): ``axis=1`` (groups of ``g`` along in_features, as ours), asymmetric uint4 ``[0, 15]``,
  min/max scale kept as is, the zero point starts at ``round(-min / s)`` (``round_zero=True`` at
  4 bits) and is then optimized freely, so it is stored as a float (lowbit's
  ``zero_point_domain="float"``, not the default int8 zero point); ``compute_dtype=float32`` here
  (the default float16 would round the qparams of a float32 model).
* llm-compressor: ``QuantizationArgs(num_bits=4, type="int", strategy="group", symmetric=False)``
  (the ``W4A16_ASYM`` preset at our group sizes): int4 codes with an integer zero point, min/max
  observer, the same grid as lowbit's uint4 with an int zero point. GPTQModifier's defaults:
  block 128, damping 1%, ``actorder="static"`` (the peer of lowbit's ``act_order=True``).
  AWQModifier's defaults (``duo_scaling=True``, ``n_grid=20``, Llama mappings; on SmolLM2's
  grouped-query attention it skips v_proj -> o_proj itself, the shapes differing) then
  QuantizationModifier. Calibration: the same windows as lowbit's GPTQ, in batches of 8 (as
  lowbit's ``gptq``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
LLMC_PYTHON = ROOT.parent / ".venv-llmc" / "bin" / "python"


@dataclass
class Measured:
    """What a method that runs its work elsewhere reports instead of the in-process numbers."""

    seconds: float
    rss_growth_mb: float
    extra: dict


def _int4_groups(model: nn.Module, config, who: str) -> dict[str, int]:
    """module name -> group size, as quantize_'s plan gives them; asymmetric int4 only."""
    from lowbit.quantize.plan import plan_quantization

    groups = {}
    for step in plan_quantization(model, config).steps:
        c = step.config
        if type(c).__name__ != "Int4WeightOnlyConfig" or c.symmetric:
            raise NotImplementedError(f"{who} here takes Int4WeightOnlyConfig(symmetric=False) only, got {c!r}")
        groups[step.fqn] = c.group_size
    return groups


def check_on_grid(model: nn.Module, groups: dict[str, int], who: str) -> None:
    """Raise unless each group of each named weight holds at most 16 distinct values (a 4-bit grid):
    a peer that left a weight float would otherwise pass unseen."""
    for name, g in groups.items():
        w = model.get_submodule(name).weight.detach().reshape(-1, g).sort(dim=1).values
        distinct = (w.diff(dim=1) != 0).sum(dim=1) + 1
        if int(distinct.max()) > 16:
            raise RuntimeError(f"{who}: {name}.weight has a group of {g} with {int(distinct.max())} distinct values, "
                               "not a 4-bit grid")


# --- hqq -----------------------------------------------------------------------------------------


def hqq_missing() -> str | None:
    """Why the hqq package can't run here, or None."""
    if importlib.util.find_spec("hqq") is None:
        return "the hqq package is not installed (pip install torch==2.13.0 hqq)"
    return None


def hqq_package_(model: nn.Module, config) -> nn.Module:
    """Each selected linear's weight replaced by the hqq package's quantize-dequantize at 4 bits,
    its own default config (``BaseQuantizeConfig``) at the plan's group size."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    groups = _int4_groups(model, config, "the hqq package")
    for name, g in groups.items():
        linear = model.get_submodule(name)
        h = HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=g), compute_dtype=torch.float32, device="cpu",
                      del_orig=False)
        with torch.no_grad():
            linear.weight.copy_(h.dequantize().reshape(linear.weight.shape))
    check_on_grid(model, groups, "hqq")
    return model


# --- llm-compressor ------------------------------------------------------------------------------


@functools.cache
def llmc_missing() -> str | None:
    """Why llm-compressor can't run here, or None."""
    if not LLMC_PYTHON.exists():
        return (f"no {LLMC_PYTHON} (python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 "
                "llmcompressor)")
    r = subprocess.run([str(LLMC_PYTHON), "-c", "import llmcompressor"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"llmcompressor does not import in {LLMC_PYTHON}: {r.stderr.strip().splitlines()[-1:]}"
    return None


class LLMCompressor:
    """Runs llm-compressor on copies of one float model (saved once, on first use) with fixed
    calibration windows. ``run(model, config, algorithm)`` loads the result into ``model``.
    ``tokenizer`` (the model's, a transformers tokenizer) is saved beside the model: ``oneshot``
    insists on a processor, though the calibration comes as token ids."""

    def __init__(self, base: nn.Module, tokenizer, calibration: torch.Tensor, threads: int, batch_size: int = 8):
        self.base, self.tokenizer, self.calibration = base, tokenizer, calibration
        self.threads, self.batch_size = threads, batch_size
        self._dir: tempfile.TemporaryDirectory | None = None

    def _prepare(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lowbit-llmc-")
            work = Path(self._dir.name)
            self.base.save_pretrained(work / "model")
            self.tokenizer.save_pretrained(work / "model")  # oneshot wants a processor even for token ids
            torch.save(self.calibration.to(torch.int64).contiguous(), work / "calibration.pt")
        return Path(self._dir.name)

    def run(self, model: nn.Module, config, algorithm: str, actorder: str | None = "static") -> Measured:
        work = self._prepare()
        out = Path(tempfile.mkdtemp(prefix="job-", dir=work))
        groups = _int4_groups(model, config, "llm-compressor")
        job = {"model": str(work / "model"), "calibration": str(work / "calibration.pt"), "algorithm": algorithm,
               "groups": groups, "symmetric": False, "actorder": actorder,
               "batch_size": self.batch_size, "threads": self.threads, "out": str(out)}
        (out / "job.json").write_text(json.dumps(job))
        log = out / "log.txt"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            p = subprocess.Popen([str(LLMC_PYTHON), str(ROOT / "llmc_driver.py"), str(out / "job.json")],
                                 stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"llm-compressor {algorithm} failed (exit {p.returncode}); log {log}:\n{tail}")
        stats = json.loads((out / "stats.json").read_text())
        state = torch.load(out / "state.pt", weights_only=True)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise RuntimeError(f"llm-compressor's state lacks {len(missing)} of the model's entries, e.g. {missing[:3]}")
        for k, v in own.items():
            if state[k].shape != v.shape:
                raise RuntimeError(f"llm-compressor's {k} has shape {tuple(state[k].shape)}, the model {tuple(v.shape)}")
        model.load_state_dict({k: state[k] for k in own}, strict=True)
        check_on_grid(model, groups, f"llm-compressor {algorithm}")
        (out / "state.pt").unlink()
        extra = {"subprocess_wall_s": round(wall, 1), "subprocess_peak_rss_mb": round(usage.ru_maxrss / 1024),
                 "rss_start_mb": round(stats["rss_start_mb"]), "rss_how": stats["rss_how"],
                 "batch_size": self.batch_size, "threads": stats["threads"], **stats["versions"]}
        if algorithm == "gptq":
            extra["actorder"] = actorder
        if stats["awq_mappings_dropped"]:
            extra["awq_mappings_dropped"] = stats["awq_mappings_dropped"]
        return Measured(stats["seconds"], stats["rss_growth_mb"], extra)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def peer_methods(base: nn.Module, tokenizer, calibration: torch.Tensor, threads: int) -> tuple[dict, Callable, LLMCompressor]:
    """(label -> method(model, config), label -> why that peer can't run here or None, the
    llm-compressor runner to close)."""
    llmc = LLMCompressor(base, tokenizer, calibration, threads)
    todo = {
        "hqq (pkg)": hqq_package_,
        "llm-compressor GPTQ": lambda m, c: llmc.run(m, c, "gptq"),
        "llm-compressor GPTQ no-actorder": lambda m, c: llmc.run(m, c, "gptq", actorder=None),
        "llm-compressor AWQ": lambda m, c: llmc.run(m, c, "awq"),
    }
    return todo, lambda label: hqq_missing() if label.startswith("hqq") else llmc_missing(), llmc
