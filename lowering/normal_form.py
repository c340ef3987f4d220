"""Masks as disjunctions of conjunctions of literals, and affine forms over the index names.

`dnf(node)` pushes negations to the leaves and distributes `and` over `or`, rewriting integer
comparisons of `abs`, `min`, `max` and `where` into plain comparisons (e.g. `abs(a) <= c` is
`a <= c and a >= -c`), so that the analysis sees as many affine comparisons as possible. Every
rewrite is an identity on integers; float comparisons are never flipped (NaN), they stay literals.
"""
from __future__ import annotations

import math
from math import gcd

from .ir import Node
from .ops import COMPARISONS

#: a literal is (bool node, polarity); a term is a conjunction of literals
Literal = tuple[Node, bool]
Term = tuple[Literal, ...]

#: the most terms a DNF may have before a subformula is kept whole as one opaque literal
DNF_CAP = 64
VARS = ("q", "k", "b", "h")
INF = float("inf")

_NEGATE = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
_MIRROR = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def _b(op, *args) -> Node:
    return Node(op, "bool", tuple(args))


def _neg_int(n: Node) -> Node:
    return Node("neg", "int", (n,))


def _rewrite_comparison(op: str, a: Node, c: Node) -> Node | None:
    """An equivalent formula without abs/min/max/where at the top of `a` (ints only)."""
    if a.op == "abs":
        x = a.args[0]
        if op in ("le", "lt"):
            return _b("and", _b(op, x, c), _b(_MIRROR[op], x, _neg_int(c)))
        if op in ("ge", "gt"):
            return _b("or", _b(op, x, c), _b(_MIRROR[op], x, _neg_int(c)))
        return None
    if a.op in ("min", "max"):
        x, y = a.args
        if op in ("eq", "ne"):
            return None
        both = (a.op == "min") == (op in ("ge", "gt"))
        return _b("and" if both else "or", _b(op, x, c), _b(op, y, c))
    if a.op == "where":
        cond, x, y = a.args
        return _b("or", _b("and", cond, _b(op, x, c)), _b("and", _b("not", cond), _b(op, y, c)))
    return None


def _product(left: list[Term], right: list[Term]) -> list[Term] | None:
    if len(left) * len(right) > DNF_CAP:
        return None
    return [l + r for l in left for r in right]


def dnf(n: Node, pos: bool = True) -> list[Term]:
    """Terms whose disjunction equals `n` (or `not n` when `pos` is False)."""
    op = n.op
    if op == "const":
        return [()] if bool(n.value) == pos else []
    if op == "not":
        return dnf(n.args[0], not pos)
    if op in ("and", "or"):
        conj = (op == "and") == pos
        parts = [dnf(a, pos) for a in n.args]
        if not conj:
            out = parts[0] + parts[1]
            return out if len(out) <= DNF_CAP else [((n, pos),)]
        out = _product(parts[0], parts[1])
        return out if out is not None else [((n, pos),)]
    if op == "where":
        c, x, y = n.args
        if not pos:
            x, y = _b("not", x), _b("not", y)
        return dnf(_b("or", _b("and", c, x), _b("and", _b("not", c), y)))
    if op in COMPARISONS and n.args[0].dtype == "int" and n.args[1].dtype == "int":
        a, c = n.args
        if not pos:
            op = _NEGATE[op]
        if op == "ne":
            return dnf(_b("or", _b("lt", a, c), _b("gt", a, c)))
        for x, y, o in ((a, c, op), (c, a, _MIRROR[op])):
            new = _rewrite_comparison(o, x, y)
            if new is not None:
                return dnf(new)
        return [((_b(op, a, c) if op != n.op else n, True),)]
    return [((n, pos),)]


