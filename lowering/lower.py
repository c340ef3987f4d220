"""Checked AST → core IR: inline lets and calls of `def`s, expand `use`, desugar comparisons
and `clamp`, make int→float promotions explicit. Assumes the checker passed; violations are
internal errors."""
from __future__ import annotations

from dataclasses import replace
from functools import singledispatchmethod

from ..dsl import ast as A
from ..dsl import types as T
from ..dsl.diagnostics import SpecError
from ..dsl.loader import DefRef, PatternRef, resolve_call
from ..dsl.printer import print_expr
from .ir import Node, ParamDecl, PatternIR, Requirement, TensorSpec, const, uses
from .simplify import simplify
from .verify import verify

_BINOP = {"+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "%": "mod", "**": "pow",
          "and": "and", "or": "or", "&": "bitand", "|": "bitor", "^": "bitxor", "<<": "lshift",
          ">>": "rshift"}
_CMPOP = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
_SCOREOP = {"+=": "add", "-=": "sub", "*=": "mul", "/=": "div"}


def to_float(n: Node) -> Node:
    if n.dtype == "float":
        return n
    if n.op == "const":
        return const(float(n.value), n.span)
    return Node("cast", "float", (n,), None, n.span)


def _unify(a: Node, b: Node) -> tuple[Node, Node]:
    if a.dtype == b.dtype or "bool" in (a.dtype, b.dtype):
        return a, b
    return to_float(a), to_float(b)


class _Body:
    """The statements a pattern contributes, with its lets and tensors visible to includers."""

    def __init__(self):
        self.tensors: dict[str, TensorSpec] = {}
        self.lets: dict[str, Node] = {}
        self.scores: list[Node] = []
        self.masks: list[Node] = []
        self.topk: Node | None = None
        self.normalizer = "softmax"
        self.bias: Node | None = None
        self.sink: Node | None = None
        self.requires: list[Requirement] = []


class _DefScope:
    """What a def's body sees when it is inlined: the lets and defs of its pattern as they stood
    at the def (none for a file-level def)."""

    def __init__(self, ref: DefRef, lets: dict[str, Node], defs: dict[str, _DefScope]):
        self.ref = ref
        self.lets = lets
        self.defs = defs


