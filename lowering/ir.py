"""The core IR: one small expression node type and the desugared pattern.

`Node` is a frozen dataclass with tuple children; its span takes no part in equality or hashing,
so structurally equal expressions are equal (and share cache keys) wherever they came from.
Lets are inlined, `use` is expanded, chained comparisons and `clamp` are desugared, and every
int→float promotion is an explicit `cast`, so each op sees operands of one type.

Ops (value / args); every op's arity, typing and meaning is its entry in lowering/ops.py:
  leaves   const (python value), index ('b'|'h'|'q'|'k'), size (name), param (name),
           score (the running logit), loopvar (name)
  load     value = tensor name, args = indices
  unary    neg not abs cast floor ceil, and the language's float functions (exp, tanh, ...)
  binary   add sub mul div floordiv mod pow min max and or lt le gt ge eq ne
  where    args = (cond, then, else)
  sum      value = loop variable name, args = (count, body); count is static

A pattern's `require`s are `Requirement`s, kept apart from its scores and masks (`nodes()`):
they are checked on the host when a call binds, and no kernel reads them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..dsl.diagnostics import SpecError
from ..dsl.source import Span
from .traverse import walk, walk_all  # noqa: F401  (walk_all: re-exported for the passes)


@dataclass(frozen=True)
class Node:
    """One IR expression node; `dtype` is 'int', 'float' or 'bool'."""

    op: str
    dtype: str
    args: tuple["Node", ...] = ()
    value: Any = None
    span: Span | None = field(default=None, compare=False, repr=False)

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.op, self.dtype, self.args, self.value))
            object.__setattr__(self, "_hash", h)
        return h

    def __repr__(self) -> str:
        return format_expr(self)

    def with_args(self, args: tuple["Node", ...]) -> "Node":
        if args == self.args:
            return self
        return Node(self.op, self.dtype, tuple(args), self.value, self.span)


# `Node.__repr__` prints with the printer, which needs only `traverse` (so no import cycle)
from .printer import format_expr  # noqa: E402


def const(value, span=None) -> Node:
    dtype = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
    return Node("const", dtype, (), value, span)


def transform(node: Node, rule, memo: dict | None = None) -> Node:
    """Rebuild `node` bottom-up, replacing each rebuilt node `n` by `rule(n)` (or `n` if None)."""
    memo = {} if memo is None else memo
    for n in walk(node):
        if id(n) in memo:
            continue
        new = n.with_args(tuple(memo[id(a)] for a in n.args)) if n.args else n
        out = rule(new)
        memo[id(n)] = new if out is None else out
    return memo[id(node)]


def uses(node: Node, op: str, value=None) -> bool:
    return any(n.op == op and (value is None or n.value == value) for n in walk(node))


@dataclass(frozen=True)
class ParamDecl:
    name: str
    type: str
    default: Any  # a python value, or None when the caller must give one
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument: element type and static dimension expressions."""

    name: str
    elem: str
    dims: tuple[Node, ...]
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Requirement:
    """A `require` statement: `cond` (bool, over parameters and sizes only) must hold when a call
    binds its arguments. For the message of a failure: `text` is the condition as written, and
    `names` the values of the names it mentions (as IR over this pattern's parameters and sizes),
    `span` the statement, `via` the `use` statements that brought it in, innermost first. Only
    `cond` takes part in equality."""

    cond: Node
    text: str = field(default="", compare=False)
    names: tuple[tuple[str, Node], ...] = field(default=(), compare=False)
    span: Span | None = field(default=None, compare=False, repr=False)
    via: tuple[Span, ...] = field(default=(), compare=False, repr=False)

    def map(self, fn) -> "Requirement":
        return Requirement(fn(self.cond), self.text, tuple((n, fn(v)) for n, v in self.names),
                           self.span, self.via)

    def failure(self, values: dict[str, object]) -> SpecError:
        """The error of a call where the condition is false; `values` are the names' values."""
        def show(v):
            return ("true" if v else "false") if isinstance(v, bool) else repr(v)
        given = ", ".join(f"{n} = {show(values[n])}" for n, _ in self.names if n in values)
        hint = None
        if self.via:
            hint = "required by " + ", by ".join(_site(s) for s in self.via)
        return SpecError(self.span, f"require failed: {self.text}" + (f" with {given}" if given else ""),
                         hint)


def _site(span: Span) -> str:
    """`use P` or a call `P(args)` in a mask (a call never starts with the keyword `use`)."""
    text = span.source.line(span.line)[span.col - 1:]
    if re.match(r"use\b", text):
        return f"the `use` at {span}"
    return f"the call `{re.match(r'[A-Za-z_0-9.]*', text).group()}(...)` at {span}"


@dataclass(frozen=True)
class PatternIR:
    """A desugared pattern. `scores` are applied in order, each reading the previous `score`;
    `masks` are AND-ed (a `score` leaf in a mask reads the final score); `topk` is the static
    count of `select topk`; `normalizer` is 'softmax' (with an optional `sink`: one extra logit per
    query row that attends to nothing) or 'sigmoid' (with `bias`); `requires` are the conditions
    a call's parameters and sizes must meet."""

    name: str
    params: tuple[ParamDecl, ...]
    tensors: tuple[TensorSpec, ...]
    scores: tuple[Node, ...]
    masks: tuple[Node, ...]
    topk: Node | None = None
    normalizer: str = "softmax"
    bias: Node | None = None
    path: str = field(default="<string>", compare=False)
    span: Span | None = field(default=None, compare=False, repr=False)  # the pattern's name
    sink: Node | None = None
    requires: tuple[Requirement, ...] = ()  # checked when a call binds (runtime/binding.py)

    def __hash__(self) -> int:  # cached: an IR keys the per-call caches
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.name, self.params, self.tensors, self.scores, self.masks, self.topk,
                      self.normalizer, self.bias, self.sink, self.requires))
            object.__setattr__(self, "_hash", h)
        return h

    def param(self, name: str) -> ParamDecl | None:
        return next((p for p in self.params if p.name == name), None)

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == name), None)

    def argument_names(self) -> set[str]:
        """The names a call passes by keyword: parameters and tensors."""
        return {p.name for p in self.params} | {t.name for t in self.tensors}

    def nodes(self) -> list[Node]:
        roots = list(self.scores) + list(self.masks) + [
            n for n in (self.topk, self.bias, self.sink) if n is not None]
        roots += [d for t in self.tensors for d in t.dims]
        return roots

    def map(self, fn) -> "PatternIR":
        """A copy with `fn` applied to every expression."""
        return PatternIR(
            self.name, self.params,
            tuple(TensorSpec(t.name, t.elem, tuple(fn(d) for d in t.dims), t.span) for t in self.tensors),
            tuple(fn(s) for s in self.scores), tuple(fn(m) for m in self.masks),
            fn(self.topk) if self.topk is not None else None, self.normalizer,
            fn(self.bias) if self.bias is not None else None, self.path, self.span,
            sink=fn(self.sink) if self.sink is not None else None,
            requires=tuple(r.map(fn) for r in self.requires))
