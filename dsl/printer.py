"""AST → canonical `.attn` text. `parse(print_module(m)) == m` for every well-formed AST."""
from __future__ import annotations

from functools import singledispatch

from . import ast as A

# Binding strength of each construct; a child printed where a stronger one is needed gets parens.
_IFEXP, _OR, _AND, _NOT, _CMP, _BOR, _BXOR, _BAND, _SHIFT, _ARITH, _TERM, _UNARY, _POW, _ATOM = range(14)
_BIN_LEVEL = {"or": _OR, "and": _AND, "|": _BOR, "^": _BXOR, "&": _BAND, "<<": _SHIFT, ">>": _SHIFT,
              "+": _ARITH, "-": _ARITH, "*": _TERM, "/": _TERM, "//": _TERM, "%": _TERM}


def print_module(m: A.Module) -> str:
    parts = [print_import(i) for i in m.imports]
    text = "\n".join(parts) + ("\n\n" if parts else "")
    if m.defs:
        text += "\n".join(print_stmt(d) for d in m.defs) + "\n\n"
    return text + "\n\n".join(print_pattern(p) for p in m.patterns)


def print_import(i: A.Import) -> str:
    path = f'"{i.path}"' if i.is_file else i.path
    return f"import {path}" + (f" as {i.alias}" if i.alias else "")


def print_pattern(p: A.Pattern) -> str:
    head = f"pattern {p.name}"
    if p.params:
        head += "(" + ", ".join(_param(x) for x in p.params) + ")"
    lines = [head + ":"] + ["    " + print_stmt(s) for s in p.body]
    return "\n".join(lines) + "\n"


def _param(p: A.Param) -> str:
    return f"{p.name}: {p.type}" + (f" = {print_expr(p.default)}" if p.default is not None else "")


def _args(args) -> str:
    return ", ".join((f"{a.name}={print_expr(a.value)}" if a.name else print_expr(a.value)) for a in args)


@singledispatch
def print_stmt(s) -> str:
    raise TypeError(f"not a statement: {s!r}")


@print_stmt.register
def _(s: A.TensorDecl) -> str:
    return f"tensor {s.name}: {s.elem}[{', '.join(print_expr(d) for d in s.dims)}]"


@print_stmt.register
def _(s: A.Let) -> str:
    return f"let {s.name} = {print_expr(s.value)}"


@print_stmt.register
def _(s: A.Mask) -> str:
    return f"mask {print_expr(s.cond)}"


@print_stmt.register
def _(s: A.ScoreStmt) -> str:
    return f"score {s.op} {print_expr(s.value)}"


@print_stmt.register
def _(s: A.Select) -> str:
    return f"select {s.kind}({_args(s.args)})"


@print_stmt.register
def _(s: A.Normalize) -> str:
    return f"normalize {s.kind}" + (f"({_args(s.args)})" if s.args else "")


@print_stmt.register
def _(s: A.Use) -> str:
    return f"use {s.target}" + (f"({_args(s.args)})" if s.args else "")


@print_stmt.register
def _(s: A.Require) -> str:
    return f"require {print_expr(s.cond)}"


@print_stmt.register
def _(s: A.Def) -> str:
    params = ", ".join(p.name + (f": {p.type}" if p.type else "") for p in s.params)
    return f"def {s.name}({params}) = {print_expr(s.body)}"


def print_expr(e: A.Expr, need: int = _IFEXP) -> str:
    text, level = _expr(e)
    return f"({text})" if level < need else text


@singledispatch
def _expr(e) -> tuple[str, int]:
    raise TypeError(f"not an expression: {e!r}")


@_expr.register
def _(e: A.Num):
    text = repr(e.value)
    return (text, _ATOM) if e.value >= 0 else (text, _UNARY)


@_expr.register
def _(e: A.Bool):
    return ("true" if e.value else "false"), _ATOM


@_expr.register
def _(e: A.Name):
    return e.id, _ATOM


@_expr.register
def _(e: A.Call):
    return f"{e.func}({_args(tuple(A.Arg(None, a) for a in e.args) + e.keywords)})", _ATOM


@_expr.register
def _(e: A.Index):
    return f"{e.tensor}[{', '.join(print_expr(a) for a in e.indices)}]", _ATOM


@_expr.register
def _(e: A.SumGen):
    return f"{e.kind}({print_expr(e.body)} for {e.var} in range({print_expr(e.count)}))", _ATOM


@_expr.register
def _(e: A.Unary):
    if e.op == "not":
        return f"not {print_expr(e.operand, _NOT)}", _NOT
    return f"{e.op}{print_expr(e.operand, _UNARY)}", _UNARY


@_expr.register
def _(e: A.Binary):
    if e.op == "**":
        return f"{print_expr(e.left, _ATOM)} ** {print_expr(e.right, _UNARY)}", _POW
    level = _BIN_LEVEL[e.op]
    return f"{print_expr(e.left, level)} {e.op} {print_expr(e.right, level + 1)}", level


@_expr.register
def _(e: A.Compare):
    last = len(e.operands) - 1
    parts = [print_expr(e.operands[0], _BOR)]
    for i, (op, operand) in enumerate(zip(e.ops, e.operands[1:]), 1):
        # a bit operation inside a chain is parenthesized (the parser refuses a bare `&` / `|` there)
        parts += [op, print_expr(operand, _BOR if i == last else _SHIFT)]
    return " ".join(parts), _CMP


@_expr.register
def _(e: A.IfExp):
    return (f"{print_expr(e.body, _OR)} if {print_expr(e.cond, _OR)} else {print_expr(e.orelse, _IFEXP)}",
            _IFEXP)
