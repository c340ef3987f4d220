"""What a sharded call evaluates: the pattern over the whole sequence, taken apart so that
its pieces can be computed per (query chunk, key chunk) pair and merged exactly.

A pair's call attends a chunk of queries to a chunk of keys, placed at their global positions.
Three things in a pattern are about a whole row or the whole sequence, not about a pair:

- **the lengths**: `q_len` and `k_len` in a score, mask, bias, sink, require or tensor shape
  mean the whole sequence's length N; `whole()` substitutes N for them (so `std.sigmoid`'s
  `-log(k_len)` is `-log(N)` on every rank, and a tensor declared `[batch, q_len]` is passed
  whole);
- **the sink**: one more term in the row's softmax denominator, so it must be counted once per
  row, not once per pair. The pairs' pattern has none; the row's sink enters the merge as one
  more partial, the call of the whole pattern on no keys (output 0, log-sum-exp = the sink);
- **`select topk(n)`**: the row's n-th largest allowed score over every key chunk. The pairs'
  pattern has no `select`; instead a first pass (`Candidates`, below) finds each
  row's threshold from every chunk's candidates, and the pairs' pattern keeps a key when its
  score is at least that (`score = score if score >= kth[b, h, q] else -inf`, with `kth` a
  [batch, heads, N] tensor; an excluded key then weighs exp(-inf) = 0, sigmoid(-inf) = 0).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..lowering.ir import Node, PatternIR, TensorSpec, walk
from ..lowering.simplify import simplify, substitute
from .autograd import scale_for
from .binding import Bound, bind, sizes_for
from .pattern import Pattern
from .positions import positions_of
from .reference import allowed_scores

#: the pairs' threshold tensor (`threshold_name` makes it unique in the pattern)
THRESHOLD = "ring_kth"

_B, _H, _Q = (Node("index", "int", (), i) for i in "bhq")


def reads_lengths(ir: PatternIR) -> bool:
    return any(n.op == "size" and n.value in ("q_len", "k_len")
               for n in [*ir.nodes(), *(r.cond for r in ir.requires)] for n in walk(n))


@functools.lru_cache(maxsize=64)
def whole(pattern: Pattern, n: int) -> Pattern:
    """`pattern` with q_len and k_len the whole sequence's length `n` (itself when it reads
    neither)."""
    if not reads_lengths(pattern.ir):
        return pattern
    length = Node("const", "int", (), n)
    table = {("size", "q_len"): length, ("size", "k_len"): length}
    return Pattern(pattern.ir.map(lambda e: simplify(substitute(e, table))), pattern.source)


@functools.lru_cache(maxsize=64)
def pairs(pattern: Pattern, n: int) -> Pattern:
    """What a (query chunk, key chunk) pair calls: `whole(pattern, n)` without its sink and,
    for `select topk`, with the threshold tensor (`threshold_name`) in place of the selection."""
    ir = whole(pattern, n).ir
    if ir.sink is None and ir.topk is None:
        return whole(pattern, n)
    scores = ir.scores
    tensors = ir.tensors
    if ir.topk is not None:
        score, name = Node("score", "float"), threshold_name(ir)
        kth = Node("load", "float", (_B, _H, _Q), name)
        dims = (Node("size", "int", (), "batch"), Node("size", "int", (), "heads"),
                Node("const", "int", (), n))
        tensors = (*tensors, TensorSpec(name, "float", dims))
        scores = (*scores, Node("where", "float", (Node("ge", "bool", (score, kth)), score,
                                                   Node("const", "float", (), -math.inf))))
    return Pattern(dataclasses.replace(ir, tensors=tensors, scores=scores, topk=None, sink=None),
                   pattern.source)


def threshold_name(ir: PatternIR) -> str:
    """`THRESHOLD`, with underscores added until no parameter or tensor of `ir` has the name."""
    taken = ir.argument_names()
    name = THRESHOLD
    while name in taken:
        name += "_"
    return name


def placed(pattern: Pattern, rows, keys, qc: int, kc: int, chunk: int, arguments: dict) -> Bound:
    """The Bound of `pattern` for query chunk qc's `rows` against key chunk kc's `keys`, at
    their global positions (chunks of `chunk`), from a sharded call's `arguments` (those of the
    pattern, detached)."""
    given = {n: (x.detach() if isinstance(x, torch.Tensor) else x)
             for n, x in arguments.items() if n in pattern.ir.argument_names()}
    bound = bind(pattern.ir, sizes_for(rows.shape, keys.shape), given, rows.device, placed=True)
    bound.positions = positions_of(rows, keys, q_start=qc * chunk, k_start=kc * chunk)
    return bound


class Candidates:
    """The first pass of a sharded `select topk(n)`: each local query row's keep threshold
    over every key chunk its queries reach, fed one key chunk at a time (`add`).

    It keeps each row's n + 1 largest allowed scores so far (the reference interpreter's, in
    fp32/fp64). The n-th of them at the end is the row's n-th largest allowed score t over the
    whole sequence, and the (n + 1)-th is the largest allowed score below t, b — unless scores
    tie at t, or one chunk held n + 1 scores ≥ t (then `settle` says so, and every chunk's
    scores are looked at again by `below`). The pairs keep the keys whose score is
    ≥ (t + b) / 2: exactly those ≥ t, and robust to a generated kernel's rounding of the scores
    as long as it is below half the gap between t and b (where a kernel's own choice of keys
    is at the mercy of rounding as well). A row with fewer than n allowed keys keeps them all
    (threshold -inf)."""

    def __init__(self, whole, plan, rank: int, q, k, arguments: dict):
        self.whole, self.plan, self.rank, self.q = whole, plan, rank, q.detach()
        self.scale = scale_for(arguments.get("scale"), q)
        self.arguments = arguments
        first = slice(0, plan.chunk)
        self.n = placed(whole, q[:, :, first], k[:, :, first], 0, 0, plan.chunk, arguments).topk
        B, H = q.shape[:2]
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        inf = dict(fill_value=float("-inf"), dtype=dtype, device=q.device)
        self.best = {c: torch.full((B, H, plan.chunk, self.n + 1), **inf) for c in plan.held[rank]}
        self.fullest = {c: torch.full((B, H, plan.chunk), **inf) for c in plan.held[rank]}
        self.t, self.b = {}, {}

    def _scores(self, qc: int, kc: int, keys):
        """(row offset, scores with -inf at disallowed keys) of one pair, by chunks of rows."""
        qq = self.q[:, :, self.plan.local(self.rank, qc)]
        bound = placed(self.whole, qq, keys, qc, kc, self.plan.chunk, self.arguments)
        return allowed_scores(self.whole.ir, qq, keys.detach(), bound, scale=self.scale)

    def _reached(self, kc: int):
        return [qc for qc in self.plan.held[self.rank] if (qc, kc) in self.plan.pairs]

    def add(self, kc: int, keys) -> None:
        """Take the scores of key chunk `kc` (its keys `keys`)."""
        width = min(self.n + 1, keys.shape[2])
        for qc in self._reached(kc):
            for q0, s in self._scores(qc, kc, keys):
                rows = slice(q0, q0 + s.shape[2])
                top = s.topk(width, dim=-1).values
                best = self.best[qc][:, :, rows]
                best.copy_(torch.cat([best, top], dim=-1).topk(self.n + 1, dim=-1).values)
                if width == self.n + 1:  # a chunk's n + 1 best all ≥ t would hide b
                    fullest = self.fullest[qc][:, :, rows]
                    torch.maximum(fullest, top[..., -1], out=fullest)

    def settle(self) -> bool:
        """Fix t and b from the candidates; True when some row needs every score again for b."""
        again = False
        for qc, best in self.best.items():
            t = best[..., self.n - 1]
            self.t[qc], self.b[qc] = t, best[..., self.n]
            finite = torch.isfinite(t)
            again |= bool((finite & ((best[..., self.n] >= t) | (self.fullest[qc] >= t))).any())
        return again

    def below(self, kc: int, keys) -> None:
        """The second look: b from every score of key chunk `kc` (after `settle`)."""
        for qc in self._reached(kc):
            for q0, s in self._scores(qc, kc, keys):
                rows = slice(q0, q0 + s.shape[2])
                t = self.t[qc][:, :, rows]
                got = torch.where(s < t[..., None], s, torch.full_like(s, float("-inf"))).amax(-1)
                b = self.b[qc][:, :, rows]
                torch.maximum(b, got, out=b)

    def restart_below(self) -> None:
        """Before a second look: forget the b found from the candidates."""
        for qc, t in self.t.items():
            self.b[qc] = torch.full_like(t, float("-inf"))

    def thresholds(self) -> torch.Tensor:
        """[batch, heads, N] keep thresholds, this rank's rows set (after `settle`)."""
        t0 = next(iter(self.t.values()))
        out = torch.full((*t0.shape[:2], self.plan.length), float("-inf"), dtype=t0.dtype,
                         device=t0.device)
        for qc, t in self.t.items():
            b = self.b[qc]
            cut = torch.where(torch.isfinite(t) & torch.isfinite(b), t / 2 + b / 2,
                              torch.where(torch.isfinite(t), torch.full_like(t, float("-inf")), t))
            out[:, :, qc * self.plan.chunk:(qc + 1) * self.plan.chunk] = cut
        return out


