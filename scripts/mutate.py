"""Mutation testing for lowbit's numerics: does the test suite notice a small wrong change?

Each mutant changes one spot of one source file (the operators are in ``scripts/mutants.py``).
The chosen tests run against it, stopping at the first failure: the mutant is *killed* when a
test fails or the run times out, *survived* when every test passes. A survivor is a gap in the
tests or an *equivalent* mutant (the change cannot alter any result); equivalents are listed
with a reason in a JSON file (``--equivalent``), matched by file, source line and description
so that the list survives unrelated edits. A mutant in a statement that no test executes on this
host (a C++ or CUDA path here) is *unreached*: counted, not run.

The shared working tree is never touched: sources and tests are copied into a scratch directory,
lowbit is imported from there, and C++ builds go to a scratch ``LOWBIT_CACHE``. One pytest
session collects the tests once; then, per mutant, a forked child swaps the mutated function's
code object in place (every module that imported the function holds that same object) and runs
the collected tests. A mutant at module level, or in code that runs at import (a table built
once), is written into a second copy and tested in a fresh interpreter. Hypothesis runs
derandomized (``CI=true``) with the ``mutation`` profile of ``tests/conftest.py`` (fewer
examples), so a run is reproducible.

Usage::

    python scripts/mutate.py --equivalent scripts/mutation_equivalent.json --json out.json
    python scripts/mutate.py --files lowbit/dtypes.py --list            # show the mutants only
    python scripts/mutate.py --rerun out.json --json out2.json          # survivors again, merged
    python scripts/mutate.py --merge a.json b.json --md benchmarks/results/mutation.md
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

from mutants import mutant_source, mutation_points

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_FILES = [
    "lowbit/primitives/affine.py",
    "lowbit/primitives/float8.py",
    "lowbit/primitives/packing.py",
    "lowbit/primitives/rules.py",
    "lowbit/spec.py",
]
# in this order: with -x, the hand-computed values (fast, and they catch most mutants) run first
DEFAULT_TESTS = [
    "tests/primitives/test_hand_values.py",
    "tests/primitives/test_arguments.py",
    "tests/primitives/test_affine.py",
    "tests/primitives/test_float8.py",
    "tests/primitives/test_packing.py",
    "tests/primitives/test_rules.py",
    "tests/test_spec.py",
    "tests/test_dtypes.py",
    "tests/test_granularity.py",
    "tests/primitives/test_properties.py",
]

# --- running ----------------------------------------------------------------------------------


@dataclass
class Result:
    file: str
    index: int
    line: int
    desc: str
    source_line: str
    status: str = "pending"  # killed | timeout | survived | equivalent | unreached (no test runs its line)
    killer: str = ""
    seconds: float = 0.0
    scope: str | None = None
    reason: str = ""


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", "*.so")
    shutil.copytree(ROOT / "lowbit", dst / "lowbit", ignore=ignore)
    shutil.copytree(ROOT / "tests", dst / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _pytest_args(tests: list[str]) -> list[str]:
    return ["-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE", "--import-mode=importlib", *tests]


def _find_code(code: types.CodeType, qualname: str) -> types.CodeType | None:
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            if c.co_qualname == qualname:
                return c
            found = _find_code(c, qualname)
            if found is not None:
                return found
    return None


def _live_function(module, qualname: str):
    """The function object ``module.<qualname>`` runs (through staticmethod, property, wrappers)."""
    obj = module
    for part in qualname.split("."):
        obj = obj.__dict__.get(part) if isinstance(obj, type) else getattr(obj, part, None)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            obj = obj.fget
    while hasattr(obj, "__wrapped__") or hasattr(obj, "_init_fn"):  # functools wrappers, torch custom ops
        obj = getattr(obj, "__wrapped__", None) or obj._init_fn
    return obj if isinstance(obj, types.FunctionType) else None


@functools.cache
def _defined_twice(path: Path, qualname: str) -> bool:
    top = qualname.split(".")[0]
    tree = ast.parse(path.read_text())
    return sum(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == top for n in tree.body) > 1


def _module_name(file: str) -> str:
    return file.removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def _fast_patch(r: Result, tree: Path):
    """``(function, mutated code)`` when the mutant sits inside a plain function's body: the child
    swaps the code in place (every importer holds that same function object). None otherwise."""
    if r.scope is None or _defined_twice(tree / r.file, r.scope):  # e.g. several `def _` fake kernels
        return None
    module = importlib.import_module(_module_name(r.file))
    if not Path(module.__file__).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{module.__name__} was imported from {module.__file__}, not from the copy {tree}")
    fn = _live_function(module, r.scope)
    src = (tree / r.file).read_text()
    code = _find_code(compile(mutant_source(src, r.index), str(tree / r.file), "exec"), r.scope)
    if fn is None or code is None or len(code.co_freevars) != len(fn.__code__.co_freevars):
        return None
    return fn, code


def _tracer(files: set[str], hits: set):
    """A ``sys.settrace`` function recording ``(file, line)`` for the given files only."""

    def local(frame, event, arg):
        if event == "line":
            hits.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename in files else None

    return global_


def _run_items(session, patch, log: Path, trace: tuple[set[str], Path] | None = None) -> None:
    """In a forked child: apply ``patch``, run the collected tests (stopping at the first failure,
    ``-x``), exit 1 if one failed. Output goes to ``log``. ``trace``: record the lines run in
    these files (the baseline, to tell which mutants no test reaches) and write them as JSON."""
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills what it started too (compilers)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if patch is not None:
            fn, code = patch
            fn.__code__ = code
        hits: set = set()
        if trace is not None:
            sys.settrace(_tracer(trace[0], hits))
            threading.settrace(_tracer(trace[0], hits))
        items = session.items
        for i, item in enumerate(items):
            failed = session.testsfailed
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=items[i + 1] if i + 1 < len(items) else None)
            if session.testsfailed > failed:
                print(f"\nFAILED {item.nodeid}")
            if session.shouldfail or session.shouldstop:
                break
        rc = 1 if session.testsfailed else 0
        if trace is not None:
            sys.settrace(None)
            trace[1].write_text(json.dumps(sorted(hits)))
    except BaseException:  # noqa: BLE001: the child must exit, whatever happened
        import traceback

        traceback.print_exc()
        rc = 98
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _fresh_process(tree: Path, tests: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run pytest in a new interpreter importing lowbit from ``tree`` (mutants at module level)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *_pytest_args(tests)], cwd=tree, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        _kill_group(proc.pid)
        proc.wait()
    return rc, time.monotonic() - t0


@functools.cache
def _spans(path: Path) -> list[tuple[int, int]]:
    return [(n.lineno, n.end_lineno) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.stmt)]


def _statement_span(path: Path, line: int) -> tuple[int, int]:
    """The lines of the innermost statement holding ``line``."""
    inside = [(lo, hi) for lo, hi in _spans(path) if lo <= line <= hi]
    return min(inside, key=lambda s: s[1] - s[0]) if inside else (line, line)


def _killer(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    m = re.search(r"^(FAILED|ERROR) (\S+)", text, re.M)
    return m.group(2) if m else ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(pid: int, timeout: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return None, time.monotonic() - t0
        time.sleep(0.01)


def _match_equivalent(r: Result, equivalents: list[dict]) -> str:
    for e in equivalents:
        if e["file"] == r.file and e["desc"] == r.desc and e["line"].strip() == r.source_line.strip():
            return e["reason"]
    return ""


def _record(r: Result, rc: int | None, secs: float, log: Path, equivalents, done: int, total: int) -> None:
    if rc in (98, 99):
        sys.exit(f"mutant run broke (exit {rc}); see {log}")
    r.status = "timeout" if rc is None else "survived" if rc == 0 else "killed"
    r.killer = _killer(log) if rc else ""
    r.seconds = round(secs, 2)
    if r.status == "survived":
        r.reason = _match_equivalent(r, equivalents)
        if r.reason:
            r.status = "equivalent"
    mark = {"killed": ".", "timeout": "T", "equivalent": "e", "survived": "S"}[r.status]  # unreached: never run
    print(f"[{done}/{total}] {mark} {r.file}:{r.line} {r.desc}" + (f"  <- {r.killer}" if r.killer else ""),
          file=sys.__stdout__, flush=True)


def run(args) -> list[Result]:
    os.environ["CI"] = "true"
    os.environ["LOWBIT_HYPOTHESIS_PROFILE"] = args.profile
    os.environ["OMP_NUM_THREADS"] = "1"  # no thread pool in the parent: forking stays safe

    equivalents = json.loads(Path(args.equivalent).read_text()) if args.equivalent else []
    rerun = None
    if args.rerun:  # the survivors of an earlier run, found again by file, source line and description
        old = json.loads(Path(args.rerun).read_text())["results"]
        rerun = {(r["file"], r["source_line"].strip(), r["desc"]) for r in old if r["status"] in ("survived", "equivalent")}
    todo: list[Result] = []
    for f in args.files:
        src = (ROOT / f).read_text()
        lines = src.splitlines()
        seen = {ast.unparse(ast.parse(src))}  # a mutant that reads like the original or an earlier one is dropped
        for p in mutation_points(src):
            if args.only and not re.search(args.only, f"{f}:{p.line}:{p.desc}"):
                continue
            if rerun is not None and (f, lines[p.line - 1].strip(), p.desc) not in rerun:
                continue
            text = mutant_source(src, p.index)
            if text in seen:
                continue
            seen.add(text)
            todo.append(Result(f, p.index, p.line, p.desc, lines[p.line - 1] if p.line else "", scope=p.scope))
    if args.list:
        for r in todo:
            print(f"{r.file}:{r.line} #{r.index} [{r.scope or 'module'}] {r.desc}    | {r.source_line.strip()}")
        print(f"{len(todo)} mutants")
        return []

    scratch = Path(tempfile.mkdtemp(prefix="lowbit-mutate-"))
    # C++ builds (a mutant of kernels/_ext.py may start one) go to the scratch directory, never to
    # the shared cache: a half-built or wrongly built extension must not outlive the run
    os.environ["LOWBIT_CACHE"] = str(scratch / "cache")
    tree, slow_tree = scratch / "tree", scratch / "slow"
    _copy_tree(tree)
    _copy_tree(slow_tree)
    busy: dict[int, tuple[Result | None, float, Path]] = {}  # pid -> (mutant or None for the baseline, start, log)

    def terminate(*_):  # SIGTERM: stop the children (and what they started), remove the scratch trees, exit
        for pid in list(busy):
            _kill_group(pid)
        shutil.rmtree(scratch, ignore_errors=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, terminate)
    try:
        sys.path.insert(0, str(tree))
        import hypothesis  # noqa: F401  (imported once, before forking)
        import pytest
        import torch

        torch.set_num_threads(1)
        # import lowbit recording which lines of the mutated files run at import: a function that runs
        # then (a table built once) keeps its result, so its mutants need a fresh interpreter
        at_import: set = set()
        sys.settrace(_tracer({str(tree / f) for f in args.files}, at_import))
        try:
            importlib.import_module("lowbit")
            for f in args.files:
                importlib.import_module(_module_name(f))
        finally:
            sys.settrace(None)
        at_import = {(Path(f).relative_to(tree).as_posix(), n) for f, n in at_import}

        def runs_at_import(r: Result) -> bool:
            lo, hi = _statement_span(tree / r.file, r.line)
            return any((r.file, n) in at_import for n in range(lo, hi + 1))

        fast = [(r, None if runs_at_import(r) else _fast_patch(r, tree)) for r in todo]
        slow = [r for r, p in fast if p is None]
        fast = [(r, p) for r, p in fast if p is not None]
        state = {"done": 0, "limit": args.timeout}

        class MutantLoop:
            """Collect once; then run the collected tests once per mutant, each in a forked child."""

            @pytest.hookimpl(tryfirst=True)
            def pytest_runtestloop(self, session):
                base_log, hits_file = scratch / "baseline.log", scratch / "lines.json"
                pid = os.fork()
                if not pid:
                    _run_items(session, None, base_log, ({str(tree / f) for f in args.files}, hits_file))
                rc, secs = _wait(pid, args.baseline_timeout)
                if rc != 0:  # the unmutated copy must pass
                    state["baseline"] = f"baseline run failed (exit {rc}); see {base_log}"
                    return True
                state["limit"] = limit = args.timeout or max(20.0, 3 * secs + 10)
                ran = {(Path(f).relative_to(tree).as_posix(), n) for f, n in json.loads(hits_file.read_text())}
                queue = []
                for r, patch in fast:  # a mutant in a statement no test runs cannot be killed: not run
                    lo, hi = _statement_span(tree / r.file, r.line)
                    if any((r.file, n) in ran for n in range(lo, hi + 1)):
                        queue.append((r, patch))
                    else:
                        r.status, state["done"] = "unreached", state["done"] + 1
                print(f"baseline passes in {secs:.1f} s; {len(todo)} mutants ({len(fast)} patched in memory, "
                      f"{len(fast) - len(queue)} of them in lines no test runs, {len(slow)} in a fresh process); "
                      f"limit {limit:.0f} s each", file=sys.__stdout__, flush=True)
                while queue or busy:
                    while queue and len(busy) < args.jobs:
                        r, patch = queue.pop(0)
                        log = scratch / f"m{r.index}.log"
                        pid = os.fork()
                        if not pid:
                            _run_items(session, patch, log)
                        busy[pid] = (r, time.monotonic(), log)
                    for pid, (r, t0, log) in list(busy.items()):
                        finished, status = os.waitpid(pid, os.WNOHANG)
                        elapsed = time.monotonic() - t0
                        if not finished and elapsed <= limit:
                            continue
                        _kill_group(pid)  # a timed-out child, or what a finished one left running
                        if not finished:
                            os.waitpid(pid, 0)
                        del busy[pid]
                        state["done"] += 1
                        _record(r, os.waitstatus_to_exitcode(status) if finished else None, elapsed, log,
                                equivalents, state["done"], len(todo))
                        if not args.keep:
                            log.unlink(missing_ok=True)
                    time.sleep(0.005)
                return True

        cwd = os.getcwd()
        os.chdir(tree)
        try:
            pytest.main([*_pytest_args(args.tests), "-s"], plugins=[MutantLoop()])
        finally:
            os.chdir(cwd)
        if "baseline" in state:
            sys.exit(state["baseline"])
        for r in slow:  # module-level mutants: the mutated file in a copy, a new interpreter
            target = slow_tree / r.file
            original = target.read_text()
            target.write_text(mutant_source(original, r.index))
            log = scratch / f"m{r.index}.log"
            try:
                rc, secs = _fresh_process(slow_tree, args.tests, log, state["limit"] + 30)
            finally:
                target.write_text(original)
            state["done"] += 1
            _record(r, rc, secs, log, equivalents, state["done"], len(todo))
    finally:
        for pid in list(busy):
            _kill_group(pid)
            os.waitpid(pid, 0)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return todo


STATUSES = ("killed", "timeout", "survived", "equivalent", "unreached")


def summary(results: list) -> dict:
    """Counts per status; ``score`` = killed (timeouts included) / (mutants - equivalent - unreached)."""
    status = [r["status"] if isinstance(r, dict) else r.status for r in results]
    count = {s: status.count(s) for s in STATUSES}
    live = len(status) - count["equivalent"] - count["unreached"]
    return {"mutants": len(status), **count, "score": round((count["killed"] + count["timeout"]) / live, 4) if live else 1.0}


def write_md(path: Path, runs: list[dict], note: str = "") -> None:
    """A summary of one or more runs' JSON (``--merge``): totals, a table per file, every survivor,
    every equivalent mutant with its reason, and the unreached ones counted per file."""
    lines = ["# Mutation testing", "", "Made by `scripts/mutate.py` (operators: `scripts/mutants.py`); score = killed / "
             "(mutants - equivalent - unreached). Timeouts count as killed.", ""] + ([note, ""] if note else [])
    for run in runs:
        s = run["summary"]
        lines += [f"## `{' '.join(run['files'])}`", "",
                  f"Tests per mutant (`-x`): `{' '.join(run['tests'])}`.", "",
                  f"**{s['mutants']} mutants: {s['killed']} killed, {s['timeout']} timed out, {s['survived']} survived, "
                  f"{s['equivalent']} equivalent, {s['unreached']} in lines no test reaches on this host; "
                  f"score {100 * s['score']:.1f}%.**", "",
                  "| file | mutants | killed | equivalent | unreached | survived |", "|---|---|---|---|---|---|"]
        by_file: dict[str, list[dict]] = {}
        for r in run["results"]:
            by_file.setdefault(r["file"], []).append(r)
        for f, rs in by_file.items():
            c = summary(rs)
            lines.append(f"| `{f}` | {c['mutants']} | {c['killed'] + c['timeout']} | {c['equivalent']} | "
                         f"{c['unreached']} | {c['survived']} |")
        surv = [r for r in run["results"] if r["status"] == "survived"]
        lines += ["", "Surviving mutants:", ""]
        lines += [f"- `{r['file']}:{r['line']}` {r['desc']}: `{r['source_line'].strip()}`" for r in surv] or ["- none"]
        lines += ["", "Equivalent mutants (the change cannot alter a result):", ""]
        lines += [f"- `{r['file']}:{r['line']}` {r['desc']}: `{r['source_line'].strip()}`: {r['reason']}"
                  for r in run["results"] if r["status"] == "equivalent"] or ["- none"]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="sources to mutate (repo-relative)")
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="pytest targets run per mutant")
    ap.add_argument("--only", default="", help="regex on 'file:line:description' selecting mutants")
    ap.add_argument("--rerun", default="", help="only the survivors (and equivalents) of this earlier --json; "
                    "--json then writes that run's results with these verdicts in place")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (one tree copy each)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per mutant (default 3x baseline + 10)")
    ap.add_argument("--baseline-timeout", type=float, default=600)
    ap.add_argument("--profile", default="mutation", help="hypothesis profile (tests/conftest.py)")
    ap.add_argument("--equivalent", default="", help="JSON list of {file, line, desc, reason}")
    ap.add_argument("--json", default="", help="write every result here")
    ap.add_argument("--md", default="", help="write the summary table here")
    ap.add_argument("--merge", nargs="+", default=[], help="earlier --json files: write --md/--json for them, run nothing")
    ap.add_argument("--note", default="", help="a markdown file whose text goes under the --md title")
    ap.add_argument("--keep", action="store_true", help="keep the scratch trees and logs")
    args = ap.parse_args(argv)
    if args.merge:  # the report of earlier runs, no mutants run
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs}, indent=1) + "\n")
        if args.md:
            write_md(Path(args.md), runs, Path(args.note).read_text().strip() if args.note else "")
        return 0
    results = run(args)
    if not results:
        return 0
    rows = [asdict(r) for r in results]
    if args.rerun:  # the earlier run's results, its survivors replaced by this run's verdicts
        fresh: dict[tuple, list[dict]] = {}
        for r in rows:
            fresh.setdefault((r["file"], r["source_line"].strip(), r["desc"]), []).append(r)
        rows = []
        for r in json.loads(Path(args.rerun).read_text())["results"]:  # same walk order: pop in turn
            again = fresh.get((r["file"], r["source_line"].strip(), r["desc"]))
            new = again.pop(0) if again else r
            rows.append(new if r["status"] in ("survived", "equivalent") else r)
    summ = summary(rows)
    print(json.dumps(summ))
    for r in rows:
        if r["status"] == "survived":
            print(f"SURVIVED {r['file']}:{r['line']} {r['desc']}    | {r['source_line'].strip()}")
    out = {"summary": summ, "files": args.files, "tests": args.tests, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.md:
        write_md(Path(args.md), [out])
    return 0 if summ["survived"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
