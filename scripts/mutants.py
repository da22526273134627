"""The mutation operators of ``scripts/mutate.py``: an ``ast`` walk that numbers every place it
could change a source file by one small wrong edit, and applies one of them.

Operators: arithmetic and bitwise operators swapped (``+``/``-``, ``*``/``/``, ``//`` -> ``/``,
``<<``/``>>``, ``&``/``|``), comparisons moved by one (``<``/``<=``, ``==``/``!=``, ``in``/``not in``,
``is``/``is not``), ``and``/``or``, a ``not`` or a unary minus dropped, an ``if`` or conditional
negated, integer constants + 1, float constants + 1.0, booleans flipped, ``round`` -> ``floor``/``ceil``
(and back), ``amin``/``amax``, ``minimum``/``maximum``, ``min``/``max`` swapped, a ``torch.clamp``
or ``.clamp()`` dropped, a cast (``.float()``, ``.to()``), ``.abs()`` or ``.detach()`` dropped, a
call statement (a check) dropped. Docstrings, messages, ``raise``/``assert`` statements,
``__all__``, imports, annotations and logging are left alone.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass

__all__ = ["Point", "Mutator", "mutation_points", "mutant_source"]

# --- the mutation operators -------------------------------------------------------------------

_BINOP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr,
}
_CMPOP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_SYM = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or",
}
# function or method name -> the names it is swapped with
_CALL_SWAP = {
    "round": ("floor", "ceil"), "floor": ("round",), "ceil": ("round",),
    "round_": ("floor_", "ceil_"), "floor_": ("round_",), "ceil_": ("round_",),
    "amin": ("amax",), "amax": ("amin",), "minimum": ("maximum",), "maximum": ("minimum",),
    "min": ("max",), "max": ("min",),
}
# calls replaced by their first argument (functions) or by their receiver (methods)
_DROP_FUNC = {"clamp", "abs"}
_DROP_METHOD = {"clamp", "clamp_", "abs", "float", "to", "detach", "round", "round_"}
_SKIP_CALLS = {"warn", "info", "warning", "debug", "error"}  # logging and warnings: messages only


@dataclass
class Point:
    """One mutation site."""

    index: int
    line: int
    col: int
    desc: str
    scope: str | None  # qualname of the outermost function whose body holds it (None: module level)


class Mutator(ast.NodeTransformer):
    """Walks a module in a fixed order, numbering every mutation it could make; applies number
    ``target`` (or none when ``target`` is None, to list them)."""

    def __init__(self, target: int | None = None):
        self.target = target
        self.points: list[Point] = []
        self._classes: list[str] = []  # enclosing class names, for qualnames
        self._scope: str | None = None  # outermost function body we are in

    def _offer(self, node: ast.AST, desc: str, make):
        idx = len(self.points)
        self.points.append(Point(idx, getattr(node, "lineno", 0), getattr(node, "col_offset", 0), desc, self._scope))
        if idx == self.target:
            new = make()
            return ast.copy_location(new, node) if isinstance(new, ast.AST) else new
        return None

    # regions that hold no numerics: docstrings, messages, exports, annotations, logging
    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node  # a docstring
        if isinstance(node.value, ast.Call) and _call_name(node.value) in _SKIP_CALLS:
            return node
        self._statement_call = node.value  # dropping its receiver-only method equals dropping the call
        self.generic_visit(node)
        if isinstance(node.value, ast.Call):
            r = self._offer(node, f"drop the call {_short(node.value)}", lambda: ast.Pass())
            if r is not None:
                return r
        return node

    def visit_JoinedStr(self, node):
        return node

    def visit_Raise(self, node):
        return node

    def visit_Assert(self, node):
        return node

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node):
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_FunctionDef(self, node):
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [d if d is None else self.visit(d) for d in node.args.kw_defaults]
        outer = self._scope
        if outer is None:
            self._scope = ".".join([*self._classes, node.name])
        node.body = [self.visit(s) for s in node.body]
        self._scope = outer
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._classes.append(node.name)
        node.body = [self.visit(s) for s in node.body]
        self._classes.pop()
        return node

    def visit_Import(self, node):
        return node

    visit_ImportFrom = visit_Import

    # the operators
    def visit_BinOp(self, node):
        self.generic_visit(node)
        new = _BINOP.get(type(node.op))
        if new is not None:
            r = self._offer(node, f"{_SYM[type(node.op)]} -> {_SYM[new]}", lambda: ast.BinOp(node.left, new(), node.right))
            if r is not None:
                return r
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        new = _BINOP.get(type(node.op))
        if new is not None:
            r = self._offer(node, f"{_SYM[type(node.op)]}= -> {_SYM[new]}=",
                            lambda: ast.AugAssign(node.target, new(), node.value))
            if r is not None:
                return r
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            new = _CMPOP.get(type(op))
            if new is None:
                continue

            def make(i=i, new=new):
                ops = list(node.ops)
                ops[i] = new()
                return ast.Compare(node.left, ops, node.comparators)

            r = self._offer(node, f"{_SYM[type(op)]} -> {_SYM[new]}", make)
            if r is not None:
                return r
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        r = self._offer(node, f"{_SYM[type(node.op)]} -> {_SYM[new]}", lambda: ast.BoolOp(new(), node.values))
        return node if r is None else r

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)):
            what = "not" if isinstance(node.op, ast.Not) else "unary -"
            r = self._offer(node, f"drop {what}", lambda: node.operand)
            if r is not None:
                return r
        return node

    def _negate_test(self, node, kind):
        if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not):
            return  # "drop not" makes that mutant already
        r = self._offer(node.test, f"negate the {kind} condition", lambda: ast.UnaryOp(ast.Not(), node.test))
        if r is not None:
            node.test = r

    def visit_If(self, node):
        self.generic_visit(node)
        self._negate_test(node, "if")
        return node

    def visit_IfExp(self, node):
        self.generic_visit(node)
        self._negate_test(node, "conditional")
        return node

    def visit_While(self, node):
        self.generic_visit(node)
        self._negate_test(node, "while")
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            r = self._offer(node, f"{v} -> {not v}", lambda: ast.Constant(not v))
        elif isinstance(v, int):
            r = self._offer(node, f"{v} -> {v + 1}", lambda: ast.Constant(v + 1))
        elif isinstance(v, float):
            r = self._offer(node, f"{v!r} -> {v + 1.0!r}", lambda: ast.Constant(v + 1.0))
        else:
            r = None
        return node if r is None else r

    def visit_Call(self, node):
        name = _call_name(node)
        if name in _SKIP_CALLS:
            return node
        self.generic_visit(node)
        func = node.func
        for other in _CALL_SWAP.get(name, ()):
            def make(other=other):
                f = copy.copy(func)
                if isinstance(f, ast.Attribute):
                    f.attr = other
                else:
                    f.id = other
                return ast.Call(f, node.args, node.keywords)

            r = self._offer(node, f"{_short(node)}: {name} -> {other}", make)
            if r is not None:
                return r
        if isinstance(func, ast.Attribute):
            is_module_func = isinstance(func.value, ast.Name) and func.value.id == "torch"
            if is_module_func and name in _DROP_FUNC and node.args:
                r = self._offer(node, f"drop torch.{name}(...), keep its input", lambda: node.args[0])
                if r is not None:
                    return r
            elif not is_module_func and name in _DROP_METHOD and node is not getattr(self, "_statement_call", None):
                r = self._offer(node, f"drop .{name}(...)", lambda: func.value)
                if r is not None:
                    return r
        return node


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _short(node: ast.AST, n: int = 48) -> str:
    s = ast.unparse(node)
    return s if len(s) <= n else s[: n - 3] + "..."


def mutation_points(source: str) -> list[Point]:
    """Every mutation site of ``source``, numbered in walk order."""
    m = Mutator()
    m.visit(ast.parse(source))
    return m.points


def mutant_source(source: str, index: int) -> str:
    """``source`` with mutation number ``index`` applied."""
    tree = ast.parse(source)
    m = Mutator(index)
    tree = ast.fix_missing_locations(m.visit(tree))
    return ast.unparse(tree)