class Calls:
    """The attention calls of one rank's part of a sharded call: each (query chunk, key chunk)
    pair through `pairs` (above) and each row's sink through `sink`."""

    def __init__(self, pattern, plan, rank: int, arguments: dict):
        self.plan, self.rank, self.arguments = plan, rank, arguments
        self.softmax = pattern.ir.normalizer == "softmax"
        self.part = pairs(pattern, plan.length)
        self.sinked = whole(pattern, plan.length)
        self.thresholds: dict = {}

    def rows(self, q, qc: int):
        return q[:, :, self.plan.local(self.rank, qc)]

    def pairs(self, q, kc: int, kk, vv):
        """(query chunk, its partial) for each local query chunk that key chunk kc reaches."""
        for qc in self.plan.held[self.rank]:
            if (qc, kc) in self.plan.pairs:
                yield qc, self.pair(self.rows(q, qc), qc, kc, kk, vv)

    def pair(self, rows, qc: int, kc: int, kk, vv):
        """The partial of query chunk qc's `rows` against key chunk kc."""
        return self.part(rows, kk, vv, q_start=qc * self.plan.chunk, k_start=kc * self.plan.chunk,
                         return_lse=self.softmax, **self.arguments, **self.thresholds)

    def sink(self, rows, qc: int, k, v):
        """Query chunk qc's sinks as a partial: the whole pattern on no keys (output 0, LSE =
        the sink)."""
        return self.sinked(rows, k[:, :, :0], v[:, :, :0], q_start=qc * self.plan.chunk,
                           return_lse=True, **self.arguments)

    def attend(self, q, k, v, chunks):
        """This rank's (out, lse) over `chunks`, the (key chunk, k, v) its queries reach (in
        any order, each once): partials merged as they come in fp32 (fp64), each row's sink
        once, rounded to q's dtype at the end (lse: zeros for sigmoid)."""
        plan, softmax = self.plan, self.softmax
        rows = {qc: None for qc in plan.held[self.rank]}  # each query chunk's merged (out, lse)
        wide = torch.promote_types(q.dtype, torch.float32)

        def merged(qc, got):
            o, lse = got if softmax else (got, None)
            got = (o.to(wide), lse)
            return got if rows[qc] is None else merge([rows[qc], got], softmax)

        for kc, kk, vv in chunks:
            for qc, got in self.pairs(q, kc, kk, vv):
                rows[qc] = merged(qc, got)
        B, H = q.shape[:2]
        for qc in plan.held[self.rank]:
            if self.sinked.ir.sink is not None:  # each row's sink, once
                rows[qc] = merged(qc, self.sink(self.rows(q, qc), qc, k, v))
            if rows[qc] is None:  # no key reaches these queries
                rows[qc] = (q.new_zeros((B, H, plan.chunk, v.shape[3]), dtype=wide),
                            q.new_full((B, H, plan.chunk), float("-inf"), dtype=wide))
        out = torch.cat([rows[qc][0] for qc in plan.held[self.rank]], dim=2).to(q.dtype)
        if not softmax:
            return out, q.new_zeros((B, H, q.shape[2]), dtype=torch.float32)
        return out, torch.cat([rows[qc][1].to(wide) for qc in plan.held[self.rank]], dim=2)


def merge(parts: list, softmax: bool):
    """One query chunk's output from its partial (out, lse) over key chunks: by log-sum-exp
    (a row no chunk allows gives 0 and -inf), or by sum (sigmoid)."""
    if not softmax:
        wide = torch.promote_types(parts[0][0].dtype, torch.float32)
        return sum(o.to(wide) for o, _ in parts).to(parts[0][0].dtype), None
    lses = torch.stack([l for _, l in parts])
    m = lses.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m_safe)
    total = w.sum(0)
    lse = torch.where(total > 0, m_safe + torch.log(total.clamp_min(1e-300)), m)
    scale = torch.where(total > 0, w / total.clamp_min(1e-300), torch.zeros_like(w))
    out = sum(o.to(scale.dtype) * s[..., None] for (o, _), s in zip(parts, scale))
    return out.to(parts[0][0].dtype), lse
