"""Tier 1: per-query-tile key ranges in closed form, for masks that bound k by functions of q.

For a query tile with first query `q_lo` and one-past-last in-range query `q_hi`, the closed form
gives IR expressions over the leaves `q_lo`, `q_hi` (sizes and parameters already constants):

* `intervals`: half-open key ranges whose union holds every allowed key of every query of the
  tile (the kernel visits only key tiles that meet one of them), and
* `full_intervals`: key ranges allowed for every query of the tile (key tiles inside one of them
  skip mask evaluation).

An interval with `hi <= lo` is empty; all are clamped to `[0, k_len)`. They come from the masks'
normal form: each term's literals `k ⋈ f(q)` (affine, or `(k + d) // c ⋈ g(q)`) give lower and
upper bounds on k; a bound is used only when it is monotone in q, so its extremes over the tile
are its values at `q_lo` and `q_hi - 1`. Literals over q alone guard a term; any other literal is
dropped from the cover (a superset stays sound) and disables the term's full interval.

`derive` works on masks whose sizes are constants (the layout's view). `derive_symbolic` keeps
the sizes (`q_len`, `k_len`, ...) as leaves, so one closed form serves every length: a kernel
evaluates it per query tile against its runtime size arguments, and `ClosedForm.bind` fixes the
sizes to compare it with a layout. Sizes enter the affine forms as variables (`size:NAME`) that
are constant in q.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Node, const, walk
from .normal_form import capped, classify_literal, conjunction, dnf
from .simplify import LOOPS, simplify, substitute, unroll_loops
from .sparsity import index_deps

Q_LO = Node("index", "int", (), "q_lo")
Q_HI = Node("index", "int", (), "q_hi")
#: the most intervals a closed form may have
MAX_INTERVALS = 4


def _i(op, *args) -> Node:
    return Node(op, "int", tuple(args))


def _b(op, *args) -> Node:
    return Node(op, "bool", tuple(args))


_SIZE = "size:"


def _size_atom(n: Node) -> str | None:
    """Sizes as variables of affine forms (constant in q)."""
    return _SIZE + n.value if n.op == "size" and n.dtype == "int" else None


def _leaf(name: str) -> Node:
    if name.startswith(_SIZE):
        return Node("size", "int", (), name[len(_SIZE):])
    return Node("index", "int", (), name)


def _linear(coefs: dict[str, int], c: int) -> Node:
    """sum(coef * leaf) + c over index names and `size:` names."""
    out = const(c)
    for name, co in sorted(coefs.items()):
        if co:
            out = _i("add", out, _i("mul", const(co), _leaf(name)))
    return out


def _div_floor(num: Node, m: int) -> Node:
    return num if m == 1 else _i("floordiv", num, const(m))


def _div_ceil(num: Node, m: int) -> Node:
    return num if m == 1 else _i("neg", _i("floordiv", _i("neg", num), const(m)))


def _mono(n: Node) -> int | None:
    """+1 nondecreasing, -1 nonincreasing, 0 constant in q; None if unknown."""
    if "q" not in index_deps(n):
        return 0
    op = n.op
    if op == "index":
        return 1
    if op in ("add", "sub", "min", "max"):
        a, b = _mono(n.args[0]), _mono(n.args[1])
        if a is None or b is None:
            return None
        b = -b if op == "sub" else b
        return a if b == 0 else b if a == 0 else a if a == b else None
    if op == "neg":
        a = _mono(n.args[0])
        return None if a is None else -a
    if op in ("mul", "floordiv") and n.args[1].op == "const" and "q" not in index_deps(n.args[1]):
        a, c = _mono(n.args[0]), n.args[1].value
        if a is None or not isinstance(c, int) or c == 0:
            return None
        return a if c > 0 else -a
    if op == "mul" and n.args[0].op == "const":
        return _mono(_i("mul", n.args[1], n.args[0]))
    return None


def _at(f: Node, q: Node) -> Node:
    return _canon(substitute(f, {("index", "q"): q}))


def _canon(n: Node) -> Node:
    """Maximal affine subexpressions rewritten as `c1*x1 + ... + c0`, then simplified."""
    from .ir import transform
    from .normal_form import affine

    def rule(m: Node):
        if m.dtype != "int" or m.op not in ("add", "sub", "neg", "mul"):
            return None
        aff = affine(m, _size_atom)
        if aff is None:
            return None
        out = None
        for name, c in sorted(aff[0].items(), key=lambda kv: (kv[1] < 0, kv[0])):
            v = _leaf(name)
            if out is not None and c < 0:  # a - b rather than a + -b
                out = _i("sub", out, v if c == -1 else _i("mul", const(-c), v))
                continue
            term = v if c == 1 else _i("neg", v) if c == -1 else _i("mul", const(c), v)
            out = term if out is None else _i("add", out, term)
        if out is None:
            return const(aff[1])
        return out if aff[1] == 0 else _i("add", out, const(aff[1])) if aff[1] > 0 else _i("sub", out, const(-aff[1]))
    return simplify(transform(n, rule))


@dataclass(frozen=True)
class ClosedForm:
    """Key ranges per query tile as IR over `q_lo` / `q_hi` (see the module docstring).

    From `derive_symbolic` the ranges also read sizes and `block_m`, `q_len`, `k_len` are None
    until `bind` fixes them."""

    intervals: tuple[tuple[Node, Node], ...]
    full_intervals: tuple[tuple[Node, Node], ...]
    exact: bool          # every literal became a bound or a guard
    block_m: int | None
    q_len: int | None
    k_len: int | None

    def bind(self, block_m: int, sizes: dict[str, int]) -> "ClosedForm":
        """This closed form with its size leaves replaced by `sizes` (which must hold q_len and
        k_len, and any other size the ranges read)."""
        table = {("size", n): const(int(v)) for n, v in sizes.items()}

        def sub(pairs):
            return tuple((simplify(substitute(lo, table)), simplify(substitute(hi, table))) for lo, hi in pairs)
        return ClosedForm(sub(self.intervals), sub(self.full_intervals), self.exact, block_m,
                          int(sizes["q_len"]), int(sizes["k_len"]))

    def evaluate(self, q_lo: int, q_hi: int):
        """(cover, full): lists of (lo, hi) ints for the in-range queries [q_lo, q_hi)."""
        table = {("index", "q_lo"): const(q_lo), ("index", "q_hi"): const(q_hi)}

        def ev(pairs):
            out = []
            for lo, hi in pairs:
                a, b = simplify(substitute(lo, table)).value, simplify(substitute(hi, table)).value
                out.append((a, max(a, b)))
            return out
        return ev(self.intervals), ev(self.full_intervals)

    def tile_ranges(self, q_tile: int):
        q_lo = q_tile * self.block_m
        return self.evaluate(q_lo, min(q_lo + self.block_m, self.q_len))

    def key_tiles(self, q_tile: int, block_n: int) -> tuple[list[int], list[int]]:
        """(partial, full) key tiles of query tile `q_tile`, by the arithmetic of the kernels'
        `_runs` / `_run` (lowering/skeletons/common.py.in): the cover ranges' tiles merged into
        disjoint ascending runs; in each run, the FULL tiles are the largest sub-run that one
        full range holds whole (other tiles stay PARTIAL: sound); the tile crossing k_len (the
        tail) is always PARTIAL, since only it checks bounds."""
        cover, full = self.tile_ranges(q_tile)
        n = len(cover)
        t = [(lo // block_n, -(-hi // block_n) if hi > lo else lo // block_n) for lo, hi in cover]
        ft = [(-(-lo // block_n), max(hi // block_n, -(-lo // block_n))) for lo, hi in full]
        ft += [(0, 0)] * (n - len(ft))
        tail = self.k_len // block_n if self.k_len % block_n else -1
        runs, cur = [], 0
        for _ in range(n):
            live = [(a, b) for a, b in t if b > max(a, cur)]
            if not live:
                break
            start = min(max(a, cur) for a, _ in live)
            end = start
            for _ in range(n):
                end = max([end] + [b for a, b in live if a <= end])
            runs.append((start, end))
            cur = end
        partial, full_tiles = [], []
        for a, b in runs:
            spans = [(min(max(lo, a), b), max(min(hi, b), min(max(lo, a), b))) for lo, hi in ft]
            fa, fb = max(spans, key=lambda x: x[1] - x[0]) if spans else (a, a)
            end = b - 1 if (tail >= 0 and b == tail + 1) else b
            fb = min(fb, end)
            fa = min(fa, fb)
            partial += list(range(a, fa)) + list(range(fb, end))
            full_tiles += list(range(fa, fb))
            if end < b:
                partial.append(tail)
        return sorted(partial), sorted(full_tiles)

    def tile_classes(self, block_n: int) -> list[list[int]]:
        """0/1/2 per (query tile, key tile) as a kernel driven by the closed form sees it."""
        n_q, n_k = -(-self.q_len // self.block_m), -(-self.k_len // block_n)
        rows = []
        for t in range(n_q):
            partial, full = self.key_tiles(t, block_n)
            row = [0] * n_k
            for j in partial:
                row[j] = 1
            for j in full:
                row[j] = 2
            rows.append(row)
        return rows


def _k_bounds(node: Node, pos: bool):
    """(lowers, uppers, guard) for one literal: inclusive bounds on k as functions of q (and
    sizes), or a guard `(coefs, L, U)` meaning L <= sum(coef * leaf) <= U over q and sizes;
    None when the literal is not of a supported shape."""
    kind = classify_literal(node, pos, _size_atom)
    if kind[0] == "affine":
        _, key, L, U = kind
        rest = dict(key)
        ck = rest.pop("k", 0)
        if any(v != "q" and not v.startswith(_SIZE) for v in rest):
            return None
        if ck == 0:
            return [], [], (rest, L, U)
        m, sg = abs(ck), (1 if ck > 0 else -1)
        lo_num, hi_num = (L, U) if ck > 0 else (-U, -L)   # bounds on m*k + sg*rest
        neg = {v: -sg * c for v, c in rest.items()}
        lows = [] if lo_num == -float("inf") else [_div_ceil(_linear(neg, int(lo_num)), m)]
        ups = [] if hi_num == float("inf") else [_div_floor(_linear(neg, int(hi_num)), m)]
        return lows, ups, None
    if kind[0] == "generic" and pos and node.op in ("lt", "le", "gt", "ge", "eq"):
        mirror = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}
        for x, g, op in ((node.args[0], node.args[1], node.op), (node.args[1], node.args[0], mirror[node.op])):
            if x.op != "floordiv" or x.args[1].op != "const" or not isinstance(x.args[1].value, int) \
                    or x.args[1].value <= 0 or not index_deps(g) <= {"q"} \
                    or any(n.op == "load" for n in walk(g)):
                continue
            from .normal_form import affine
            inner = affine(x.args[0])
            if inner is None or inner[0] != {"k": 1}:
                continue
            c, d = x.args[1].value, inner[1]
            if op == "gt":
                g, op = _i("add", g, const(1)), "ge"
            if op == "lt":
                g, op = _i("sub", g, const(1)), "le"
            lo = _i("sub", _i("mul", g, const(c)), const(d))
            hi = _i("sub", _i("add", _i("mul", g, const(c)), const(c - 1)), const(d))
            return ([lo] if op in ("ge", "eq") else []), ([hi] if op in ("le", "eq") else []), None
    return None


def derive(masks: tuple[Node, ...], block_m: int, q_len: int, k_len: int) -> ClosedForm | None:
    """The closed form of specialized masks (sizes constant), or None when they do not bound k
    by q."""
    got = _derive(masks, const(k_len))
    return None if got is None else ClosedForm(*got, block_m, q_len, k_len)


def derive_symbolic(masks: tuple[Node, ...]) -> ClosedForm | None:
    """The closed form of masks whose parameters are constants but whose sizes are not: the
    ranges read size leaves (`k_len`, ...), so they hold for every length. None as `derive`."""
    k_end = Node("size", "int", (), "k_len")
    if all(m.op == "const" and m.value is True for m in masks):  # no mask: every key, no mask work
        return ClosedForm(((const(0), k_end),), ((const(0), k_end),), True, None, None, None)
    got = _derive(masks, k_end)
    return None if got is None else ClosedForm(*got, None, None, None)


def _guard_ends(coefs: dict[str, int], L, U, q_last: Node):
    """(some, every) conditions of a guard `L <= sum(coef * leaf) <= U` over the tile: it holds
    for some query of the tile / for every query of the tile."""
    g = _linear(coefs, 0)
    at_lo, at_last = _at(g, Q_LO), _at(g, q_last)
    g_min, g_max = (at_lo, at_last) if coefs.get("q", 0) >= 0 else (at_last, at_lo)
    out = []
    if L != -float("inf"):
        out.append((_b("ge", g_max, const(int(L))), _b("ge", g_min, const(int(L)))))
    if U != float("inf"):
        out.append((_b("le", g_min, const(int(U))), _b("le", g_max, const(int(U)))))
    return out


def _derive(masks: tuple[Node, ...], k_end: Node):
    """(cover, full, exact) of the masks, with `k_end` the one-past-last key; or None."""
    masks = tuple(unroll_loops(m) for m in masks if not (m.op == "const" and m.value is True))
    for m in masks:
        if not index_deps(m) <= {"q", "k"} or any(n.op in ("load", "score", "loopvar") or n.op in LOOPS
                                                  for n in walk(m)):
            return None
    if not masks:
        return None
    terms = dnf(conjunction(masks))
    if capped(terms) or len(terms) > MAX_INTERVALS:
        return None
    q_last = _i("sub", Q_HI, const(1))
    cover, full, exact = [], [], True
    for term in terms:
        lows, ups, guards, full_ok = [], [], [], True
        dead = False
        for node, pos in term:
            kind = classify_literal(node, pos, _size_atom)
            if kind[0] == "const":
                dead = dead or not kind[1]
                continue
            got = _k_bounds(node, pos)
            if got is None:  # dropped: the cover stays a superset, the full interval would not
                full_ok = exact = False
                continue
            lows += got[0]
            ups += got[1]
            if got[2] is not None:
                guards.append(got[2])
        if dead:
            continue
        if not lows and not ups:
            return None  # this term does not bound k: the cover would be everything
        ends = []
        lows, ups = [_canon(f) for f in lows], [_canon(f) for f in ups]
        for f in lows + ups:
            d = _mono(f)
            if d is None:
                return None
            a, b = _at(f, Q_LO), _at(f, q_last)
            ends.append((a, b) if d >= 0 else (b, a))   # (min over tile, max over tile)
        nl = len(lows)
        c_lo, c_hi, f_lo, f_hi = const(0), k_end, const(0), k_end
        for mn, mx in ends[:nl]:
            c_lo, f_lo = _i("max", c_lo, mn), _i("max", f_lo, mx)
        for mn, mx in ends[nl:]:
            c_hi, f_hi = _i("min", c_hi, _i("add", mx, const(1))), _i("min", f_hi, _i("add", mn, const(1)))
        for coefs, L, U in guards:
            for some, every in _guard_ends(coefs, L, U, q_last):
                c_hi = Node("where", "int", (some, c_hi, c_lo))
                f_hi = Node("where", "int", (every, f_hi, f_lo))
        cover.append((_canon(c_lo), _canon(c_hi)))
        if full_ok:
            full.append((_canon(f_lo), _canon(f_hi)))
    return tuple(cover), tuple(full), exact
