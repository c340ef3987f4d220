"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

Each rank holds a shard of the sequence (dimension 2 of q, k, v) in one of two orders:
`contiguous` (rank r holds positions [r·S, (r+1)·S)) or `zigzag` (the sequence cut into 2P
chunks; rank r holds chunks r and 2P−1−r, which balances causal work). Tensor arguments are
passed whole on every rank and indexed with global positions.

Before anything moves, the block-sparsity analysis classifies every (query chunk, key chunk)
pair at chunk granularity (`p.layout` with chunk-sized tiles): an EMPTY pair costs neither
compute nor a transfer. Each rank then sends its key/value chunks only to the ranks whose
queries reach them (asynchronous point-to-point sends, posted before the local work so that
they overlap it), attends its query chunks to every reachable key chunk with positions
(`q_start=` / `k_start=`: the pattern sees global positions), and merges the partial outputs by
log-sum-exp (sigmoid: by sum). The backward runs the same calls' backward and sends each
key/value chunk's gradient home the same way; gradients of float tensor arguments are summed
over the group.
"""
from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..lowering.sparsity import EMPTY

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


def _exchange(group, sends: dict, recv_like: dict) -> tuple[list, dict]:
    """Post the asynchronous sends and receives of one exchange: `sends` {(dst, chunk, part):
    tensor}, `recv_like` {(src, chunk, part): a tensor of the shape to receive}. Both sides of
    a pair of ranks list their messages in the same (sorted) order. Returns (works,
    {(src, chunk, part): buffer}); wait on the works before reading the buffers."""
    ops, bufs = [], {}
    for key, t in sorted(sends.items(), key=lambda kv: kv[0]):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), _global(group, key[0]), group))
    for key, like in sorted(recv_like.items(), key=lambda kv: kv[0]):
        bufs[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        ops.append(dist.P2POp(dist.irecv, bufs[key], _global(group, key[0]), group))
    works = dist.batch_isend_irecv(ops) if ops else []
    return works, bufs


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
        return sum(o.float() for o, _ in parts).to(parts[0][0].dtype), None
    lses = torch.stack([l for _, l in parts])
    m = lses.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m_safe)
    total = w.sum(0)
    lse = torch.where(total > 0, m_safe + torch.log(total.clamp_min(1e-300)), m)
    scale = torch.where(total > 0, w / total.clamp_min(1e-300), torch.zeros_like(w))
    out = sum(o.to(scale.dtype) * s[..., None] for (o, _), s in zip(parts, scale))
    return out.to(parts[0][0].dtype), lse


class RingAttention(torch.autograd.Function):
    """The sharded call, forward and backward (see the module docstring). Inputs after the
    non-tensor ones: q, k, v shards and the float tensor arguments that may take gradients."""

    @staticmethod
    def forward(ctx, pattern, plan, rank, group, scalars, others, names, q, k, v, *grad_tensors):
        softmax = pattern.ir.normalizer == "softmax"
        sends, recvs = _messages(plan, rank, k, v)
        works, bufs = _exchange(group, sends, recvs)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, *grad_tensors)]
            ql, kl, vl = leaves[:3]
            arguments = dict(scalars, **others, **dict(zip(names, leaves[3:])))
            partial = {c: [] for c in plan.held[rank]}

            def attend(kc, kk, vv):
                for qc in plan.held[rank]:
                    if (qc, kc) not in plan.pairs:
                        continue
                    got = pattern(ql[:, :, plan.local(rank, qc)], kk, vv, q_start=qc * plan.chunk,
                                  k_start=kc * plan.chunk, return_lse=softmax, **arguments)
                    partial[qc].append(got if softmax else (got, None))

            for c in plan.held[rank]:  # local key chunks first: the transfers overlap them
                attend(c, kl[:, :, plan.local(rank, c)], vl[:, :, plan.local(rank, c)])
            _wait(works)
            kv_grad = k.requires_grad or v.requires_grad  # then every rank sends dK/dV home
            remote = {key: buf.requires_grad_(kv_grad) for key, buf in bufs.items()}
            for c in sorted({c for (_, c, _) in bufs}):
                src = plan.owner(c)
                attend(c, remote[(src, c, "k")], remote[(src, c, "v")])
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
            works, bufs = _exchange(group, sends, recvs)
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


def _reads_lengths(ir) -> bool:
    """Whether a score, mask, bias or sink reads q_len or k_len (tensor shapes may)."""
    from ..lowering.ir import walk
    roots = [*ir.scores, *ir.masks, *(r for r in (ir.bias, ir.sink) if r is not None)]
    return any(n.op == "size" and n.value in ("q_len", "k_len") for r in roots for n in walk(r))


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
    if ir.topk is not None:
        raise ValueError(f"`{pattern.name}` selects the top k keys of each row: across shards "
                         f"that needs each row's global threshold first, not supported yet")
    if ir.sink is not None:
        raise ValueError(f"`{pattern.name}` has a softmax sink: merging shards would count it "
                         f"once per shard; not supported yet")
    if _reads_lengths(ir):
        raise ValueError(f"`{pattern.name}` reads q_len or k_len, which on a shard would be the "
                         f"shard's length, not the sequence's; not supported yet")
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
