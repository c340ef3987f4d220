"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

Each rank holds a shard of the sequence (dimension 2 of q, k, v) in one of two orders:
`contiguous` (rank r holds positions [r·S, (r+1)·S)) or `zigzag` (the sequence cut into 2P
chunks; rank r holds chunks r and 2P−1−r, which balances causal work). Tensor arguments are
passed whole on every rank and indexed with global positions.

Before anything moves, the block-sparsity analysis classifies every (query chunk, key chunk)
pair at chunk granularity (`p.layout` with chunk-sized tiles): an EMPTY pair costs neither
compute nor a transfer. Each rank then sends its key/value chunks only to the ranks whose
queries reach them (asynchronous point-to-point sends, posted before the local work so that
they overlap it, in rounds by distance so that the compute waiting on them pipelines), attends
its query chunks to every reachable key chunk with positions (`q_start=` / `k_start=`: the
pattern sees global positions), and merges the partial outputs by log-sum-exp (sigmoid: by
sum). What is about a whole row or the whole sequence — q_len and k_len, a softmax sink,
`select topk` — is taken apart in runtime/ring_patterns.py; top-k's thresholds come from a
first pass over every reached key chunk (`Candidates`). The backward runs the same calls'
backward and sends each key/value chunk's gradient home the same way; gradients of float
tensor arguments are summed over the group.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..lowering.sparsity import EMPTY
from . import ring_patterns
from .autograd import scale_for
from .positions import positions_of
from .reference import allowed_scores

ORDERS = ("contiguous", "zigzag")
#: how long a transfer or a check may wait for the other ranks before it fails
TIMEOUT = datetime.timedelta(seconds=300)


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

    def needed(self, rank: int) -> list[int]:
        """The key chunks rank `rank`'s queries reach, in sequence order."""
        mine = set(self.held[rank])
        return sorted({k for q, k in self.pairs if q in mine})


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
    params = {name: x for name, x in arguments.items() if name in _pattern_names(pattern)}
    layout = pattern.layout(n * chunk, n * chunk, block=(chunk, chunk), batch=q.shape[0],
                            heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                            device=q.device, **params)
    live = (layout.classes != EMPTY).reshape(-1, n, n).any(0)
    pairs = frozenset((i, j) for i in range(n) for j in range(n) if bool(live[i, j]))
    return ShardPlan(world, chunk, held, pairs, n * n - len(pairs))


def _pattern_names(pattern) -> set[str]:
    return {p.name for p in pattern.params} | {t.name for t in pattern.tensors}


