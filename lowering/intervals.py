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

INF = math.inf
EXACT = float(2 ** 52)
#: relative margin when comparing float-valued expressions (covers fp32 rounding of a few ops)
FLOAT_MARGIN = 1e-5


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


def nan_safe(lo, hi) -> Iv:
    """`Iv(lo, hi)` with a NaN bound (e.g. inf - inf) widened to ±inf."""
    bad = torch.isnan(lo) | torch.isnan(hi)
    if bool(bad.any()):
        lo = torch.where(bad, -INF, lo)
        hi = torch.where(bad, INF, hi)
    return Iv(lo, hi)


def corners(fn, a: Iv, b: Iv) -> Iv:
    """Bounds of `fn(x, y)` for a `fn` monotone in each argument: the extremes of the 4 corners."""
    cs = [fn(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    cs = [torch.where(torch.isnan(c), torch.zeros_like(c), c) for c in cs] if fn is torch.mul else cs
    lo = torch.minimum(torch.minimum(cs[0], cs[1]), torch.minimum(cs[2], cs[3]))
    hi = torch.maximum(torch.maximum(cs[0], cs[1]), torch.maximum(cs[2], cs[3]))
    return nan_safe(lo, hi)


def div(a: Iv, b: Iv) -> Iv:
    """`a / b`; unbounded where the divisor's interval holds 0."""
    nonzero = (b.lo > 0) | (b.hi < 0)
    q = corners(torch.div, a, b)
    return Iv(torch.where(nonzero, q.lo, -INF), torch.where(nonzero, q.hi, INF))


def floordiv(a: Iv, b: Iv) -> Iv:
    """Integer floor division; unbounded where the divisor's interval holds 0."""
    nonzero = (b.lo > 0) | (b.hi < 0)
    q = corners(lambda x, y: torch.floor(x / y), a, b)
    return Iv(torch.where(nonzero, q.lo, -INF), torch.where(nonzero, q.hi, INF))


def mod(a: Iv, b: Iv) -> Iv:
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


def absolute(a: Iv) -> Iv:
    lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, torch.zeros_like(a.lo)))
    return Iv(lo, torch.maximum(a.lo.abs(), a.hi.abs()))


def minimum(a: Iv, b: Iv) -> Iv:
    """`min(a, b)`; on 0/1 booleans, `a and b`."""
    return Iv(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))


def maximum(a: Iv, b: Iv) -> Iv:
    """`max(a, b)`; on 0/1 booleans, `a or b`."""
    return Iv(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))


def select(c: Iv, x: Iv, y: Iv) -> Iv:
    """`x if c else y`: one branch where `c` is decided, the hull of both elsewhere."""
    lo = torch.where(c.lo >= 1, x.lo, torch.where(c.hi <= 0, y.lo, torch.minimum(x.lo, y.lo)))
    hi = torch.where(c.lo >= 1, x.hi, torch.where(c.hi <= 0, y.hi, torch.maximum(x.hi, y.hi)))
    return Iv(lo, hi)


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