class _Lowerer:
    def __init__(self, ref: PatternRef, params: dict[str, Node]):
        self.ref = ref
        self.params = params
        self.body = _Body()
        self.loop_vars: dict[str, Node] = {}
        self.module = ref.module if ref is not None else None
        self.defs: dict[str, _DefScope] = {}  # the pattern's defs so far
        self.args: dict[str, Node] = {}  # in an inlined def's body: its parameters

    def run(self) -> _Body:
        for s in self.ref.pattern.body:
            self.stmt(s)
        return self.body

    # ---------------------------------------------------------------- statements

    @singledispatchmethod
    def stmt(self, s):
        raise TypeError(s)

    @stmt.register
    def _(self, s: A.TensorDecl):
        self.body.tensors[s.name] = TensorSpec(s.name, s.elem, tuple(self.expr(d) for d in s.dims), s.span)

    @stmt.register
    def _(self, s: A.Let):
        self.body.lets[s.name] = self.expr(s.value)

    @stmt.register
    def _(self, s: A.Mask):
        self.body.masks.append(self.expr(s.cond))

    @stmt.register
    def _(self, s: A.ScoreStmt):
        value = to_float(self.expr(s.value))
        if s.op == "=":
            new = value
        else:
            cur = Node("score", "float", (), None, s.span)
            new = Node(_SCOREOP[s.op], "float", (cur, value), None, s.span)
        self.body.scores.append(new)

    @stmt.register
    def _(self, s: A.Select):
        self.body.topk = self.expr(s.args[0].value)

    @stmt.register
    def _(self, s: A.Normalize):
        self.body.normalizer = s.kind
        for a in s.args:
            if a.name == "bias":
                self.body.bias = to_float(self.expr(a.value))
            elif a.name == "sink":
                sink = to_float(self.expr(a.value))
                if uses(sink, "index", "k"):
                    raise SpecError(a.value.span, "a sink may not depend on the key position `k`",
                                    "the sink is one extra logit per query row: it may read b, h, "
                                    "q, sizes, parameters and tensors")
                self.body.sink = sink

    @stmt.register
    def _(self, s: A.Require):
        names = []
        for e in _names_in(s.cond):
            if e.id not in dict(names):
                names.append((e.id, self.expr(e)))
        span = s.span.to(s.cond.span) if s.span else None  # the statement, not its comment
        self.body.requires.append(Requirement(self.expr(s.cond), print_expr(s.cond), tuple(names),
                                              span))

    @stmt.register
    def _(self, s: A.Use):
        inner = self._include(s.target, s.args, s.span)
        self.body.scores.extend(inner.scores)
        self.body.masks.extend(inner.masks)
        if inner.topk is not None:
            self.body.topk = inner.topk
        if inner.normalizer != "softmax" or inner.bias is not None or inner.sink is not None:
            self.body.normalizer, self.body.bias = inner.normalizer, inner.bias
            self.body.sink = inner.sink

    def _include(self, name: str, args, span) -> _Body:
        """Lower the pattern `name` with `args` bound to its parameters (for `use` or a pattern
        call at `span`); its tensors, lets and requires join this pattern's, the rest is returned."""
        target = self.ref.module.scope[name]
        positional = [p.name for p in target.pattern.params]
        given: dict[str, Node] = {}
        for i, a in enumerate(args):
            given[a.name or positional[i]] = self.expr(a.value)
        bound: dict[str, Node] = {}
        for p in target.pattern.params:
            value = given.get(p.name)
            if value is None:
                value = const(default_value(p), p.span)
            bound[p.name] = to_float(value) if p.type == "float" else value
        inner = _Lowerer(target, bound).run()
        for name, t in inner.tensors.items():
            self.body.tensors.setdefault(name, t)
        self.body.lets.update(inner.lets)
        self.body.requires.extend(replace(r, via=r.via + (span,)) if span else r
                                  for r in inner.requires)
        return inner

    def _pattern_call(self, e: A.Call) -> Node:
        """`P(args)` in a mask: the conjunction of P's masks (true if it has none)."""
        inner = self._include(e.func, tuple(A.Arg(None, a) for a in e.args) + e.keywords, e.span)
        out = const(True, e.span)
        for m in inner.masks:
            out = m if out.op == "const" else Node("and", "bool", (out, m), None, e.span)
        return out

    @stmt.register
    def _(self, s: A.Def):
        site = _DefScope(DefRef(self.ref.module, s, self.ref.pattern), dict(self.body.lets), {})
        site.defs = {**self.defs, s.name: site}
        self.defs[s.name] = site

    def _inline(self, e: A.Call, target: DefRef) -> Node:
        """The body of the def `target` with its parameters bound to this call's arguments."""
        site = self.defs.get(e.func)
        if site is None or site.ref.definition is not target.definition:
            site = _DefScope(target, {}, {})  # a file-level def
        d = target.definition
        local = target.pattern is not None
        inner = _Lowerer(self.ref, self.params if local else {})
        inner.module, inner.defs = target.module, site.defs
        inner.body.lets, inner.body.tensors = site.lets, self.body.tensors
        # the caller's loop variables count for naming the body's sums by depth (so a call gives
        # the IR of its body written in its place), but the body cannot name them: their keys
        # are no name
        inner.loop_vars = {f" {n}": v for n, v in self.loop_vars.items()}
        for prm, a in zip(d.params, e.args):
            value = self.expr(a)
            inner.args[prm.name] = to_float(value) if prm.type == "float" else value
        return inner.expr(d.body)

    # ---------------------------------------------------------------- expressions

    @singledispatchmethod
    def expr(self, e) -> Node:
        raise TypeError(e)

    @expr.register
    def _(self, e: A.Num):
        return const(e.value, e.span)

    @expr.register
    def _(self, e: A.Bool):
        return const(e.value, e.span)

    @expr.register
    def _(self, e: A.Name):
        n = e.id
        if n in self.args:
            return self.args[n]
        if n in self.loop_vars:
            return self.loop_vars[n]
        if n in A.INDEX_NAMES:
            return Node("index", "int", (), n, e.span)
        if n in A.SIZE_NAMES:
            return Node("size", "int", (), n, e.span)
        if n == "score":
            return Node("score", "float", (), None, e.span)
        if n in self.params:
            return self.params[n]
        return self.body.lets[n]

    @expr.register
    def _(self, e: A.Call):
        target = None if self.module is None else \
            resolve_call(e.func, self.module, {n: s.ref for n, s in self.defs.items()})
        if isinstance(target, DefRef):
            return self._inline(e, target)
        if e.func not in T.FUNCTIONS:  # the checker let only pattern calls through
            return self._pattern_call(e)
        args = [self.expr(a) for a in e.args]
        rule = T.FUNCTIONS[e.func].result
        if e.func in ("min", "max", "clamp"):
            if any(a.dtype == "float" for a in args):
                args = [to_float(a) for a in args]
            dtype = args[0].dtype
            if e.func == "clamp":
                x, lo, hi = args
                return Node("min", dtype, (Node("max", dtype, (x, lo), None, e.span), hi), None, e.span)
            out = args[0]
            for a in args[1:]:
                out = Node(e.func, dtype, (out, a), None, e.span)
            return out
        if e.func == "abs":
            return Node("abs", args[0].dtype, (args[0],), None, e.span)
        if rule == "int":  # floor, ceil
            return Node(e.func, "int", (args[0],), None, e.span) if args[0].dtype == "float" else args[0]
        return Node(e.func, "float", (to_float(args[0]),), None, e.span)

    @expr.register
    def _(self, e: A.Index):
        spec = self.body.tensors[e.tensor]
        return Node("load", spec.elem, tuple(self.expr(i) for i in e.indices), e.tensor, e.span)

    @expr.register
    def _(self, e: A.Unary):
        x = self.expr(e.operand)
        if e.op == "not":
            return Node("not", "bool", (x,), None, e.span)
        if e.op == "+":
            return x
        if e.op == "~":
            return Node("invert", "int", (x,), None, e.span)
        return Node("neg", x.dtype, (x,), None, e.span)

    @expr.register
    def _(self, e: A.Binary):
        a, b = self.expr(e.left), self.expr(e.right)
        op = _BINOP[e.op]
        if op in ("and", "or"):
            return Node(op, "bool", (a, b), None, e.span)
        lit = isinstance(e.right, A.Num) and isinstance(e.right.value, int) and e.right.value >= 0
        dtype = T.binary_result(e.op, a.dtype, b.dtype, lit)
        if dtype == "float":
            a, b = to_float(a), to_float(b)
        return Node(op, dtype, (a, b), None, e.span)

    @expr.register
    def _(self, e: A.Compare):
        vals = [self.expr(o) for o in e.operands]
        out = None
        for op, a, b in zip(e.ops, vals, vals[1:]):
            a, b = _unify(a, b)
            c = Node(_CMPOP[op], "bool", (a, b), None, e.span)
            out = c if out is None else Node("and", "bool", (out, c), None, e.span)
        return out

    @expr.register
    def _(self, e: A.IfExp):
        c, a, b = self.expr(e.cond), self.expr(e.body), self.expr(e.orelse)
        a, b = _unify(a, b)
        return Node("where", a.dtype, (c, a, b), None, e.span)

    @expr.register
    def _(self, e: A.SumGen):
        count = self.expr(e.count)
        # loop variables are named by nesting depth, so equal sums get equal IR wherever they are
        var = Node("loopvar", "int", (), f"{e.var}_{len(self.loop_vars)}", e.span)
        outer = dict(self.loop_vars)
        self.loop_vars[e.var] = var
        body = self.expr(e.body)
        self.loop_vars = outer
        return Node(e.kind, body.dtype, (count, body), var.value, e.span)


