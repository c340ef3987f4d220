"""IR validity: every node's op is in the op table (lowering/ops.py), with the arity and a
dtype its result rule allows; a pattern's parameters and tensor reads match its declarations,
its scores and bias are float, its masks bool, its counts and tensor dimensions int, and its
requires bool, over parameters and sizes only.

A violation is a compiler bug, never the user's: it is an internal SpecError at the node.
"""
from __future__ import annotations

from ..dsl.diagnostics import SpecError
from ..dsl.types import BOOL, FLOAT, INT
from .ir import Node, PatternIR, walk, walk_all
from .ops import ANY, op_of


def _fail(n: Node, message: str):
    raise SpecError(n.span, f"internal: invalid IR: {message}")


def _check(n: Node) -> None:
    op = op_of(n)
    if op.arity is not None and len(n.args) != op.arity:
        _fail(n, f"`{n.op}` takes {op.arity} argument(s), this node has {len(n.args)}")
    if n.dtype not in (INT, FLOAT, BOOL):
        _fail(n, f"`{n.op}` node has dtype `{n.dtype}`")
    result = op.result(*(a.dtype for a in n.args))
    if result is None or result not in (ANY, n.dtype):
        args = ", ".join(a.dtype for a in n.args)
        _fail(n, f"`{n.op}` of ({args}) gives {result or 'nothing'}, but this node is {n.dtype}")


def verify_expr(root: Node) -> Node:
    """Check every node of an expression (op, arity, dtypes); returns `root`."""
    for n in walk(root):
        _check(n)
    return root


def verify(ir: PatternIR) -> PatternIR:
    """Check a whole pattern (see the module docstring); returns `ir`."""
    for n in walk_all(ir.nodes()):
        _check(n)
        if n.op == "param":
            decl = ir.param(n.value)
            if decl is None or decl.type != n.dtype:
                _fail(n, f"parameter `{n.value}` is {n.dtype}, declared {decl.type if decl else 'nowhere'}")
        elif n.op == "load":
            spec = ir.tensor(n.value)
            if spec is None or len(spec.dims) != len(n.args) or spec.elem != n.dtype:
                _fail(n, f"read of tensor `{n.value}` does not match its declaration")
    roles = [("score", s, FLOAT) for s in ir.scores] + [("mask", m, BOOL) for m in ir.masks]
    roles += [("topk count", ir.topk, INT)] if ir.topk is not None else []
    roles += [("sigmoid bias", ir.bias, FLOAT)] if ir.bias is not None else []
    roles += [("softmax sink", ir.sink, FLOAT)] if ir.sink is not None else []
    roles += [("tensor dimension", d, INT) for t in ir.tensors for d in t.dims]
    roles += [("require", r.cond, BOOL) for r in ir.requires]
    for role, n, dtype in roles:
        if n.dtype != dtype:
            _fail(n, f"a {role} is {n.dtype}, not {dtype}")
    for r in ir.requires:
        for n in walk_all([r.cond] + [v for _, v in r.names]):
            _check(n)
            if n.op in ("index", "score", "load"):
                _fail(n, f"a require reads `{n.op}`; it may read only parameters and sizes")
            if n.op == "param" and ir.param(n.value) is None:
                _fail(n, f"a require reads `{n.value}`, which is not a parameter")
    return ir
