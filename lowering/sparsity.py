"""Block-sparsity analysis: classify every (query tile, key tile) as EMPTY, FULL or PARTIAL.

Soundness is absolute: a tile is EMPTY only if no in-range element is allowed and FULL only if
every in-range element is allowed. The analysis never evaluates the mask per element:

* Each axis is cut into *cells*: the tiles, further split where `q // c` or `q % c` (c constant)
  changes value, so that inside a cell such subexpressions are constant or contiguous.
* Subexpressions that read a single axis (`q // width`, `doc[b, q]`, `is_global[b, k]`) are
  evaluated once per position along their axis, O(q_len + k_len), and reduced to a per-cell
  [min, max] (tier 3 for tensor reads).
* The masks are put in disjunctive normal form; within a term, affine comparisons
  (`q - k < window`, `k < sinks`) narrow the cell's box and are checked jointly, `(affine) % d`
  comparisons use exact residue reasoning, and all other literals use interval arithmetic over
  the narrowed box (tier 2).
* EMPTY = no term of `and(masks)` may be true; FULL = no term of `not mask` may be true, for
  every mask. Cells are reduced to tiles (EMPTY if all cells are, FULL if all cells are).

Everything is vectorized over the grid `[Bd, Hd, cells_q, cells_k]` with torch, on the device of
the tensors; memory is O(number of tiles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .bounds import Evaluator
from .evaluate import Env as DenseEnv, Evaluator as DenseEvaluator
from .intervals import INF, Iv, point, residue_hits
from .ir import Node, walk
from .normal_form import DNF_CAP, Term, affine, capped, classify_literal, conjunction, dnf
from .printer import format_expr
from .simplify import simplify, substitute, unroll_loops

EMPTY, PARTIAL, FULL = 0, 1, 2
#: at most this many cells per tile along an axis from `//` / `%` splits (beyond: no split, noted)
MAX_SPLIT = 8


def text(n: Node) -> str:
    return format_expr(n).replace("$", "")


def constant_masks(masks, table) -> tuple[Node, ...]:
    """Masks with sizes and parameters replaced by constants and folded, and their loops
    unrolled (so `any(... for i in range(n))` is the `or` of its terms)."""
    return tuple(unroll_loops(simplify(substitute(m, table))) for m in masks)


def index_deps(n: Node) -> frozenset[str]:
    return frozenset(m.value for m in walk(n) if m.op == "index")


@dataclass
class Analysis:
    """Per-tile classes and what the user should know about how they were obtained."""

    classes: torch.Tensor                     # int8 [Bd, Hd, nQ, nK]
    tiers: list[str]                          # per mask
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# cells: tiles split where floor-division by a constant changes value


def _breakpoints(masks, var: str, length: int, block: int) -> tuple[list[tuple[int, int]], list[str]]:
    """(period, phase) pairs: cells of `var` start wherever var ≡ phase (mod period)."""
    out, skipped = set(), []
    for m in masks:
        for n in walk(m):
            if n.op not in ("floordiv", "mod") or n.dtype != "int" or n.args[1].op != "const":
                continue
            c = n.args[1].value
            aff = affine(n.args[0])
            if not isinstance(c, int) or c <= 1 or aff is None or list(aff[0]) != [var]:
                continue
            coef, d = aff[0][var], aff[1]
            if abs(coef) != 1:
                continue
            if c * MAX_SPLIT < block:
                skipped.append(f"`{text(n)}` changes value more than {MAX_SPLIT} times per tile; "
                               f"its tiles are not split, so they may be reported PARTIAL")
                continue
            out.add((c, (-d) % c if coef == 1 else (d + 1) % c))
    return sorted(out), skipped


def _cells(length: int, block: int, splits, device):
    """Cell starts/ends (inclusive) along an axis and the tile of each cell."""
    starts = [torch.arange(0, length, block, dtype=torch.int64)]
    for period, phase in splits:
        if phase < length:  # a phase past a short axis starts no cell (and arange would refuse it)
            starts.append(torch.arange(phase, length, period, dtype=torch.int64))
    s = torch.unique(torch.cat(starts)) if len(starts) > 1 else starts[0]
    s = s[s < length]
    e = torch.cat([s[1:], torch.tensor([length], dtype=torch.int64)]) - 1
    return s.to(device), e.to(device), (s // block).to(device)


def _reduce_cells(x: torch.Tensor, tile_of: torch.Tensor, n_tiles: int, dim: int) -> torch.Tensor:
    """Any-reduce a bool tensor over the cells of each tile along `dim`."""
    if x.shape[dim] == n_tiles:
        return x
    shape = list(x.shape)
    shape[dim] = n_tiles
    idx_shape = [1] * x.dim()
    idx_shape[dim] = -1
    idx = tile_of.view(idx_shape).expand_as(x)
    out = torch.zeros(shape, dtype=torch.uint8, device=x.device)
    return out.scatter_reduce_(dim, idx, x.to(torch.uint8), "amax").bool()


# ---------------------------------------------------------------------------------------------
# the analysis proper


class _Grid:
    """Cells of both axes, the base box of index intervals, and single-axis evaluation."""

    def __init__(self, masks, bound, q_len, k_len, bm, bn, Bd, Hd, device):
        self.bound, self.device = bound, device
        self.q_len, self.k_len, self.Bd, self.Hd = q_len, k_len, Bd, Hd
        self.notes: dict[Node, str] = {}
        qs, q_skip = _breakpoints(masks, "q", q_len, bm)
        ks, k_skip = _breakpoints(masks, "k", k_len, bn)
        self.split_notes = q_skip + k_skip
        self.q_lo, self.q_hi, self.q_tile = _cells(q_len, bm, qs, device)
        self.k_lo, self.k_hi, self.k_tile = _cells(k_len, bn, ks, device)
        f64 = dict(dtype=torch.float64, device=device)
        self.box = {
            "q": Iv(self.q_lo.to(torch.float64).view(1, 1, -1, 1), self.q_hi.to(torch.float64).view(1, 1, -1, 1)),
            "k": Iv(self.k_lo.to(torch.float64).view(1, 1, 1, -1), self.k_hi.to(torch.float64).view(1, 1, 1, -1)),
            "b": point(torch.arange(Bd, **f64).view(-1, 1, 1, 1)),
            "h": point(torch.arange(Hd, **f64).view(1, -1, 1, 1)),
        }
        self._dense: dict[Node, Iv | None] = {}
        self._loads: dict[Node, Iv | None] = {}
        self.atoms: dict[str, Iv] = {}

    def atom(self, n: Node) -> str | None:
        """An integer subexpression of one axis, treated as a variable with per-cell bounds."""
        if n.dtype != "int":
            return None
        iv = self.dense(n)
        if iv is None:
            return None
        key = "@" + text(n)
        self.atoms[key] = iv
        return key

    def note(self, n: Node, why: str):
        self.notes.setdefault(n, why)

    def dense(self, n: Node) -> Iv | None:
        """Exact per-cell bounds of a subexpression that reads at most one of q, k."""
        if n.op in ("index", "const") or affine(n) is not None:
            return None
        if n in self._dense:
            return self._dense[n]
        names = {m.op for m in walk(n)} | {m.value for m in walk(n) if m.op == "index"}
        out = None
        if not names & {"score", "loopvar", "size", "param"} and not ({"q", "k"} <= names):
            out = self._evaluate_along(n, "q" if "q" in names else "k" if "k" in names else None)
            if "load" in names:
                for m in walk(n):
                    if m.op == "load":
                        self.note(m, f"reads tensor `{m.value}`: summarized per tile by the min/max of "
                                     f"`{text(m)}`, so a tile is only decided when the summaries decide it")
        self._dense[n] = out
        return out

    def _evaluate_along(self, n: Node, axis: str | None) -> Iv:
        b = self.bound
        L = self.q_len if axis == "q" else self.k_len if axis == "k" else 1
        env = DenseEnv(b.sizes, b.params, b.tensors, torch.float64, self.device, 0,
                   L if axis == "q" else 1, self.Bd, self.Hd, L if axis == "k" else 1)
        vals = DenseEvaluator(env).eval(n).to(torch.float64)
        if vals.dim() < 4:
            vals = vals.reshape((1,) * (4 - vals.dim()) + tuple(vals.shape))
        tb, th = vals.shape[0], vals.shape[1]
        vals = vals.expand(tb, th, L if axis == "q" else 1, L if axis == "k" else 1).reshape(tb, th, L)
        if n.dtype == "int":  # beyond float64's exact range: give up on tight bounds
            big = vals.abs() > 2.0 ** 52
            lo_v = torch.where(big, -INF, vals)
            hi_v = torch.where(big, INF, vals)
        else:
            nan = torch.isnan(vals)
            lo_v, hi_v = torch.where(nan, -INF, vals), torch.where(nan, INF, vals)
        if axis is None:
            return Iv(lo_v.unsqueeze(-1), hi_v.unsqueeze(-1))
        cell_lo = self.q_lo if axis == "q" else self.k_lo
        pos = torch.arange(L, device=self.device)
        cell_of = torch.searchsorted(cell_lo, pos, right=True) - 1
        n_cells = cell_lo.numel()
        shape = (lo_v.shape[0], lo_v.shape[1], n_cells)
        idx = cell_of.view(1, 1, -1).expand_as(lo_v)
        lo = torch.full(shape, INF, dtype=torch.float64, device=self.device).scatter_reduce_(-1, idx, lo_v, "amin")
        hi = torch.full(shape, -INF, dtype=torch.float64, device=self.device).scatter_reduce_(-1, idx, hi_v, "amax")
        view = (*shape[:2], -1, 1) if axis == "q" else (*shape[:2], 1, -1)
        return Iv(lo.view(view), hi.view(view))

    def evaluator(self, box) -> Evaluator:
        return Evaluator(box, self.device, self.dense, self.note, self.load)

    def load(self, n: Node) -> Iv | None:
        """Bounds of a tensor read whose indices read both q and k (a block map such as
        `blocks[b, h, q // 64, k // 64]`, a tree mask `ancestor[q, k]`): the min and max of the
        tensor over the box of indices each cell's queries and keys reach. Each index is bounded
        over the cell box (exactly, when it reads one axis), then the tensor is reduced one
        dimension at a time over the distinct index ranges, so memory is O(cells) times the
        dimensions not yet reduced. None (unbounded) when an index is not bounded or the work
        would be too large."""
        if n in self._loads:
            return self._loads[n]
        out = None
        t = self.bound.tensors.get(n.value)
        if t is not None and t.dim() == len(n.args) and t.numel() > 0:
            ev = Evaluator(self.box, self.device, self.dense)
            ranges = [ev.eval(i) for i in n.args]
            if all(bool(torch.isfinite(r.lo).all() and torch.isfinite(r.hi).all()) for r in ranges):
                out = _range_extremes(t.to(self.device), ranges)
        if out is not None:
            self.note(n, f"reads tensor `{n.value}` with indices on both q and k: summarized per tile by "
                         f"its min/max over the block of indices the tile reaches")
        self._loads[n] = out
        return out


#: most elements a block-map reduction may hold at once (else the read stays unbounded)
MAX_MAP_ELEMENTS = 1 << 25


def _range_extremes(t: torch.Tensor, ranges: list[Iv]) -> Iv | None:
    """(min, max) of `t` over the index box `ranges` (one Iv per dimension, broadcastable to
    the grid [Bd, Hd, cells_q, cells_k]), reducing one dimension at a time over the distinct
    index ranges; None when that would hold more than MAX_MAP_ELEMENTS."""
    lo = hi = t.to(torch.float64).reshape(1, 1, 1, 1, *t.shape)  # [*grid, *dims left]
    for d, r in enumerate(ranges):
        size = t.shape[d]
        a, b = (x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)) for x in (r.lo, r.hi))
        a, b = torch.broadcast_tensors(a.clamp(0, size - 1).to(torch.int64),
                                       b.clamp(0, size - 1).to(torch.int64))
        held, rest = lo.shape[:4], lo.shape[5:]
        grid = torch.broadcast_shapes(held, a.shape)
        pairs, inverse = torch.unique(torch.stack([a.flatten(), b.flatten()], 1), dim=0,
                                      return_inverse=True)
        if (len(pairs) * held.numel() + grid.numel()) * max(1, rest.numel()) > MAX_MAP_ELEMENTS:
            return None
        lo_u = torch.stack([lo.narrow(4, i, j - i + 1).amin(4) for i, j in pairs.tolist()])
        hi_u = torch.stack([hi.narrow(4, i, j - i + 1).amax(4) for i, j in pairs.tolist()])
        # each grid point takes the reduction of its own range: [unique, *held, *rest] -> [*grid, *rest]
        pick = inverse.view(a.shape).expand(grid)
        dims = [torch.arange(n, device=t.device).view([-1 if j == i else 1 for j in range(4)]).expand(grid)
                if n > 1 else torch.zeros(grid, dtype=torch.int64, device=t.device)
                for i, n in enumerate(held)]
        lo, hi = lo_u[(pick, *dims)], hi_u[(pick, *dims)]
    return Iv(lo, hi)


def _form_range(key, box):
    lo = hi = 0.0
    for v, c in key:
        iv = box[v]
        lo = lo + (c * iv.lo if c > 0 else c * iv.hi)
        hi = hi + (c * iv.hi if c > 0 else c * iv.lo)
    return lo, hi


def _form_may(key, box, L, U):
    """May sum(c * v) over the box meet [L, U]? The first variable is compared against the sum
    of the others, so two single-axis operands cost one full-grid comparison, not three."""
    ends = []
    for v, c in key:
        iv = box[v]
        ends.append((c * iv.lo, c * iv.hi) if c > 0 else (c * iv.hi, c * iv.lo))
    lo0, hi0 = ends[0]
    lo_r = sum((e[0] for e in ends[1:]), 0.0)
    hi_r = sum((e[1] for e in ends[1:]), 0.0)
    may = True
    if U != INF:
        may = lo0 <= U - lo_r
    if L != -INF:
        may = may & (hi0 >= L - hi_r)
    return may


def _term_may(term: Term, grid: _Grid) -> torch.Tensor:
    """May the conjunction hold somewhere in each cell? (bool, broadcastable)."""
    box = dict(grid.box)
    forms: dict[tuple, list] = {}
    rest = []
    for node, pos in term:
        kind = classify_literal(node, pos, grid.atom)
        for v, _ in kind[1] if kind[0] in ("affine", "mod") else ():
            if v not in box:
                box[v] = grid.atoms[v]
        if kind[0] == "const":
            if not kind[1]:
                return torch.zeros((), dtype=torch.bool, device=grid.device)
        elif kind[0] == "affine":
            _, key, L, U = kind
            cur = forms.setdefault(key, [-INF, INF])
            cur[0], cur[1] = max(cur[0], L), min(cur[1], U)
        else:
            rest.append((node, pos, kind))
    # narrow the box: single-variable forms bound their variable. Forms over several variables
    # propagate (two rounds) only where that can matter: forms sharing a variable, or literals
    # evaluated over the narrowed box. One linear form over a box is decided exactly without it.
    multi = [k for k in forms if len(k) > 1]
    shared = len({v for k in multi for v, _ in k}) < sum(len(k) for k in multi)
    propagate = bool(multi) and (shared or any(kind[0] == "generic" for _, _, kind in rest))
    for key, (L, U) in [(k, b) for k, b in forms.items() if len(k) == 1] if not propagate else []:
        (v, c), = key
        iv = box[v]
        box[v] = Iv(torch.maximum(iv.lo, torch.tensor(math.ceil(L / c) if L != -INF else L, dtype=torch.float64, device=iv.lo.device)),
                    torch.minimum(iv.hi, torch.tensor(math.floor(U / c) if U != INF else U, dtype=torch.float64, device=iv.hi.device)))
    for _ in range(2) if propagate else ():
        for key, (L, U) in forms.items():
            for v, c in key:
                others = tuple(x for x in key if x[0] != v)
                olo, ohi = _form_range(others, box) if others else (0.0, 0.0)
                lo_c, hi_c = L - ohi, U - olo     # bounds on c * v
                if c < 0:
                    lo_c, hi_c = hi_c, lo_c
                lo_v, hi_v = torch.ceil(torch.as_tensor(lo_c / c, dtype=torch.float64)), \
                    torch.floor(torch.as_tensor(hi_c / c, dtype=torch.float64))
                iv = box[v]
                box[v] = Iv(torch.maximum(iv.lo, lo_v.to(iv.lo.device)), torch.minimum(iv.hi, hi_v.to(iv.hi.device)))
    may = torch.ones((), dtype=torch.bool, device=grid.device)
    for iv in box.values():
        may = may & (iv.lo <= iv.hi)
    for key, (L, U) in forms.items():
        if L > U:
            return torch.zeros((), dtype=torch.bool, device=grid.device)
        if len(key) == 1 and not propagate:
            continue  # already applied to the box
        may = may & _form_may(key, box, L, U)
    ev = None
    for node, pos, kind in rest:
        if kind[0] == "mod":
            _, key, scale, offset, d, tlo, thi = kind
            lo, hi = _form_range(key, box)
            if key in forms:
                lo = torch.maximum(torch.as_tensor(lo, dtype=torch.float64), torch.tensor(forms[key][0], dtype=torch.float64))
                hi = torch.minimum(torch.as_tensor(hi, dtype=torch.float64), torch.tensor(forms[key][1], dtype=torch.float64))
            lo, hi = (scale * lo + offset, scale * hi + offset) if scale > 0 else (scale * hi + offset, scale * lo + offset)
            lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
            may = may & (lo <= hi) & residue_hits(lo, hi, d, tlo, thi) if abs(scale) == 1 else \
                may & residue_hits(torch.full_like(lo, -INF), hi, d, tlo, thi)
        else:
            ev = ev or grid.evaluator(box)
            iv = ev.eval(node)
            may = may & ((iv.hi >= 1) if pos else (iv.lo <= 0))
    return may


def _dnf_may(node_terms: list[Term], grid: _Grid) -> torch.Tensor:
    may = torch.zeros((), dtype=torch.bool, device=grid.device)
    for term in node_terms:
        may = may | _term_may(term, grid)
    return may


def _tier(m: Node, grid_notes: dict, mask_nodes: set) -> str:
    ops = {n.op for n in walk(m)}
    if any(n in mask_nodes and n.op != "load" for n in grid_notes):
        return "fallback"
    return "data" if "load" in ops else "symbolic"


def analyze(masks: tuple[Node, ...], bound, q_len: int, k_len: int, block_m: int, block_n: int,
            device, Bd: int, Hd: int) -> Analysis:
    """Tile classes for specialized masks (see `constant_masks`); sizes already constants."""
    nQ, nK = -(-q_len // block_m), -(-k_len // block_n)
    masks = tuple(m for m in masks if not (m.op == "const" and m.value is True))
    if any(m.op == "const" for m in masks) or nQ == 0 or nK == 0:
        cls = EMPTY if masks else FULL
        return Analysis(torch.full((Bd, Hd, nQ, nK), cls, dtype=torch.int8, device=device),
                        ["symbolic"] * len(masks))
    if not masks:
        return Analysis(torch.full((Bd, Hd, nQ, nK), FULL, dtype=torch.int8, device=device), [])
    grid = _Grid(masks, bound, q_len, k_len, block_m, block_n, Bd, Hd, device)
    notes = list(grid.split_notes)
    joint = dnf(conjunction(masks))
    if capped(joint):
        may_true = torch.ones((), dtype=torch.bool, device=device)
        for m in masks:
            may_true = may_true & _dnf_may(dnf(m), grid)
    else:
        may_true = _dnf_may(joint, grid)
    may_false = torch.zeros((), dtype=torch.bool, device=device)
    for i, m in enumerate(masks):
        terms = dnf(m, False)
        may_false = may_false | _dnf_may(terms, grid)
        if capped(terms) or capped(dnf(m)):
            notes.append(f"mask {i + 1} `{text(m)}` has more than {DNF_CAP} cases in normal form; "
                         f"parts of it are bounded by plain interval arithmetic")
    shape = (Bd, Hd, grid.q_lo.numel(), grid.k_lo.numel())
    may_true, may_false = may_true.expand(shape), may_false.expand(shape)
    may_true = _reduce_cells(_reduce_cells(may_true, grid.q_tile, nQ, 2), grid.k_tile, nK, 3)
    may_false = _reduce_cells(_reduce_cells(may_false, grid.q_tile, nQ, 2), grid.k_tile, nK, 3)
    classes = torch.where(~may_true, EMPTY, torch.where(~may_false, FULL, PARTIAL)).to(torch.int8)
    tiers = []
    for i, m in enumerate(masks):
        nodes = set(walk(m))
        tiers.append(_tier(m, grid.notes, nodes))
        for n, why in grid.notes.items():
            if n in nodes:
                notes.append(f"mask {i + 1} `{text(m)}`: `{text(n)}` {why}" if not why.startswith("reads tensor")
                             else f"mask {i + 1} `{text(m)}`: {why}")
    return Analysis(classes.contiguous(), tiers, list(dict.fromkeys(notes)))
