"""Benchmark: transformers checkpoints on disk (lowbit.pretrained and the lowbit command).

Two parts, each quantization in a fresh process (so peak RSS is that quantization's alone):

* ``smollm2``: ``lowbit quantize`` of SmolLM2-135M-Instruct (int8 weight-only, int4 g64), the
  time it reports (whole command, and inside the quantizers), then ``lowbit.from_pretrained`` +
  ``generate()`` of the greedy answer to "What is the capital of France?" against the float model.
* ``memory``: a random-weight float32 Llama written tensor by tensor (default ~4.4 GB: d=2048,
  SwiGLU 5632, 22 layers, vocab 32000, 1 GB shards), quantized by the streaming
  ``quantize_pretrained`` (int8 weight-only and int4 g128); peak RSS against the bound "quantized
  size + 2 layers + 500 MB", and (``--naive``) the in-memory route for contrast: transformers
  ``from_pretrained`` + ``quantize_`` + ``save_pretrained``.

    python benchmarks/pretrained.py                       # both parts, writes results/pretrained.{json,md}
    python benchmarks/pretrained.py --parts memory --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent
MB = 2**20
QUESTION = "What is the capital of France?"

_QUANTIZE = textwrap.dedent("""
    import json, sys, time
    import torch, transformers  # noqa: F401  (imports are part of the baseline)
    import lowbit
    from lowbit.cli import build_config
    from lowbit.pretrained import quantize_pretrained

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def peak():  # VmHWM: this process image's high-water mark (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    src, out, name, group, mode = sys.argv[1:6]
    config = build_config(name, group_size=int(group) if group != "-" else None)
    base = rss()
    t0 = time.perf_counter()
    if mode == "streaming":
        s = quantize_pretrained(src, out, config, progress=False)
        extra = {"output_bytes": s.output_bytes, "quantize_seconds": s.quantize_seconds, "source_bytes": s.source_bytes}
    else:  # the in-memory route: the whole float model, then quantize_, then save
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        lowbit.quantize_(model, config)
        lowbit.save_pretrained(model, out)
        extra = {}
    print(json.dumps({"peak_bytes": peak(), "base_bytes": base,
                      "seconds": time.perf_counter() - t0, **extra}))
