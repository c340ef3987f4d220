"""Traversal of expression DAGs (shared sub-expressions are visited once). Kept apart from
`ir.py` so that the printer, which `Node.__repr__` uses, needs nothing else."""
from __future__ import annotations


def walk(node):
    """Every distinct node of the DAG under `node`, children before parents."""
    seen: set[int] = set()
    order: list = []
    stack = [(node, False)]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.args))
    return order


def walk_all(roots) -> list:
    """Every structurally distinct node under `roots`, children before parents."""
    order: list = []
    seen: set = set()
    for r in roots:
        for n in walk(r):
            if n not in seen:
                seen.add(n)
                order.append(n)
    return order