def affine(n: Node, atom=None) -> tuple[dict[str, int], int] | None:
    """`n` as sum(coef * index) + constant over integers, or None. `atom(node)` may name other
    subexpressions to treat as variables (a string key), or return None."""
    if n.dtype != "int":
        return None
    op = n.op
    if atom is not None and op not in ("const", "index"):
        key = atom(n)
        if key is not None:
            return {key: 1}, 0
    if op == "const":
        return {}, int(n.value)
    if op == "index":
        return {n.value: 1}, 0
    if op == "neg":
        a = affine(n.args[0], atom)
        return None if a is None else ({v: -c for v, c in a[0].items()}, -a[1])
    if op in ("add", "sub"):
        a, b = affine(n.args[0], atom), affine(n.args[1], atom)
        if a is None or b is None:
            return None
        s = 1 if op == "add" else -1
        co = dict(a[0])
        for v, c in b[0].items():
            co[v] = co.get(v, 0) + s * c
        return {v: c for v, c in co.items() if c}, a[1] + s * b[1]
    if op == "mul":
        a, b = affine(n.args[0], atom), affine(n.args[1], atom)
        if a is None or b is None:
            return None
        if a[0] and b[0]:
            return None
        if not a[0]:
            a, b = b, a
        k = b[1]
        return {v: c * k for v, c in a[0].items() if c * k}, a[1] * k
    return None


def normalize_form(coefs: dict[str, int]) -> tuple[tuple, int]:
    """(key, scale) with coefs == scale * key, key's gcd 1 and its first coefficient positive."""
    items = [(v, coefs[v]) for v in VARS if coefs.get(v)]
    items += sorted((v, c) for v, c in coefs.items() if v not in VARS and c)
    g = 0
    for _, c in items:
        g = gcd(g, abs(c))
    if items[0][1] < 0:
        g = -g
    return tuple((v, c // g) for v, c in items), g


#: bounds on (lhs - rhs) for `lhs op rhs` written as `d op 0`: (lower, upper) offsets
def comparison_bounds(op: str, const: int) -> tuple[float, float]:
    """Bounds on a linear part x where the literal is `x + const op 0`."""
    inf = float("inf")
    return {"lt": (-inf, -const - 1), "le": (-inf, -const), "gt": (-const + 1, inf),
            "ge": (-const, inf), "eq": (-const, -const)}[op]


def conjunction(masks: tuple[Node, ...]) -> Node:
    out = masks[0]
    for m in masks[1:]:
        out = Node("and", "bool", (out, m))
    return out


def capped(terms: list[Term]) -> bool:
    """Did `dnf` keep a subformula whole because it had too many cases?"""
    return any(n.op in ("and", "or", "not", "where") for t in terms for n, _ in t)


def classify_literal(node: Node, pos: bool, atom=None):
    """('affine', key, L, U) | ('mod', key, scale, offset, d, tlo, thi) | ('generic',).
    `atom` (see `normal_form.affine`) lets single-axis subexpressions act as variables."""
    if not pos or node.op not in COMPARISONS or node.op == "ne":
        return ("generic",)
    a, c = node.args
    if a.dtype != "int" or c.dtype != "int":
        return ("generic",)
    diff = affine(Node("sub", "int", (a, c)), atom)
    if diff is not None:
        coefs, const = diff
        L, U = comparison_bounds(node.op, const)
        if not coefs:
            return ("const", L <= 0 <= U)
        key, g = normalize_form(coefs)
        L, U = L / g, U / g
        if g < 0:
            L, U = U, L
        return ("affine", key, math.ceil(L) if L != -INF else L, math.floor(U) if U != INF else U)
    op = node.op
    for x, y, o in ((a, c, op), (c, a, {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}[op])):
        if x.op == "mod" and x.args[1].op == "const" and isinstance(x.args[1].value, int) \
                and x.args[1].value > 0 and y.op == "const":
            inner = affine(x.args[0])
            if inner is None or not inner[0]:
                continue
            key, scale = normalize_form(inner[0])
            lo, hi = comparison_bounds(o, -y.value)
            return ("mod", key, scale, inner[1], x.args[1].value, lo, hi)
    return ("generic",)