""")

_GENERATE = textwrap.dedent("""
    import json, sys, torch, transformers, lowbit
    path, question, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = lowbit.from_pretrained(path) if lowbit.pretrained.is_lowbit_checkpoint(path) else \\
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    print(json.dumps({"answer": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}))
""")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run_json(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{r.stderr[-3000:]}")
    try:
        return json.loads(r.stdout), r.stderr  # the lowbit command's --json: one (indented) object
    except json.JSONDecodeError:
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def smollm2(work: Path) -> dict:
    from lowbit.eval.models import load_smollm2, smollm2_cache_dir

    load_smollm2()  # makes the float32 transformers copy if this machine has none yet
    src = smollm2_cache_dir()
    lowbit_cmd = [sys.executable, "-m", "lowbit.cli"]
    rows = []
    float_answer = _run_json([sys.executable, "-c", _GENERATE, str(src), QUESTION, "24"])[0]["answer"]
    for name, group in (("int8wo", None), ("int4", 64)):
        out = work / f"smollm2-{name}"
        cmd = lowbit_cmd + ["quantize", str(src), "--config", name, "--out", str(out), "--overwrite", "--json"]
        if group:
            cmd += ["--group-size", str(group)]
        t0 = time.perf_counter()
        res, err = _run_json(cmd)
        wall = time.perf_counter() - t0
        answer = _run_json([sys.executable, "-c", _GENERATE, str(out), QUESTION, "24"])[0]["answer"]
        rows.append({"config": next(iter(res["configs"])), "command_wall_s": round(wall, 2),
                     "quantize_pretrained_s": round(res["seconds"], 2), "in_quantizers_s": round(res["quantize_seconds"], 2),
                     "source_mb": round(res["source_bytes"] / 1e6, 1), "output_mb": round(res["output_bytes"] / 1e6, 1),
                     "answer": answer, "same_as_float": answer == float_answer,
                     "progress_lines": [l for l in err.splitlines() if l.startswith("lowbit:")]})
        log(f"smollm2 {name}: {rows[-1]}")
    return {"float_answer": float_answer, "rows": rows}


def memory(work: Path, args) -> dict:
    from lowbit.eval.synthetic import write_random_llama

    src = work / "random-llama"
    t0 = time.perf_counter()
    sizes = write_random_llama(src, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                               vocab=args.vocab, shard_bytes=1024 * MB)
    log(f"wrote {sizes['total_bytes'] / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    rows = []
    runs = [("int8wo", None, "streaming"), ("int4", 128, "streaming")] + ([("int8wo", None, "in-memory")] if args.naive else [])
    for name, group, mode in runs:
        out = work / f"q-{name}-{mode}"
        res, _ = _run_json([sys.executable, "-c", _QUANTIZE, str(src), str(out), name, str(group or "-"), mode])
        out_bytes = res.get("output_bytes") or sum(f.stat().st_size for f in out.glob("lowbit-*.safetensors"))
        bound = out_bytes + 2 * sizes["layer_bytes"] + 500 * MB
        rows.append({"config": name + (f" g{group}" if group else ""), "route": mode,
                     "source_gb": round(sizes["total_bytes"] / 1e9, 2), "output_gb": round(out_bytes / 1e9, 3),
                     "peak_rss_gb": round(res["peak_bytes"] / 1e9, 3), "start_rss_gb": round(res["base_bytes"] / 1e9, 3),
                     "bound_gb": round(bound / 1e9, 3), "within_bound": res["peak_bytes"] <= bound,
                     "seconds": round(res["seconds"], 1)})
        log(f"memory: {rows[-1]}")
        for f in out.glob("*"):
            f.unlink()
        out.rmdir()
    return {"model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                      "vocab": args.vocab, **sizes}, "rows": rows}


def render(payload: dict) -> str:
    m = payload["machine"]
    lines = ["# Checkpoints on disk: lowbit quantize on SmolLM2, streaming peak memory", "",
             f"{m['cpu_model']} | torch {m['torch_version']} | {m['torch_threads']} threads | {m['timestamp_utc']}", ""]
    if "smollm2" in payload:
        s = payload["smollm2"]
        lines += ["## SmolLM2-135M-Instruct: `lowbit quantize`, reload, greedy answer", "",
                  f"Question: \"{QUESTION}\" (chat template, 24 new tokens, greedy). Float32 answer: "
                  f"\"{s['float_answer']}\"", "",
                  tabulate([[r["config"], r["command_wall_s"], r["quantize_pretrained_s"], r["in_quantizers_s"],
                             f"{r['source_mb']} -> {r['output_mb']}", r["answer"], "yes" if r["same_as_float"] else "NO"]
                            for r in s["rows"]],
                           headers=["config", "command s (incl. python start)", "quantize_pretrained s", "in quantizers s",
                                    "MB", "answer after reload", "same as float"], tablefmt="github"), ""]
    if "memory" in payload:
        mm = payload["memory"]
        md = mm["model"]
        lines += ["## Peak memory of the streaming quantizer", "",
                  f"Random float32 Llama: d={md['hidden']}, SwiGLU {md['intermediate']}, {md['layers']} layers, vocab "
                  f"{md['vocab']}: {md['total_bytes'] / 1e9:.2f} GB in 1 GB shards; one decoder layer "
                  f"{md['layer_bytes'] / 1e6:.0f} MB. Bound (issue 8): quantized size + 2 layers + 500 MB. Each run in a "
                  "fresh process; peak = VmHWM (the process's own high-water mark), start = RSS after importing torch, transformers and lowbit.", "",
                  tabulate([[r["config"], r["route"], r["source_gb"], r["output_gb"], r["start_rss_gb"], r["peak_rss_gb"],
                             r["bound_gb"], "yes" if r["within_bound"] else "NO", r["seconds"]] for r in mm["rows"]],
                           headers=["config", "route", "float GB", "quantized GB", "start RSS GB", "peak RSS GB",
                                    "bound GB", "within", "s"], tablefmt="github"), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="smollm2,memory")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--naive", action="store_true", help="also measure from_pretrained + quantize_ + save_pretrained")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir, removed)")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    parts = args.parts.split(",")
    payload = {"benchmark": "pretrained", "machine": C.machine_facts()}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        if "smollm2" in parts:
            payload["smollm2"] = smollm2(Path(work))
        if "memory" in parts:
            payload["memory"] = memory(Path(work), args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pretrained.json")
    if os.path.exists(path):  # a run of some parts keeps the other parts' last results
        with open(path) as f:
            previous = json.load(f)
        payload = {**{k: v for k, v in previous.items() if k in ("smollm2", "memory")}, **payload}
    C.write_json(path, payload)
    md = render(payload)
    with open(os.path.join(args.out, "pretrained.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
