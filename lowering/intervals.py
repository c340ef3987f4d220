"""Interval arithmetic over tensors of tile bounds: the abstract domain of the sparsity analysis.

An abstract value is an `Iv(lo, hi)`: two float64 tensors, broadcastable to the analysis grid
`[Bd, Hd, n_q_cells, n_k_cells]`, such that every concrete value the expression takes on the cell
lies in `[lo, hi]`. Booleans are 0/1 values: `lo == 1` means "true everywhere", `hi == 0` means
"false everywhere". Intervals only ever over-approximate, so a claim drawn from them is sound.

Integers are carried in float64. Every integer result is tamed: a bound whose magnitude exceeds
2**52 is pushed outward (to ±2**52 or ±inf), so rounding can never make an interval too narrow.
Float expressions are bounded in float64 and compared with a relative margin (`FLOAT_MARGIN`),
so fp32 or fp16 evaluation in a kernel cannot fall outside a proof.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ir import Node

INF = math.inf
EXACT = float(2 ** 52)
#: relative margin when comparing float-valued expressions (covers fp32 rounding of a few ops)
FLOAT_MARGIN = 1e-5

_INCREASING = {"exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
               "sqrt": torch.sqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
               "softplus": lambda x: torch.nn.functional.softplus(x)}


@dataclass
class Iv:
    """Bounds `lo <= value <= hi` (float64 tensors, broadcastable)."""

    lo: torch.Tensor
    hi: torch.Tensor


def point(x: torch.Tensor) -> Iv:
    x = x.to(torch.float64)
    return Iv(x, x)


def unknown(device) -> Iv:
    return Iv(torch.tensor(-INF, dtype=torch.float64, device=device),
              torch.tensor(INF, dtype=torch.float64, device=device))


def tame(iv: Iv) -> Iv:
    """Push integer bounds beyond float64's exact range outward."""
    lo, hi = iv.lo, iv.hi
    lo = torch.where(lo > EXACT, EXACT, lo)
    lo = torch.where(lo < -EXACT, -INF, lo)
    hi = torch.where(hi < -EXACT, -EXACT, hi)
    hi = torch.where(hi > EXACT, INF, hi)
    return Iv(lo, hi)


def _nan_safe(lo, hi):
    bad = torch.isnan(lo) | torch.isnan(hi)
    if bool(bad.any()):
        lo = torch.where(bad, -INF, lo)
        hi = torch.where(bad, INF, hi)
    return Iv(lo, hi)


def _corners(fn, a: Iv, b: Iv) -> Iv:
    cs = [fn(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    cs = [torch.where(torch.isnan(c), torch.zeros_like(c), c) for c in cs] if fn is torch.mul else cs
    lo = torch.minimum(torch.minimum(cs[0], cs[1]), torch.minimum(cs[2], cs[3]))
    hi = torch.maximum(torch.maximum(cs[0], cs[1]), torch.maximum(cs[2], cs[3]))
    return _nan_safe(lo, hi)


def _floordiv(a: Iv, b: Iv) -> Iv:
    nonzero = (b.lo > 0) | (b.hi < 0)
    q = _corners(lambda x, y: torch.floor(x / y), a, b)
    return Iv(torch.where(nonzero, q.lo, -INF), torch.where(nonzero, q.hi, INF))


def _mod(a: Iv, b: Iv) -> Iv:
    """Floor-mod: the result has the divisor's sign and magnitude below it."""
    const_pos = (b.lo == b.hi) & (b.lo > 0)
    d = b.hi
    width = a.hi - a.lo
    rlo = torch.remainder(a.lo, torch.where(const_pos, d, 1.0))
    rhi = torch.remainder(a.hi, torch.where(const_pos, d, 1.0))
    no_wrap = const_pos & (width < d) & (rlo <= rhi) & torch.isfinite(width)
    lo = torch.where(no_wrap, rlo, 0.0)
    hi = torch.where(no_wrap, rhi, b.hi - 1)
    neg = b.hi < 0
    lo = torch.where(neg, b.lo + 1, lo)
    hi = torch.where(neg, 0.0, hi)
    unknown_ = (b.lo <= 0) & (b.hi >= 0)
    return Iv(torch.where(unknown_, -INF, lo), torch.where(unknown_, INF, hi))


def _abs(a: Iv) -> Iv:
    lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, torch.zeros_like(a.lo)))
    return Iv(lo, torch.maximum(a.lo.abs(), a.hi.abs()))


