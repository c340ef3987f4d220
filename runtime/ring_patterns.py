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
  pattern has no `select`; instead a first pass (`thresholds` in runtime/ring.py) finds each
  row's threshold from every chunk's candidates, and the pairs' pattern keeps a key when its
  score is at least that (`score = score if score >= kth[b, h, q] else -inf`, with `kth` a
  [batch, heads, N] tensor; an excluded key then weighs exp(-inf) = 0, sigmoid(-inf) = 0).
"""
from __future__ import annotations

import dataclasses
import functools
import math

from ..lowering.ir import Node, PatternIR, TensorSpec, walk
from ..lowering.simplify import simplify, substitute
from .pattern import Pattern

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
        score = Node("score", "float")
        kth = Node("load", "float", (_B, _H, _Q), threshold_name(ir))
        dims = (Node("size", "int", (), "batch"), Node("size", "int", (), "heads"),
                Node("const", "int", (), n))
        tensors = (*tensors, TensorSpec(threshold_name(ir), "float", dims))
        scores = (*scores, Node("where", "float", (Node("ge", "bool", (score, kth)), score,
                                                   Node("const", "float", (), -math.inf))))
    return Pattern(dataclasses.replace(ir, tensors=tensors, scores=scores, topk=None, sink=None),
                   pattern.source)


def threshold_name(ir: PatternIR) -> str:
    """`THRESHOLD`, with underscores added until no parameter or tensor of `ir` has the name."""
    taken = {p.name for p in ir.params} | {t.name for t in ir.tensors}
    name = THRESHOLD
    while name in taken:
        name += "_"
    return name
