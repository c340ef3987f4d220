"""Bounds of IR expressions over boxes of index intervals, for the sparsity analysis and
`int_range`. Each op is bounded by its `interval` entry in the op table (lowering/ops.py), in the
abstract domain of lowering/intervals.py; an op without one (or a leaf that reads something
unknown here: the score, a tensor) is unbounded, and the loss of precision is noted.
"""
from __future__ import annotations

import torch

from .intervals import Iv, tame, unknown
from .ir import Node
from .ops import op_of

class Evaluator:
    """Evaluates IR nodes to intervals over one environment of index intervals.

    `env` maps 'q', 'k', 'b', 'h' to `Iv`s; `dense(node)` may return a precomputed `Iv` for a node
    (the analysis uses it for single-axis subexpressions, evaluated exactly along their axis);
    `load(node)` may bound a tensor read the other rules cannot (one whose indices read both q
    and k: a block map); `note(node, text)` records where precision is lost."""

    def __init__(self, env: dict[str, Iv], device, dense=None, note=None, load=None):
        self.env, self.device = env, device
        self.dense = dense or (lambda n: None)
        self.load = load or (lambda n: None)
        self.note = note or (lambda n, t: None)
        self.memo: dict[int, Iv] = {}

    def eval(self, n: Node) -> Iv:
        out = self.memo.get(id(n))
        if out is None:
            out = self.dense(n)
            if out is None:
                out = self._compute(n)
                if n.dtype == "int":
                    out = tame(out)
            self.memo[id(n)] = out
        return out

    def _const(self, v) -> Iv:
        t = torch.tensor(float(v), dtype=torch.float64, device=self.device)
        return Iv(t, t)

    def _compute(self, n: Node) -> Iv:
        op = n.op
        if op == "const":
            return self._const(n.value)
        if op == "index":
            return self.env[n.value]
        if op == "load":
            out = self.load(n)
            if out is not None:
                return out
        rule = op_of(n).interval
        if rule is None:  # the other leaves, `load`, `sum`, and ops without an interval rule
            return self._unbounded(n, _why_unbounded(n))
        out = rule(n, *(self.eval(x) for x in n.args))
        return out if isinstance(out, Iv) else self._unbounded(n, out)

    def _unbounded(self, n: Node, why: str) -> Iv:
        self.note(n, why)
        if n.dtype == "bool":
            return Iv(*(torch.tensor(v, dtype=torch.float64, device=self.device) for v in (0.0, 1.0)))
        return unknown(self.device)


def _why_unbounded(n: Node) -> str:
    if n.op == "score":
        return "reads the score (content-dependent)"
    if n.op == "load":
        return f"reads tensor `{n.value}` with an index that depends on both q and k"
    return f"uses `{n.op}`, which the analysis does not bound"
