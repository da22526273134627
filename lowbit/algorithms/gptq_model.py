"""``gptq(model, config, calibration)``: GPTQ over a whole model, one decoder block at a time.

Per block: its inputs (the quantized previous blocks' outputs) run through it once with hooks
that accumulate each selected linear's Hessian (each forward ends as soon as every hooked linear
has its inputs: a block's ``down_proj`` matmul and what follows are skipped); each linear is
solved (:mod:`lowbit.algorithms.gptq`; with 2 threads up to one per solve, the block's solves run
side by side, one intra-op thread each); the codes become the config's own tensor; then the
quantized block runs again to make the next block's inputs. Linears fed the same input tensor
(q/k/v, gate/up) share one ``X^T X`` product and, with the same per-row spec, are solved as one
stacked weight (rows are independent in GPTQ, so the codes are those of separate solves).
Selected linears outside the blocks (an untied ``lm_head``) are solved last, from one more pass
of the whole quantized model.
With ``process_group=`` the ranks each calibrate on their own slice, sum the Hessians in the
union's order and share the solves (:mod:`lowbit.algorithms.distributed`).
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowbit.algorithms._weights import integer_weight_spec, write_weight
from lowbit.algorithms.blocks import capture_block_inputs, find_blocks, forward_kwargs, make_batches, run_block
from lowbit.algorithms.distributed import all_reduce_ints, ordered_sums, solve_shared
from lowbit.algorithms.gptq import Hessian, check_options, gptq_quantize, gram, output_sqnrs
from lowbit.configs.base import QuantConfig
from lowbit.primitives.affine import fake_quantize_affine
from lowbit.quantize.plan import ConfigMapping, Step, plan_quantization

__all__ = ["gptq", "GPTQReport", "GPTQLayer"]

_log = logging.getLogger("lowbit")


@dataclass(frozen=True)
class GPTQLayer:
    """One linear's outcome: its damping and output SQNR on the calibration inputs (GPTQ and,
    for comparison, round-to-nearest with the same spec: None when ``gptq(compare_rtn=False)``)."""

    fqn: str
    config: str
    shape: tuple[int, int]
    damp: float  # relative to mean(diag H); the damp asked for unless the factorization failed
    tries: int  # factorizations tried; > 1 means the damping was raised
    sqnr_db: float
    rtn_sqnr_db: float | None


@dataclass
class GPTQReport:
    """What ``gptq`` did: every linear it quantized, in order, and the calibration it used."""

    blocks: str  # the name of the blocks' nn.ModuleList
    samples: int  # calibration sequences
    tokens: int  # calibration tokens
    seconds: float
    summary: str  # quantize_'s plan line: what was quantized, what stayed float and why
    layers: list[GPTQLayer] = field(default_factory=list)

    @property
    def raised_damping(self) -> list[GPTQLayer]:
        """The linears whose damping had to be raised."""
        return [layer for layer in self.layers if layer.tries > 1]

    def to_table(self) -> str:
        """A markdown table, one row per linear (the RTN column only when it was computed)."""
        rtn = any(r.rtn_sqnr_db is not None for r in self.layers)
        rows = ["| linear | shape | damp | GPTQ SQNR dB |" + (" RTN SQNR dB |" if rtn else ""),
                "|---|---|---|---|" + ("---|" if rtn else "")]
        for r in self.layers:
            damp = f"{r.damp:g}" + (f" (raised, {r.tries} tries)" if r.tries > 1 else "")
            row = f"| {r.fqn} | {r.shape[0]}x{r.shape[1]} | {damp} | {r.sqnr_db:.2f} |"
            if rtn:
                row += " - |" if r.rtn_sqnr_db is None else f" {r.rtn_sqnr_db:.2f} |"
            rows.append(row)
        return "\n".join(rows)


class _HessiansDone(Exception):
    """Raised by the last pre-hook a forward needs: every hooked linear has its inputs."""


class _Collector:
    """Forward pre-hooks accumulating each step's Hessian; an input tensor several linears read
    (q/k/v) is multiplied out once per batch.

    A forward run through :meth:`forward` ends once every hooked linear has been called in it as
    often as in the first forward that ran to the end and called them all: the hook that completes
    that count adds its input and raises :class:`_HessiansDone` instead of letting its linear run,
    so what follows (a block's ``down_proj`` matmul, the residual) is skipped; the Hessians are
    those of the whole forward. A forward that calls some linear less often (MoE experts the data
    do not route to) or more often runs to the end. It assumes a forward that has called each
    linear as often as a complete one did calls none of them again (true of a block of fixed
    structure).
    """

    stop_early = True  # False: every forward runs to the end (the tests compare the two)

    def __init__(self, steps: list[Step], keep: bool = False):
        self.hessians = {s.fqn: Hessian(s.module.weight.shape[1], s.module.weight.device) for s in steps}
        # keep: each batch's product is kept, not added (the ranks add them in the union's order)
        self.kept: dict[str, list[torch.Tensor]] | None = {s.fqn: [] for s in steps} if keep else None
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._calls = dict.fromkeys(self.hessians, 0)  # this forward's calls per linear
        self._full: dict[str, int] | None = None  # the calls of a complete forward that called every linear
        self._left = -1  # calls left until this forward has them all (< 0: not known yet, or too many)
        self._handles = [s.module.register_forward_pre_hook(self._hook(s.fqn), with_kwargs=True) for s in steps]

    def _hook(self, fqn: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            hit = self._cache.get(id(x))
            if hit is None or hit[0] is not x:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                hit = self._cache[id(x)] = (x, gram(x2), x2.shape[0])
            if self.kept is None:
                self.hessians[fqn].add_product(hit[1], hit[2])
            else:
                self.kept[fqn].append(hit[1])
                self.hessians[fqn].count += hit[2]
            calls = self._calls[fqn] = self._calls[fqn] + 1
            if self._full is not None and self._left >= 0:
                if calls > self._full[fqn]:
                    self._left = -1  # more calls than a complete forward made: run this one to the end
                else:
                    self._left -= 1
                    if self._left == 0:
                        raise _HessiansDone

        return hook

    def forward(self, fn: Callable, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)`` (one batch's forward) with the hooks on, ended early once the
        hooked linears have their inputs (class docstring); the output is not kept."""
        self._cache.clear()
        self._calls = dict.fromkeys(self._calls, 0)
        self._left = -1 if self._full is None else sum(self._full.values())
        try:
            fn(*args, **kwargs)
        except _HessiansDone:
            return
        finally:
            self._cache.clear()
        if self._full is None and self.stop_early and all(self._calls.values()):
            self._full = dict(self._calls)

    def remove(self) -> None:
        self._cache.clear()
        for h in self._handles:
            h.remove()


def _groups(steps: list[Step], hessians: dict[str, Hessian]) -> list[list[Step]]:
    """Steps with one per-row spec and one Hessian stacked into one solve."""
    missing = [s.fqn for s in steps if hessians[s.fqn].count == 0]
    if missing:
        raise ValueError(f"no calibration input reached {missing}: GPTQ needs their inputs (map them to None to "
                         "leave them float, or quantize them with quantize_)")
    groups: list[list[Step]] = []
    for s in steps:
        spec = s.config.weight_spec()
        for g in groups:
            h0, h1 = hessians[g[0].fqn], hessians[s.fqn]
            if (g[0].config.weight_spec() == spec and spec.block_size(s.module.weight.shape)[0] == 1
                    and spec.block_size(g[0].module.weight.shape)[0] == 1 and h0.count == h1.count
                    and torch.equal(h0.sum, h1.sum)):
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def _solve_group(g: list[Step], hessians: dict[str, Hessian], opts: dict,
                 compare_rtn: bool = True) -> list[tuple[dict, GPTQLayer]]:
    """GPTQ for one group of steps (stacked when more than one); nothing is written."""
    spec, h = g[0].config.weight_spec(), hessians[g[0].fqn].value()
    weights = [s.module.weight.detach() for s in g]
    res = gptq_quantize(torch.cat(weights) if len(g) > 1 else weights[0], h, spec, **opts)
    out, row = [], 0
    for s, w in zip(g, weights):
        rows = slice(row, row + w.shape[0])
        row += w.shape[0]
        qp_rows = rows if res.scale.shape[0] > 1 else slice(None)
        values = {"qdata": res.qdata[rows], "scale": res.scale[qp_rows],
                  "zero_point": None if res.zero_point is None else res.zero_point[qp_rows]}
        approx = [res.dequantized[rows]] + ([fake_quantize_affine(w.float(), spec)] if compare_rtn else [])
        db = output_sqnrs(w, approx, h)
        layer = GPTQLayer(s.fqn, repr(s.config), tuple(w.shape), res.damp, res.tries, db[0],
                          db[1] if compare_rtn else None)
        out.append((values, layer))
    return out


def _solve(steps: list[Step], hessians: dict[str, Hessian], opts: dict, process_group=None,
           compare_rtn: bool = True) -> list[tuple[Step, dict, GPTQLayer]]:
    """GPTQ for every step (stacking steps with one spec and one Hessian); nothing is written.
    With a process group each rank solves a share of the groups and gets the others' results."""
    groups = _groups(steps, hessians)
    # a solve costs about N K^2 (the column updates) + K^3 (the factorization)
    costs = [float(sum(s.module.weight.shape[0] for s in g)) * g[0].module.weight.shape[1] ** 2
             + float(g[0].module.weight.shape[1]) ** 3 for g in groups]
    if process_group is None:
        solved = _solve_local(groups, costs, lambda g: _solve_group(g, hessians, opts, compare_rtn))
    else:
        solved = solve_shared(groups, costs, lambda g: _solve_group(g, hessians, opts, compare_rtn), process_group,
                              steps[0].module.weight.device)
    return [(s, values, layer) for g, res in zip(groups, solved) for s, (values, layer) in zip(g, res)]


def _solve_local(groups: list, costs: list[float], solve: Callable) -> list:
    """``[solve(g) for g in groups]``; with 2 to ``len(groups)`` intra-op threads, as many Python
    threads each solving whole groups (largest cost first) on one intra-op thread: the solver's
    per-column loop runs on one thread anyway (:func:`lowbit.algorithms.gptq.gptq_quantize`), so
    the other cores would idle. Each solve is the same computation on one thread (the damped
    factorization's last bits may differ from a multi-threaded one; the codes did not on 12 SmolLM2
    linears). More threads than groups: one group at a time, every thread on it."""
    threads = torch.get_num_threads()
    if not 2 <= threads <= len(groups):
        return [solve(g) for g in groups]

    def one(g):
        torch.set_num_threads(1)  # this thread's OpenMP team; the process-wide count is 1 already
        return solve(g)

    order = sorted(range(len(groups)), key=lambda i: -costs[i])
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = {i: pool.submit(one, groups[i]) for i in order}
            return [futures[i].result() for i in range(len(groups))]
    finally:
        torch.set_num_threads(threads)


def _quantize(steps: list[Step], run: Callable[[Callable], None], opts: dict, where: str,
              process_group=None, compare_rtn: bool = True) -> list[GPTQLayer]:
    """Hessians from ``run(forward)``, which calls ``forward(fn, *args, **kwargs)`` once per batch
    (:meth:`_Collector.forward`), summed over the ranks of ``process_group``; then solve every step,
    then write them all."""
    collector = _Collector(steps, keep=process_group is not None)
    try:
        run(collector.forward)
    finally:
        collector.remove()
    if process_group is not None:
        hs = list(collector.hessians.values())
        ordered_sums([h.sum for h in hs], list(collector.kept.values()), process_group)
        collector.kept = None
        for h, n in zip(hs, all_reduce_ints([h.count for h in hs], process_group, hs[0].sum.device)):
            h.count = n
    try:
        solved = _solve(steps, collector.hessians, opts, process_group, compare_rtn)
    except ValueError as e:
        raise ValueError(f"GPTQ failed in {where} (the blocks before it are quantized, the rest is float): {e}") from e
    for s, values, _ in solved:
        write_weight(s.module, s.fqn, s.config, s.shares, **values)
    return [layer for _, _, layer in solved]


def _block_of(fqn: str, prefix: str, n: int) -> int | None:
    if not fqn.startswith(prefix):
        return None
    head = fqn[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < n else None


def gptq(
    model: nn.Module,
    config: QuantConfig | ConfigMapping,
    calibration,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    damp_retries: int = 4,
    qparams: str = "search",
    batch_size: int = 8,
    blocks: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    process_group=None,
    compare_rtn: bool = True,
) -> GPTQReport:
    """Quantize ``model``'s linears in place with GPTQ, into the tensors ``quantize_`` makes.

    Which linear gets which config follows ``quantize_`` exactly (mappings, group-size fallbacks,
    tied weights left float unless named); every chosen config must have an int4 or int8 weight
    (``Int4WeightOnlyConfig``, ``Int8DynamicActivationInt4WeightConfig``,
    ``Int8WeightOnlyConfig``, the int8 activation configs). The result is the same
    ``Int4Tensor``/``Int8Tensor`` with GPTQ's codes and qparams: it runs on the same kernels,
    saves and loads as any quantized model.

    Calibration text must differ from the evaluation text (see :func:`calibration_batches`).
    A damping that had to be raised is logged, warned about once and listed in the report; a
    Hessian that no damping fixes raises (no linear silently gets round-to-nearest).

    Args:
        model: a causal LM taking token ids ``(batch, seq_len)``; its decoder blocks must take the
            same extra arguments (masks, rotary tables) as the first one.
        config: one config, or a mapping as ``quantize_`` takes.
        calibration: int64 ``(samples, seq_len)`` (see :func:`calibration_batches`) or a list of
            2-D token tensors.
        block_size: columns per lazy block of the solver.
        damp: damping relative to ``mean(diag H)`` (1%).
        act_order: quantize columns by decreasing ``diag(H)``, with static groups.
        damp_retries: times the damping may be raised x10 when a factorization fails.
        qparams: ``"search"`` (default: each group's min/max shrunk by the factor in 1.00 .. 0.90
            with the least ``diag(H)``-weighted rounding error, see
            :func:`lowbit.algorithms.gptq.gptq_quantize`) or ``"minmax"`` (the group's min/max, the
            GPTQ paper's and llm-compressor's default). On SmolLM2-135M int4 (act_order, 128 x 256
            calibration) the search gave perplexity 20.543 / 20.507 at g64 / g128 against min/max's
            21.126 / 21.023 and llm-compressor's 20.989 (g64), in about the same time
            (``benchmarks/results/algorithms*.md``).
        batch_size: calibration rows per forward.
        blocks: name of the decoder blocks' ``nn.ModuleList`` (found when None).
        progress: ``progress(done, total)`` after each block.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks) whose ranks each pass their own slice of the calibration data: the
            Hessians are summed over the ranks, each rank solves a share of each block's
            linears and broadcasts them, and every rank ends with the same quantized model.
            When rank r holds the r-th contiguous slice of the union and every slice but the
            last is a multiple of ``batch_size``, the batches' ``X^T X`` are added in the
            single process's order and the result equals ``gptq`` on the union bit for bit
            (each rank keeps its batches' products for a block until the sum passes it);
            other slicings give the union's Hessians up to float32 summation order.
            None: this process alone (unchanged).
        compare_rtn: also report each linear's round-to-nearest output SQNR (``rtn_sqnr_db``,
            a column of ``to_table``): one more round-to-nearest and ``(N, K) x (K, K)`` product per
            linear, about 1.5% of the time on SmolLM2 (int4 g64); False leaves it None.

    Returns:
        :class:`GPTQReport`.

    Raises:
        TypeError / ValueError: as ``quantize_`` for the config; bad calibration; blocks not found;
            a linear no calibration input reaches; a Hessian no damping makes positive definite
            (blocks already done stay quantized; the message says where it stopped).
        NotImplementedError: a config whose weight is not int4/int8 by its spec's min/max
            (float8 weights, the fp8-then-int4 rule).

    Example:
        >>> calib = calibration_batches(calib_text, tokenizer, n_samples=128, seq_len=256)
        >>> report = gptq(model, Int4WeightOnlyConfig(group_size=64), calib)
        >>> print(report.to_table())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = plan_quantization(model, config)
    for s in plan.steps:
        integer_weight_spec(s.config, s.fqn, "GPTQ")
    name, layers = find_blocks(model, blocks)
    param = next(model.parameters(), None)
    batches = make_batches(calibration, batch_size, param.device if param is not None else torch.device("cpu"))
    opts = dict(block_size=block_size, damp=damp, act_order=act_order, damp_retries=damp_retries, qparams=qparams)
    check_options(**opts)  # now, not after the first block's forward
    if not isinstance(compare_rtn, bool):
        raise ValueError(f"compare_rtn={compare_rtn!r} must be a bool")
    by_block: dict[int, list[Step]] = {}
    rest: list[Step] = []
    for s in plan.steps:
        i = _block_of(s.fqn, name + "." if name else "", len(layers))
        (rest if i is None else by_block.setdefault(i, [])).append(s)

    start = time.perf_counter()
    samples, tokens = sum(b.shape[0] for b in batches), sum(b.numel() for b in batches)
    if process_group is not None:  # the report counts the union
        samples, tokens = all_reduce_ints([samples, tokens], process_group, batches[0].device)
    report = GPTQReport(name, samples, tokens, 0.0, plan.describe())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if by_block:
                inputs = capture_block_inputs(model, layers[0], batches)
                last = max(by_block)
                for i, layer in enumerate(layers[: last + 1]):
                    t0 = time.perf_counter()
                    steps = by_block.get(i, [])
                    if steps:
                        def run(forward, layer=layer, inputs=inputs):
                            for args, kwargs in inputs:
                                forward(layer, *args, **kwargs)

                        report.layers += _quantize(steps, run, opts, f"{name}.{i}", process_group, compare_rtn)
                    inputs = run_block(layer, inputs) if i < last else None
                    _log.info("GPTQ: %s.%d done (%d linears, %.1f s)", name, i, len(steps), time.perf_counter() - t0)
                    if progress is not None:
                        progress(i + 1, last + 1)
                del inputs
            if rest:
                extra = forward_kwargs(model)

                def run_model(forward):
                    for b in batches:
                        forward(model, b, **extra)

                report.layers += _quantize(rest, run_model, opts, f"the linears outside {name}", process_group,
                                           compare_rtn)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    raised = report.raised_damping
    for r in raised:
        _log.warning("GPTQ: %s needed damp %g (%d factorizations)", r.fqn, r.damp, r.tries)
    if raised:
        warnings.warn(f"GPTQ raised the damping of {len(raised)} linear(s) (damp={damp} failed to factorize): "
                      + ", ".join(f"{r.fqn} -> {r.damp:g}" for r in raised), UserWarning, stacklevel=2)
    line = "gptq: " + plan.describe()
    if plan.notable:
        warnings.warn(line, UserWarning, stacklevel=2)
    else:
        _log.info(line)
    return report
