"""Placed patterns: the IR of a pattern whose queries and keys start at run-time positions.

A call with positions (`q_start=`, `k_start=`, `k_lens=`) evaluates the pattern at `q = q_start
+ row` and `k = k_start + column`. `place(ir)` writes that into the IR: every index `q` becomes
`q + q_start` and every `k` becomes `k + k_start`, where `q_start` and `k_start` are size
leaves. The generated kernels load them per sequence (with the sequence's own `k_len`), and the
closed form of a placed pattern's masks (`lowering/closed_form.py`) is then already in row and
column coordinates, for every placement at once; the block layout binds them per sequence.
"""
from __future__ import annotations

from .ir import Node, PatternIR
from .simplify import simplify, substitute

#: the position leaves of a placed pattern
Q_START = Node("size", "int", (), "q_start")
K_START = Node("size", "int", (), "k_start")
POSITION_SIZES = ("q_start", "k_start")

_PLACE = {("index", "q"): Node("add", "int", (Node("index", "int", (), "q"), Q_START)),
          ("index", "k"): Node("add", "int", (Node("index", "int", (), "k"), K_START))}


def place(ir: PatternIR) -> PatternIR:
    """`ir` with its queries and keys at `q + q_start` and `k + k_start`."""
    return ir.map(lambda n: simplify(substitute(n, _PLACE)))
