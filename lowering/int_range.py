"""Can a pattern's integer arithmetic leave int32 at given sizes?

Generated kernels compute positions (`q`, `k`, `b`, `h`) and sizes in int32, the reference in
int64. `int32_overflow` bounds every int sub-expression with interval arithmetic over the whole
call — `b` in [0, batch), `h` in [0, heads), `q` in [0, q_len), `k` in [0, k_len), sizes and
parameters fixed, `sum` loop variables in [0, n) — and returns the first one whose bounds leave
[-2**31, 2**31). The kernel is then generated with int64 index arithmetic instead (`WIDE`).

Sub-expressions that read a tensor are not bounded: an int tensor is loaded as int64 and
promotes what it touches. Bounds over-approximate, so a `WIDE` kernel may be chosen when int32
would have sufficed (it is only slower), never the other way round.
"""
from __future__ import annotations

import functools

import torch

from .bounds import Evaluator
from .intervals import Iv
from .ir import Node, PatternIR, uses, walk_all
from .simplify import LOOPS, constant_table, simplify, substitute

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def int32_overflow(ir: PatternIR, sizes: dict[str, int], params: dict) -> Node | None:
    """The first int sub-expression of `ir` (children before parents) that may leave int32 for
    some b, h, q, k of a call with these sizes and parameter values; None if none can."""
    key = tuple(sorted(sizes.items())), tuple(sorted(
        (p.name, params.get(p.name)) for p in ir.params if p.type in ("int", "bool")))
    return _overflow(ir, key)


@functools.lru_cache(maxsize=512)
def _overflow(ir: PatternIR, key) -> Node | None:
    sizes, params = dict(key[0]), dict(key[1])
    table = constant_table(sizes, params)
    nodes = walk_all(simplify(substitute(r, table)) for r in ir.nodes())
    loops = {n.value: n.args[0] for n in nodes if n.op in LOOPS}

    def iv(lo: float, hi: float) -> Iv:
        return Iv(torch.tensor(float(lo), dtype=torch.float64),
                  torch.tensor(float(hi), dtype=torch.float64))

    def extra(n: Node) -> Iv | None:
        if n.op == "loopvar":
            count = loops.get(n.value)
            if count is not None and count.op == "const":
                return iv(0, max(0, int(count.value) - 1))
        if n.op == "pow" and n.dtype == "int" and n.args[1].op == "const" and n.args[1].value >= 0:
            base = ev.eval(n.args[0])
            m = float(torch.maximum(base.lo.abs(), base.hi.abs()) ** int(n.args[1].value))
            return iv(-m, m)
        return None

    env = {"b": iv(0, max(0, sizes.get("batch", 1) - 1)), "h": iv(0, max(0, sizes.get("heads", 1) - 1)),
           "q": iv(0, max(0, sizes.get("q_len", 1) - 1)), "k": iv(0, max(0, sizes.get("k_len", 1) - 1))}
    ev = Evaluator(env, "cpu", dense=extra)
    for n in nodes:
        if n.dtype != "int" or uses(n, "load"):
            continue
        b = ev.eval(n)
        if float(b.lo) < INT32_MIN or float(b.hi) > INT32_MAX:
            return n
    return None
