"""The plan of a sharded call (runtime/ring.py): which chunks of the sequence each rank holds,
which (query chunk, key chunk) pairs the pattern can reach, and the transfers that follow.

Orders: `contiguous` (rank r holds positions [r·S, (r+1)·S)) or `zigzag` (the sequence cut into
2P chunks; rank r holds chunks r and 2P−1−r, which balances causal work). The pairs come from
the pattern's block layout at chunk granularity over the whole sequence: an EMPTY pair is
neither computed nor sent.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..lowering.sparsity import EMPTY

ORDERS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class ShardPlan:
    """Who holds what and who needs what, the same on every rank. Chunks are numbered along the
    sequence; `held[r]` are rank r's chunks in its local order, `pairs` the non-EMPTY (query
    chunk, key chunk) pairs, `skipped` how many pairs the analysis proved EMPTY."""

    world: int
    chunk: int
    held: tuple[tuple[int, ...], ...]
    pairs: frozenset
    skipped: int

    @property
    def length(self) -> int:
        """The whole sequence's length."""
        return self.chunk * sum(len(h) for h in self.held)

    def owner(self, c: int) -> int:
        return next(r for r, cs in enumerate(self.held) if c in cs)

    def local(self, rank: int, c: int) -> slice:
        i = self.held[rank].index(c)
        return slice(i * self.chunk, (i + 1) * self.chunk)

    def computed(self, rank: int) -> int:
        """How many pairs rank `rank` computes (one attention call each)."""
        return sum((q, k) in self.pairs for q in self.held[rank] for k in self._reach[rank])

    def needed(self, rank: int) -> list[int]:
        """The key chunks rank `rank`'s queries reach, in sequence order."""
        return self._reach[rank]

    @functools.cached_property
    def _reach(self) -> tuple[list[int], ...]:
        owner = {c: r for r, cs in enumerate(self.held) for c in cs}
        reach: list[set] = [set() for _ in self.held]
        for q, k in self.pairs:
            reach[owner[q]].add(k)
        return tuple(sorted(s) for s in reach)

    def kv_rounds(self, rank: int, parts: dict) -> list[tuple[dict, dict]]:
        """The forward's transfers in rounds (runtime/ring_transfers.py): in round d this rank
        sends each of its chunks that the queries of rank + d reach to that rank, and receives
        the chunks of rank − d that its own queries reach. `parts` {name: this rank's shard},
        e.g. {'k': k, 'v': v}; keys of the messages are (peer, chunk, name)."""
        rounds = []
        for d in range(1, self.world):
            dst, src = (rank + d) % self.world, (rank - d) % self.world
            sends = {(dst, c, name): t[:, :, self.local(rank, c)] for c in self.held[rank]
                     if c in self.needed(dst) for name, t in parts.items()}
            recvs = {(src, c, name): t[:, :, :self.chunk] for c in self.held[src]
                     if c in self.needed(rank) for name, t in parts.items()}
            rounds.append((sends, recvs))
        return rounds

    def arrived(self, got: dict, names=("k", "v")):
        """(chunk, *its parts named `names`) of each chunk received in one round, `got`
        {(src, chunk, name): tensor}."""
        for c in sorted({c for (_, c, _) in got}):
            yield (c, *(got[(self.owner(c), c, name)] for name in names))

    def grad_round(self, rank: int, d: int, grads: dict, parts: dict) -> tuple[dict, dict]:
        """The backward's round d: the gradients `grads` {(chunk, name): tensor} of the chunks
        received in key/value round d go home to rank − d, and this rank receives from rank + d
        the gradients of its chunks that rank used."""
        owner, user = (rank - d) % self.world, (rank + d) % self.world
        sends = {(owner, c, name): g for (c, name), g in grads.items()}
        recvs = {(user, c, name): t[:, :, :self.chunk] for c in self.held[rank]
                 if c in self.needed(user) for name, t in parts.items()}
        return sends, recvs


def chunks_of(world: int, order: str) -> tuple[tuple[int, ...], ...]:
    if order == "contiguous":
        return tuple((r,) for r in range(world))
    if order == "zigzag":
        return tuple((r, 2 * world - 1 - r) for r in range(world))
    raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def shard(x: torch.Tensor, world: int, rank: int, order: str, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s shard of the whole sequence `x` along `dim`."""
    held = chunks_of(world, order)
    n = len(held[0]) * world
    if x.shape[dim] % n:
        raise ValueError(f"a sequence of {x.shape[dim]} does not split into {n} equal chunks "
                         f"({world} ranks, order {order!r})")
    pieces = x.chunk(n, dim=dim)
    return torch.cat([pieces[c] for c in held[rank]], dim=dim)


def unshard(shards: list[torch.Tensor], order: str, dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard (rank order)."""
    world = len(shards)
    held = chunks_of(world, order)
    per = len(held[0])
    pieces: dict[int, torch.Tensor] = {}
    for r, s in enumerate(shards):
        for i, part in enumerate(s.chunk(per, dim=dim)):
            pieces[held[r][i]] = part
    return torch.cat([pieces[c] for c in range(world * per)], dim=dim)


def plan_for(pattern, world: int, order: str, q, k, arguments: dict) -> ShardPlan:
    """The plan of a sharded call: chunk pairs from the pattern's block layout at chunk
    granularity over the global sequence."""
    held = chunks_of(world, order)
    per = len(held[0])
    if q.shape[2] % per or k.shape[2] != q.shape[2]:
        raise ValueError(f"ring attention takes q, k and v shards of one length (a multiple of "
                         f"{per} for order {order!r}), got {q.shape[2]} and {k.shape[2]}")
    chunk = q.shape[2] // per
    n = world * per
    params = {name: x for name, x in arguments.items() if name in pattern.ir.argument_names()}
    layout = pattern.layout(n * chunk, n * chunk, block=(chunk, chunk), batch=q.shape[0],
                            heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                            device=q.device, **params)
    live = (layout.classes != EMPTY).reshape(-1, n, n).any(0)
    pairs = frozenset((i, j) for i in range(n) for j in range(n) if bool(live[i, j]))
    return ShardPlan(world, chunk, held, pairs, n * n - len(pairs))
