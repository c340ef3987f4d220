"""Simplification: constant folding and algebraic identities, as a table of rewrite rules.
Each op's value on constants is its `fold` entry in the op table (lowering/ops.py).

Rules only ever replace an expression by one with the same value for every input (integer
identities are applied to ints only; float identities that break on inf/nan are not applied).
"""
from __future__ import annotations

import math

from ..dsl.diagnostics import SpecError
from .ir import Node, const, transform, walk
from .ops import op_of


def _is(n: Node, value) -> bool:
    return n.op == "const" and n.value == value and type(n.value) is type(value)


def _fold(n: Node):
    if not n.args or any(a.op != "const" for a in n.args):
        if n.op == "where" and n.args[0].op == "const":
            return n.args[1] if n.args[0].value else n.args[2]
        return None
    fold = op_of(n).fold
    if fold is None:
        return None
    try:
        v = fold(*(a.value for a in n.args))
    except (ArithmeticError, ValueError):
        return None  # e.g. a float division by zero: leave it to IEEE at run time
    if n.dtype == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            return None
        if not -2 ** 63 <= v < 2 ** 63:
            raise SpecError(n.span, "integer expression overflows 64 bits",
                            "integers in patterns are 64-bit; use a float (e.g. `2.0 ** 64`) for huge values")
    elif n.dtype == "float":
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            return None
    elif n.dtype == "bool":
        v = bool(v)
    return const(v, n.span)


def _identities(n: Node):
    a = n.args[0] if n.args else None
    b = n.args[1] if len(n.args) > 1 else None
    if n.op == "and":
        if _is(a, True): return b
        if _is(b, True): return a
        if _is(a, False) or _is(b, False): return const(False, n.span)
        if a == b: return a
    if n.op == "or":
        if _is(a, False): return b
        if _is(b, False): return a
        if _is(a, True) or _is(b, True): return const(True, n.span)
        if a == b: return a
    if n.op == "not" and a.op == "not":
        return a.args[0]
    if n.dtype == "int":
        if n.op == "add":
            if _is(a, 0): return b
            if _is(b, 0): return a
        if n.op == "sub" and _is(b, 0): return a
        if n.op == "mul":
            if _is(a, 1): return b
            if _is(b, 1): return a
            if _is(a, 0) or _is(b, 0): return const(0, n.span)
        if n.op == "floordiv" and _is(b, 1): return a
        if n.op == "mod" and _is(b, 1): return const(0, n.span)
        if n.op == "floordiv" and _is(b, 0): return const(0, n.span)  # total: x // 0 == 0
        if n.op == "mod" and _is(b, 0): return a                      # and x % 0 == x
    if n.dtype == "float":
        if n.op == "mul":
            if _is(a, 1.0): return b
            if _is(b, 1.0): return a
        if n.op == "div" and _is(b, 1.0): return a
        if n.op in ("add", "sub") and _is(b, 0.0): return a
        if n.op == "add" and _is(a, 0.0): return b
    if n.op == "neg" and a.op == "neg":
        return a.args[0]
    if n.op == "where" and b == n.args[2]:
        return b
    return None


RULES = (_fold, _identities)


def simplify(node: Node) -> Node:
    """Apply the rules bottom-up until nothing changes."""
    def rule(n: Node):
        for r in RULES:
            out = r(n)
            if out is not None:
                return out
        return None

    while True:
        new = transform(node, rule)
        if new == node:
            return new
        node = new


def constant_table(sizes: dict[str, int], params: dict) -> dict[tuple[str, str], Node]:
    """The `substitute` table that fixes sizes and parameters to these values (None = unset)."""
    table = {("size", k): const(v) for k, v in sizes.items()}
    table.update({("param", k): const(v) for k, v in params.items() if v is not None})
    return table


def static_value(node: Node, table: dict[tuple[str, object], Node], *,
                 message: str = "this expression could not be evaluated before the kernel runs",
                 hint: str | None = None) -> object:
    """The Python value of an expression over sizes and parameters (`table`, e.g. from
    `constant_table`): a `sum` count, a tensor dimension, the count of `select topk`. This is
    the one place such values are computed; an expression that reads anything else (an index,
    the score, a tensor) is a SpecError at its span."""
    n = simplify(substitute(node, table))
    while n.op != "const" and any(m.op in LOOPS and m.args[0].op == "const" for m in walk(n)):
        n = simplify(transform(n, unroll_loop))
    if n.op != "const":
        raise SpecError(node.span, message, hint)
    return n.value


#: the loops over `range(count)` (value: the loop variable, args: (count, body)): each op
#: combines its terms with the op here, and its empty value
LOOPS = {"sum": ("add", None), "any": ("or", False), "all": ("and", True)}


def unroll_loop(n: Node):
    """A `sum`, `any` or `all` with a constant count as the chain of its terms (a rule for
    `transform`; None for any other node)."""
    if n.op not in LOOPS or n.args[0].op != "const":
        return None
    count, body = n.args
    combine, empty = LOOPS[n.op]
    terms = [substitute(body, {("loopvar", n.value): const(i, n.span)}) for i in range(max(count.value, 0))]
    if not terms:
        return const(empty if empty is not None else 0.0 if n.dtype == "float" else 0, n.span)
    out = terms[0]
    for t in terms[1:]:
        out = Node(combine, n.dtype, (out, t), None, n.span)
    return out


def unroll_loops(node: Node) -> Node:
    """Every `sum`, `any` and `all` whose count is a constant, unrolled (innermost first)."""
    while any(m.op in LOOPS and m.args[0].op == "const" for m in walk(node)):
        node = simplify(transform(node, unroll_loop))
    return node


def substitute(node: Node, table: dict[tuple[str, object], Node]) -> Node:
    """Replace leaves keyed by (op, value), e.g. ('param', 'window') or ('size', 'q_len')."""
    return transform(node, lambda n: table.get((n.op, n.value)) if not n.args else None)
