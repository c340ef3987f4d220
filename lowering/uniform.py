"""Per-program values in generated code: find them, compute them once, keep them off the tiles.

In a kernel, an expression that reads neither `q` nor `k`, nor the score, nor the adjoint seed
is one value per program ("uniform": `slopes[h]`, `2 * sigma[h, i] ** 2`, a size). Elementwise
work on a `[BLOCK_M, BLOCK_N]` tile costs a tile of instructions per operation; uniform work
costs one. Two rewrites move work from the first kind to the second:

* `strength_reduce`: `a / u` becomes `a * (1 / u)` when `u` is uniform (one reciprocal per
  program, one multiply per element, instead of a division per element), and a product's
  uniform factors are gathered into one factor, so `g * score * alpha * E * 4.0 * sigma`
  costs three tile multiplies, not five;
* `uniform_roots`: the uniform subexpressions a function reads, which the printer emits once at
  the top of the function, before any atomic: later uses, and the same values computed by the
  forward's code in the same kernel, then share them (a load after an atomic cannot be merged
  with one before it).

Both change results by rounding only (a reciprocal multiply differs from a division by at most
an ulp); the forward and backward kernels print the same rewritten code, so a keep decision that
reads the score is still made identically in both.
"""
from __future__ import annotations

from .ir import Node, const, transform, walk

#: the adjoint seed of `lowering.derivative` (printed as the tile variable `g`)
SEED_NAME = "$g"


def _varying_leaf(n: Node) -> bool:
    return ((n.op == "index" and n.value in ("q", "k")) or n.op in ("score", "loopvar")
            or (n.op == "param" and n.value == SEED_NAME))


def uniform_map(roots) -> dict[int, bool]:
    """id(node) -> whether the node is one value per program, for every node under `roots`."""
    out: dict[int, bool] = {}
    for r in roots:
        for n in walk(r):
            if id(n) not in out:
                out[id(n)] = not _varying_leaf(n) and all(out[id(a)] for a in n.args)
    return out


class _Uniform:
    """`is_uniform` with a structural memo (nodes hash by structure, cheaply)."""

    def __init__(self):
        self.memo: dict[Node, bool] = {}

    def __call__(self, n: Node) -> bool:
        hit = self.memo.get(n)
        if hit is None:
            hit = self.memo[n] = not _varying_leaf(n) and all(self(a) for a in n.args)
        return hit


def is_uniform(n: Node) -> bool:
    return _Uniform()(n)


def _factors(n: Node, acc: list, sign: list) -> None:
    """Flatten a float product: `mul` and `neg` nodes into factors and a sign."""
    if n.dtype == "float" and n.op == "mul":
        _factors(n.args[0], acc, sign)
        _factors(n.args[1], acc, sign)
    elif n.dtype == "float" and n.op == "neg":
        sign[0] = -sign[0]
        _factors(n.args[0], acc, sign)
    else:
        acc.append(n)


def _product(factors: list[Node], span) -> Node:
    out = factors[0]
    for f in factors[1:]:
        out = Node("mul", "float", (out, f), None, span)
    return out


def strength_reduce(node: Node) -> Node:
    """`node` with divisions by uniform values turned into multiplies by their reciprocal and
    the uniform factors of each product gathered into one (see the module docstring)."""
    is_uniform = _Uniform()

    def rule(n: Node):
        if n.dtype != "float":
            return None
        if n.op == "div":
            a, b = n.args
            if is_uniform(b) and not is_uniform(a) and not (b.op == "const" and b.value == 0):
                recip = Node("div", "float", (const(1.0), b), None, n.span)
                return Node("mul", "float", (a, recip), None, n.span)
            return None
        if n.op not in ("mul", "neg"):
            return None
        factors, sign = [], [1]
        _factors(n, factors, sign)
        varying = [f for f in factors if not is_uniform(f)]
        uniform = [f for f in factors if is_uniform(f)]
        if not varying or (len(uniform) + (sign[0] < 0)) < 2:
            return None  # nothing to gather: at most one uniform factor (or the sign alone)
        if sign[0] < 0:
            uniform = [const(-1.0)] + uniform
        return Node("mul", "float", (_product(varying, n.span), _product(uniform, n.span)), None,
                    n.span)
    return transform(node, rule)


def uniform_roots(roots) -> list[Node]:
    """The uniform subexpressions worth computing once for these expressions, children first:
    each largest uniform subexpression that sits under a varying one, and every uniform
    subexpression that two such parents share. Leaves that are free to read (constants, sizes,
    parameters, indices) are not listed; tensor loads are."""
    uni = uniform_map(roots)
    order: list[Node] = []
    seen: set[Node] = set()
    parents: dict[Node, set[Node]] = {}
    for r in roots:
        for n in walk(r):
            if n not in seen:
                seen.add(n)
                order.append(n)
            for a in n.args:
                parents.setdefault(a, set()).add(n)
    picked = []
    for n in order:
        if not uni[id(n)] or (not n.args and n.op != "load") or n.op == "const":
            continue
        ps = parents.get(n, set())
        under_varying = any(not uni[id(p)] for p in ps) or n in roots
        if under_varying or len(ps) > 1:
            picked.append(n)
    return picked