def _names_in(e: A.Expr) -> list[A.Name]:
    """The names an expression reads from its pattern, in source order (loop variables of its
    sums are not: they are bound inside)."""
    if isinstance(e, A.Name):
        return [e]
    if isinstance(e, A.SumGen):
        return _names_in(e.count) + [n for n in _names_in(e.body) if n.id != e.var]
    children = {A.Call: lambda: e.args, A.Index: lambda: e.indices, A.Unary: lambda: (e.operand,),
                A.Binary: lambda: (e.left, e.right), A.Compare: lambda: e.operands,
                A.IfExp: lambda: (e.body, e.cond, e.orelse)}
    get = children.get(type(e))
    return [n for c in (get() if get else ()) for n in _names_in(c)]


def _static_requires(requires) -> tuple[Requirement, ...]:
    """The requires left to check at call time: each once; one that holds for every call is
    dropped, one that holds for none is an error now."""
    out: list[Requirement] = []
    for r in requires:
        if r.cond.op == "const":
            if not r.cond.value:
                known = {n: v.value for n, v in r.names if v.op == "const"}
                raise r.failure(known)
            continue
        if r not in out:
            out.append(r)
    return tuple(out)


def default_value(p: A.Param):
    """The Python value of a parameter's (constant) default, or None if it has none."""
    if p.default is None:
        return None
    node = simplify(_Lowerer(None, {}).expr(p.default))
    v = node.value
    return float(v) if p.type == "float" else v


def lower_pattern(ref: PatternRef) -> PatternIR:
    """Lower one checked pattern to IR, keeping its parameters symbolic (and `verify` it)."""
    p = ref.pattern
    params = {}
    decls = []
    for prm in p.params:
        params[prm.name] = Node("param", prm.type, (), prm.name, prm.span)
        decls.append(ParamDecl(prm.name, prm.type, default_value(prm), prm.span))
    body = _Lowerer(ref, params).run()
    ir = PatternIR(p.name, tuple(decls), tuple(body.tensors.values()), tuple(body.scores),
                   tuple(body.masks), body.topk, body.normalizer, body.bias, ref.module.source.path, p.span,
                   sink=body.sink, requires=tuple(body.requires)).map(simplify)
    return verify(replace(ir, requires=_static_requires(ir.requires)))
