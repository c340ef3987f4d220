"""Symbolic differentiation of score expressions over the IR (reverse mode, one rule per op: its
`derivative` entry in the op table, lowering/ops.py).

The backward pass of attention needs, for each score statement ``s_out = f(score, …)``:
  * ∂f/∂score — to carry the logit gradient back to ``q·k`` (and so to dQ, dK), and
  * ∂f/∂L for every float tensor load L — to accumulate gradients into tensor arguments.
Both come from `adjoints`, which builds IR expressions (not numbers), so the same result feeds
the reference checks and the generated backward kernels.

Non-smooth points use documented subgradients: ``abs'(0) = 0``; ``min``/``max`` send the whole
gradient to the first argument on ties (``clamp(x, lo, hi) = min(max(x, lo), hi)`` therefore
passes the gradient to ``x`` at the boundaries); ``where`` routes it to the taken branch;
``floor``, ``ceil``, comparisons and integer arithmetic have zero derivative.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Node, PatternIR, const, walk
from .ops import rule
from .simplify import simplify
from .verify import verify_expr


def _f(op, *args):
    return Node(op, "float", tuple(args))


ZERO = const(0.0)


@dataclass(frozen=True)
class LoadGrad:
    """The adjoint of one float tensor read: accumulate `adjoint` into `load.value` at
    `load.args` — once per iteration of each enclosing `sum` (`loops` = (var, count) pairs)."""

    load: Node
    adjoint: Node
    loops: tuple[tuple[str, Node], ...] = ()


@dataclass(frozen=True)
class StatementGrad:
    """Derivatives of one score statement with respect to its input score and tensor reads,
    each already multiplied by the incoming adjoint leaf `Node('param', 'float', (), '$g')`."""

    d_score: Node
    loads: tuple[LoadGrad, ...]


SEED = Node("param", "float", (), "$g")


def adjoints(root: Node, seed: Node = SEED, loops: tuple = (),
             stop: frozenset = frozenset()) -> tuple[dict[int, Node], list[LoadGrad]]:
    """Reverse-mode adjoints of every float node of `root` (by id), seeded with `seed`.

    A `sum` is differentiated per iteration: its body gets the sum's adjoint with the loop
    variable left symbolic (loads inside are reported with their loop context), and
    sub-expressions of the body that do not read the loop variable receive the adjoint summed
    over the loop. Nodes in `stop` receive adjoints but are not expanded further."""
    order = walk(root)
    adj: dict[int, Node] = {id(root): seed}
    loads: list[LoadGrad] = []
    for n in reversed(order):
        g = adj.get(id(n))
        if g is None or n.dtype != "float" or id(n) in stop:
            continue
        if n.op == "load":
            loads.append(LoadGrad(n, simplify(g), loops))
            continue
        if n.op == "sum":
            count, body = n.args
            outer = _outer_reads(body, n.value)
            inner, inner_loads = adjoints(body, g, loops + ((n.value, count),),
                                          frozenset(id(m) for m in outer))
            loads.extend(inner_loads)
            for m in outer:
                if id(m) in inner:
                    _accumulate(adj, m, Node("sum", "float", (count, inner[id(m)]), n.value))
            continue
        if not n.args:
            continue  # a leaf
        for a, ga in zip(n.args, rule(n, "derivative")(n, g)):
            if ga is not None and a.dtype == "float":
                _accumulate(adj, a, ga)
    return adj, loads


def _accumulate(adj, node, g):
    prev = adj.get(id(node))
    adj[id(node)] = g if prev is None else _f("add", prev, g)


def _depends_on_loopvar(node: Node, var: str) -> bool:
    return any(m.op == "loopvar" and m.value == var for m in walk(node))


def _outer_reads(body: Node, var: str) -> list[Node]:
    """Maximal float sub-expressions of a loop body that do not read the loop variable
    (their adjoints flow out of the loop)."""
    out, seen = [], set()
    stack = [body]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.dtype == "float" and not _depends_on_loopvar(m, var) and m.op != "const":
            out.append(m)
            continue
        stack.extend(m.args)
    return out


def statement_grad(stmt: Node) -> StatementGrad:
    """∂stmt/∂score and ∂stmt/∂(each float tensor read), times the adjoint leaf `SEED`."""
    adj, loads = adjoints(stmt)
    d_score = ZERO
    for m in walk(stmt):
        if m.op == "score" and id(m) in adj:
            d_score = _f("add", d_score, adj[id(m)])
    grad = StatementGrad(simplify(d_score), tuple(loads))
    for n in (grad.d_score, *(lg.adjoint for lg in grad.loads)):
        verify_expr(n)  # the op table's derivative rules must build well-typed IR
    return grad


def pattern_grads(ir: PatternIR) -> tuple[StatementGrad, ...]:
    """One `StatementGrad` per score statement, in statement order."""
    return tuple(statement_grad(s) for s in ir.scores)


def sink_tensors(ir: PatternIR) -> list[str]:
    """Float tensors the softmax sink reads (their gradients are formed per row, on the host)."""
    if ir.sink is None:
        return []
    return sorted({m.value for m in walk(ir.sink) if m.op == "load" and m.dtype == "float"})


def differentiable_tensors(ir: PatternIR) -> list[str]:
    """Float tensors whose values reach the score (and so can receive gradients from the
    kernels); see also `sink_tensors`."""
    names = []
    for s in list(ir.scores) + ([ir.bias] if ir.bias is not None else []):
        for m in walk(s):
            if m.op == "load" and m.dtype == "float" and m.value not in names:
                names.append(m.value)
    return sorted(names)