# ------------------------------------------------------------------ transfers


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _exchange(group, rank: int, world: int, sends: dict, recv_like: dict) -> tuple[list, dict]:
    """Post the asynchronous sends and receives of one exchange: `sends` {(dst, chunk, part):
    tensor}, `recv_like` {(src, chunk, part): a tensor of the shape to receive}.

    They go as one batch per *round*: round d carries the messages between ranks d apart (to
    rank + d, from rank − d), so a rank's nearest chunks come first and the rounds pipeline
    with the compute that waits on them one by one. Both sides of a pair of ranks list their
    messages of a round in the same (sorted) order. Returns ([(works, received keys) per round,
    nearest first], {(src, chunk, part): buffer}); wait on a round's works before reading its
    buffers."""
    rounds: dict[int, tuple[list, list]] = {}
    for key, t in sorted(sends.items(), key=lambda kv: kv[0]):
        rounds.setdefault((key[0] - rank) % world, ([], []))[0].append(
            dist.P2POp(dist.isend, t.contiguous(), _global(group, key[0]), group))
    bufs = {}
    for key, like in sorted(recv_like.items(), key=lambda kv: kv[0]):
        bufs[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        ops, keys = rounds.setdefault((rank - key[0]) % world, ([], []))
        ops.append(dist.P2POp(dist.irecv, bufs[key], _global(group, key[0]), group))
        keys.append(key)
    return [(dist.batch_isend_irecv(ops), keys) for _, (ops, keys) in sorted(rounds.items())], bufs


def _wait(works) -> None:
    """Wait for posted transfers, each at most `TIMEOUT` (a missing peer is an error, not a
    hang)."""
    for w in works:
        w.wait(TIMEOUT)


def _messages(plan: ShardPlan, rank: int, k, v) -> tuple[dict, dict]:
    """The forward's transfers: ({(dst, chunk, 'k' | 'v'): this rank's chunk for a rank whose
    queries reach it}, {(src, chunk, 'k' | 'v'): a tensor shaped as a chunk this rank's queries
    reach on another rank})."""
    sends, recvs = {}, {}
    for dst in range(plan.world):
        if dst != rank:
            for c in set(plan.held[rank]) & set(plan.needed(dst)):
                part = plan.local(rank, c)
                sends[(dst, c, "k")], sends[(dst, c, "v")] = k[:, :, part], v[:, :, part]
    for c in plan.needed(rank):
        src = plan.owner(c)
        if src != rank:
            part = slice(0, plan.chunk)
            recvs[(src, c, "k")], recvs[(src, c, "v")] = k[:, :, part], v[:, :, part]
    return sends, recvs


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


class Candidates:
    """The first pass of a sharded `select topk(n)`: each local query row's keep threshold
    over every key chunk its queries reach.

    For each (query chunk, key chunk) pair it keeps the row's n + 1 largest allowed scores (the
    reference interpreter's, in fp32/fp64). The row's n-th largest allowed score t over the
    whole sequence is the n-th largest of those lists, and its largest allowed score below t,
    b, is in them too unless one chunk holds n + 1 scores ≥ t (a tie at t; the pairs are then
    evaluated again for b). The pairs keep the keys whose score is ≥ (t + b) / 2: exactly those
    ≥ t, and robust to a generated kernel's rounding of the scores (as long as it is below
    half the gap between t and b, where a kernel's own choice of keys is at the mercy of
    rounding as well). A row with fewer than n allowed keys keeps them all (threshold -inf)."""

    def __init__(self, whole, plan: ShardPlan, rank: int, q, k, arguments: dict):
        self.whole, self.plan, self.rank, self.q = whole, plan, rank, q.detach()
        self.scale = scale_for(arguments.get("scale"), q)
        names = {p.name for p in whole.ir.params} | {t.name for t in whole.ir.tensors}
        self.arguments = {n: (x.detach() if isinstance(x, torch.Tensor) else x)
                          for n, x in arguments.items() if n in names}
        first = slice(0, plan.chunk)
        self.count = whole.bind(q[:, :, first], k[:, :, first], k[:, :, first], self.arguments).topk
        self.lists: dict[int, list] = {c: [] for c in plan.held[rank]}

    def _scores(self, qc: int, kc: int, keys):
        """(row offset, scores with -inf at disallowed keys) of one pair, by chunks of rows."""
        qq = self.q[:, :, self.plan.local(self.rank, qc)]
        bound = self.whole.bind(qq, keys, keys, self.arguments)
        bound.positions = positions_of(qq, keys, q_start=qc * self.plan.chunk,
                                       k_start=kc * self.plan.chunk)
        return allowed_scores(self.whole.ir, qq, keys, bound, scale=self.scale)

    def add(self, kc: int, keys) -> None:
        """Take the candidates of key chunk `kc` (its keys `keys`)."""
        for qc in self.plan.held[self.rank]:
            if (qc, kc) in self.plan.pairs:
                width = min(self.count + 1, keys.shape[2])
                rows = [s.topk(width, dim=-1).values for _, s in self._scores(qc, kc, keys.detach())]
                self.lists[qc].append(torch.cat(rows, dim=2))

    def thresholds(self, chunks) -> torch.Tensor:
        """[batch, heads, N] thresholds (this rank's rows set); `chunks` are the (key chunk,
        keys, values) of every reached key chunk, for the rare second look."""
        B, H, _, _ = self.q.shape
        dtype = torch.float64 if self.q.dtype == torch.float64 else torch.float32
        out = torch.full((B, H, self.plan.length), float("-inf"), dtype=dtype, device=self.q.device)
        n = self.count
        for qc, lists in self.lists.items():
            if not lists:
                continue
            every = torch.cat(lists, dim=-1)
            if every.shape[-1] < n:  # fewer keys than n: every allowed key is kept
                continue
            t = every.topk(n, dim=-1).values[..., -1:]
            b = torch.where(every < t, every, torch.full_like(every, float("-inf"))).amax(-1)
            hidden = [(l >= t).all(-1) & torch.isfinite(t.squeeze(-1)) for l in lists
                      if l.shape[-1] > n]  # a chunk whose n + 1 candidates all tie or pass t
            if any(bool(h.any()) for h in hidden):
                b = self._below(qc, t, chunks)  # a tie at t may hide b: look at every score
            t = t.squeeze(-1)
            cut = torch.where(torch.isfinite(b), t / 2 + b / 2, torch.full_like(t, float("-inf")))
            out[:, :, qc * self.plan.chunk:(qc + 1) * self.plan.chunk] = cut.to(dtype)
        return out

    def _below(self, qc: int, t, chunks) -> torch.Tensor:
        """The largest allowed score below `t` ([B, H, rows, 1]) of each row of query chunk qc."""
        b = torch.full_like(t.squeeze(-1), float("-inf"))
        for kc, keys, _ in chunks:
            if (qc, kc) in self.plan.pairs:
                for q0, s in self._scores(qc, kc, keys.detach()):
                    tt = t[:, :, q0:q0 + s.shape[2]]
                    got = torch.where(s < tt, s, torch.full_like(s, float("-inf"))).amax(-1)
                    b[:, :, q0:q0 + s.shape[2]] = torch.maximum(b[:, :, q0:q0 + s.shape[2]], got)
        return b


class RingAttention(torch.autograd.Function):
    """The sharded call, forward and backward (see the module docstring). Inputs after the
    non-tensor ones: q, k, v shards and the float tensor arguments that may take gradients."""

    @staticmethod
    def forward(ctx, pattern, plan, rank, group, scalars, others, names, q, k, v, *grad_tensors):
        softmax = pattern.ir.normalizer == "softmax"
        n = plan.length
        part, sinked = ring_patterns.pairs(pattern, n), ring_patterns.whole(pattern, n)
        sends, recvs = _messages(plan, rank, k, v)
        rounds, bufs = _exchange(group, rank, plan.world, sends, recvs)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, *grad_tensors)]
            ql, kl, vl = leaves[:3]
            arguments = dict(scalars, **others, **dict(zip(names, leaves[3:])))
            kv_grad = k.requires_grad or v.requires_grad  # then every rank sends dK/dV home
            local = [(c, kl[:, :, plan.local(rank, c)], vl[:, :, plan.local(rank, c)])
                     for c in plan.held[rank]]
            remote = {}

            def arriving():
                """The other ranks' key chunks (chunk, k, v), round by round as they arrive."""
                for works, keys in rounds:
                    _wait(works)
                    remote.update((key, bufs[key].requires_grad_(kv_grad)) for key in keys)
                    for c in sorted({c for (_, c, _) in keys}):
                        yield c, remote[(plan.owner(c), c, "k")], remote[(plan.owner(c), c, "v")]

            partial = {c: [] for c in plan.held[rank]}
            thresholds = {}

            def attend(kc, kk, vv):
                for qc in plan.held[rank]:
                    if (qc, kc) in plan.pairs:
                        got = part(ql[:, :, plan.local(rank, qc)], kk, vv, q_start=qc * plan.chunk,
                                   k_start=kc * plan.chunk, return_lse=softmax, **arguments,
                                   **thresholds)
                        partial[qc].append(got if softmax else (got, None))

            if sinked.ir.topk is None:  # local key chunks first: the transfers overlap them
                for chunk in itertools.chain(local, arriving()):
                    attend(*chunk)
            else:  # every key chunk's candidates first, for the rows' thresholds
                kept = Candidates(sinked, plan, rank, ql, kl, arguments)
                chunks = []
                for chunk in itertools.chain(local, arriving()):
                    kept.add(chunk[0], chunk[1])
                    chunks.append(chunk)
                thresholds[ring_patterns.threshold_name(sinked.ir)] = kept.thresholds(chunks)
                for chunk in chunks:
                    attend(*chunk)
            if sinked.ir.sink is not None:  # each row's sink, once: the whole pattern on no keys
                for qc in plan.held[rank]:
                    partial[qc].append(sinked(ql[:, :, plan.local(rank, qc)], kl[:, :, :0],
                                              vl[:, :, :0], q_start=qc * plan.chunk,
                                              return_lse=True, **arguments))
            outs, lses = [], []
            B, H, _, _ = ql.shape
            for qc in plan.held[rank]:
                if partial[qc]:
                    o, lse = merge(partial[qc], softmax)
                else:  # no key reaches these queries
                    o = ql.new_zeros((B, H, plan.chunk, vl.shape[3]))
                    lse = ql.new_full((B, H, plan.chunk), float("-inf"), dtype=torch.float32)
                outs.append(o)
                lses.append(lse)
            out = torch.cat(outs, dim=2)
            lse = torch.cat(lses, dim=2) if softmax else None
        ctx.graph = (out, lse, leaves, remote)
        ctx.info = (plan, rank, group, len(grad_tensors), kv_grad)
        if lse is None:  # sigmoid: no log-sum-exp
            lse_out = q.new_zeros((B, H, q.shape[2]), dtype=torch.float32)
            ctx.mark_non_differentiable(lse_out)
            return out.detach(), lse_out
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        out, lse, leaves, remote = ctx.graph
        plan, rank, group, n_tensors, kv_grad = ctx.info
        ctx.graph = None
        wrt = [t for t in leaves if t.requires_grad]
        wrt_remote = [(key, t) for key, t in sorted(remote.items()) if t.requires_grad]
        with torch.enable_grad():
            outputs, grads = [out], [grad_out]
            if lse is not None and grad_lse is not None:  # rows with no key: no gradient
                finite = torch.isfinite(lse)
                outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
                grads.append(torch.where(finite, grad_lse, torch.zeros_like(grad_lse)))
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wrt + [t for _, t in wrt_remote],
                                      [g for _, g in pairs], allow_unused=True) if pairs else \
                [None] * (len(wrt) + len(wrt_remote))
        by_leaf = dict(zip([id(t) for t in wrt], got[:len(wrt)]))
        result = [None if not t.requires_grad else
                  (by_leaf[id(t)] if by_leaf[id(t)] is not None else torch.zeros_like(t))
                  for t in leaves]
        if kv_grad:  # the forward's transfers reversed: remote chunks' gradients go home, and
            # this rank's chunks' come back from the ranks that used them, summed
            sends = {key: (g if g is not None else torch.zeros_like(t))
                     for (key, t), g in zip(wrt_remote, got[len(wrt):])}
            recvs, _ = _messages(plan, rank, leaves[1], leaves[2])
            rounds, bufs = _exchange(group, rank, plan.world, sends, recvs)
            for works, _ in rounds:
                _wait(works)
            for (_, c, part), buf in bufs.items():
                grad = result[1 if part == "k" else 2]
                if grad is not None:
                    grad[:, :, plan.local(rank, c)] += buf
        for i in range(3, 3 + n_tensors):  # float tensor arguments: summed over the group
            if result[i] is not None:
                dist.all_reduce(result[i], group=group)
        return (None,) * 7 + tuple(result)