def _b(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def compare(op: str, a: Iv, b: Iv, is_float: bool) -> Iv:
    """0/1 bounds of `a op b`: lo = provably true, hi = possibly true."""
    alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
    if is_float:  # widen so a kernel's rounding cannot cross a proof's boundary
        m = FLOAT_MARGIN * torch.maximum(torch.maximum(alo.abs(), ahi.abs()),
                                         torch.maximum(blo.abs(), bhi.abs())).nan_to_num(0, 0, 0) + 1e-30
        alo, ahi = alo - m, ahi + m
    if op == "lt":
        must, may = ahi < blo, alo < bhi
    elif op == "le":
        must, may = ahi <= blo, alo <= bhi
    elif op == "gt":
        must, may = alo > bhi, ahi > blo
    elif op == "ge":
        must, may = alo >= bhi, ahi >= blo
    elif op == "eq":
        must = (alo == ahi) & (blo == bhi) & (alo == blo) & torch.isfinite(alo)
        may = (alo <= bhi) & (blo <= ahi)
    else:  # ne
        must = (ahi < blo) | (bhi < alo)
        may = ~((alo == ahi) & (blo == bhi) & (alo == blo) & torch.isfinite(alo))
    if is_float:  # NaN operands: a comparison with NaN is false
        nan = torch.isnan(a.lo) | torch.isnan(a.hi) | torch.isnan(b.lo) | torch.isnan(b.hi)
        must = must & ~nan
        may = may | nan if op == "ne" else may
    return Iv(_b(must), _b(may))


def residue_hits(alo, ahi, d: int, tlo: float, thi: float) -> torch.Tensor:
    """May some x in [alo, ahi] have x mod d (floor) in [tlo, thi]? Exact for contiguous x."""
    tlo, thi = max(tlo, 0.0), min(thi, d - 1.0)
    if tlo > thi:
        return torch.zeros_like(alo, dtype=torch.bool)
    width = ahi - alo
    s = torch.remainder(torch.where(torch.isfinite(alo), alo, 0.0), float(d))
    e = s + width
    first = (s <= thi) & (torch.minimum(e, torch.full_like(e, d - 1.0)) >= tlo)
    second = (e >= d) & (tlo <= e - d)
    return (width >= d - 1) | ~torch.isfinite(width) | first | second | ~torch.isfinite(alo)


class Evaluator:
    """Evaluates IR nodes to intervals over one environment of index intervals.

    `env` maps 'q', 'k', 'b', 'h' to `Iv`s; `dense(node)` may return a precomputed `Iv` for a node
    (the analysis uses it for single-axis subexpressions, evaluated exactly along their axis);
    `note(node, text)` records where precision is lost."""

    def __init__(self, env: dict[str, Iv], device, dense=None, note=None):
        self.env, self.device = env, device
        self.dense = dense or (lambda n: None)
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
        if op in ("score", "size", "param", "loopvar", "load", "sum", "pow"):
            why = {"score": "reads the score (content-dependent)",
                   "load": f"reads tensor `{n.value}` with an index that depends on both q and k"}
            self.note(n, why.get(op, f"uses `{op}`, which the analysis does not bound"))
            if n.dtype == "bool":
                return Iv(*(torch.tensor(v, dtype=torch.float64, device=self.device) for v in (0.0, 1.0)))
            return unknown(self.device)
        a = [self.eval(x) for x in n.args]
        if op == "add":
            return Iv(a[0].lo + a[1].lo, a[0].hi + a[1].hi)
        if op == "sub":
            return Iv(a[0].lo - a[1].hi, a[0].hi - a[1].lo)
        if op == "neg":
            return Iv(-a[0].hi, -a[0].lo)
        if op == "mul":
            return _corners(torch.mul, a[0], a[1])
        if op == "div":
            nonzero = (a[1].lo > 0) | (a[1].hi < 0)
            q = _corners(torch.div, a[0], a[1])
            return Iv(torch.where(nonzero, q.lo, -INF), torch.where(nonzero, q.hi, INF))
        if op == "floordiv":
            if n.dtype == "float":
                q = self._compute(Node("div", "float", n.args))
                return Iv(torch.floor(q.lo), torch.floor(q.hi))
            return _floordiv(a[0], a[1])
        if op == "mod":
            if n.dtype == "float":
                self.note(n, "float `%` is not bounded")
                return unknown(self.device)
            return _mod(a[0], a[1])
        if op == "abs":
            return _abs(a[0])
        if op == "min":
            return Iv(torch.minimum(a[0].lo, a[1].lo), torch.minimum(a[0].hi, a[1].hi))
        if op == "max":
            return Iv(torch.maximum(a[0].lo, a[1].lo), torch.maximum(a[0].hi, a[1].hi))
        if op in ("cast", "floor", "ceil"):
            f = {"cast": lambda x: x, "floor": torch.floor, "ceil": torch.ceil}[op]
            return Iv(f(a[0].lo), f(a[0].hi))
        if op in _INCREASING:
            f = _INCREASING[op]
            return _nan_safe(f(a[0].lo), f(a[0].hi))
        if op == "where":
            c, x, y = a
            lo = torch.where(c.lo >= 1, x.lo, torch.where(c.hi <= 0, y.lo, torch.minimum(x.lo, y.lo)))
            hi = torch.where(c.lo >= 1, x.hi, torch.where(c.hi <= 0, y.hi, torch.maximum(x.hi, y.hi)))
            return Iv(lo, hi)
        if op == "and":
            return Iv(torch.minimum(a[0].lo, a[1].lo), torch.minimum(a[0].hi, a[1].hi))
        if op == "or":
            return Iv(torch.maximum(a[0].lo, a[1].lo), torch.maximum(a[0].hi, a[1].hi))
        if op == "not":
            return Iv(1 - a[0].hi, 1 - a[0].lo)
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            return compare(op, a[0], a[1], n.args[0].dtype == "float" or n.args[1].dtype == "float")
        self.note(n, f"uses `{op}`, which the analysis does not bound")
        return unknown(self.device)