# ------------------------------------------------------------------ the call


@dataclass(frozen=True)
class Report:
    """What one sharded call did on this rank: the (query chunk, key chunk) pairs of the whole
    sequence, those the analysis proved EMPTY (neither computed nor sent), and the bytes this
    rank sent in the forward."""

    pairs: int
    skipped: int
    bytes_sent: int


#: the report of this process's last sharded call
LAST: list[Report] = []


def ring_attention(pattern, q, k, v, *, group=None, order: str = "contiguous",
                   return_lse: bool = False, scale: float | None = None, backend: str = "auto",
                   **arguments):
    """`pattern` over a sequence sharded along dimension 2 of q, k and v across `group` (see
    the module docstring); returns this rank's shard of the output (and of the LSE)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring_attention needs torch.distributed initialized "
                         "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2:
        raise ValueError(f"ring_attention needs a group of at least 2 ranks, got {world}; call "
                         f"the pattern itself on one")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    placed = sorted({"q_start", "k_start", "k_lens", "block_table"} & set(arguments))
    if placed:
        raise ValueError(f"ring_attention places the shards itself (by `order`); it takes no "
                         f"{', '.join(placed)}")
    ir = pattern.ir
    if return_lse and ir.normalizer != "softmax":
        raise ValueError(f"return_lse=True needs the softmax normalizer; `{pattern.name}` uses "
                         f"{ir.normalizer}")
    _check_alike(pattern, q, k, v, order, scale, arguments, group)
    plan = plan_for(pattern, world, order, q, k, arguments)
    sends, _ = _messages(plan, rank, k, v)
    LAST[:] = [Report(len(plan.pairs) + plan.skipped, plan.skipped,
                      sum(t.numel() * t.element_size() for t in sends.values()))]
    names, grad_tensors, others, scalars = [], [], {}, {"scale": scale, "backend": backend}
    for name, x in arguments.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad:
            names.append(name)
            grad_tensors.append(x)
        elif isinstance(x, torch.Tensor):
            others[name] = x
        else:
            scalars[name] = x
    out, lse = RingAttention.apply(pattern, plan, rank, group, scalars, others, tuple(names),
                                   q, k, v, *grad_tensors)
    return (out, lse) if return_lse else out


def _check_alike(pattern, q, k, v, order, scale, arguments, group) -> None:
    """Every rank calls with the same pattern, order, shard shapes and arguments (compared by
    digest, one small collective): a mismatch is a ValueError on every rank, never a hang."""
    def digest_of(x):
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), str(x.dtype), float(x.detach().double().sum()))
        return repr(x)
    shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype))
    args = tuple(sorted((n, digest_of(x)) for n, x in arguments.items()))
    mine = (pattern.digest, order, repr(scale),
            hashlib.sha256(repr(args).encode()).hexdigest())
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (shapes, mine), group=group)
    if any(g[0] != shapes for g in gathered):
        raise ValueError("the shards differ between ranks: "
                         + "; ".join(f"rank {r}: q, k, v {list(g[0][:3])}"
                                     for r, g in enumerate(gathered)))
    if any(g[1] != mine for g in gathered):
        bad = [r for r, g in enumerate(gathered) if g[1] != gathered[0][1]]
        raise ValueError(f"the pattern, order, scale or arguments differ between ranks (ranks "
                         f"{bad} differ from rank 0); pass the same ones, tensor arguments whole")
