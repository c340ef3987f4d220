"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

Each rank holds a shard of the sequence (dimension 2 of q, k, v) in one of two orders
(runtime/ring_plan.py). Tensor arguments are passed whole on every rank and indexed with global
positions.

Before anything moves, the block-sparsity analysis classifies every (query chunk, key chunk)
pair at chunk granularity: an EMPTY pair costs neither compute nor a transfer. Each rank sends
its key/value chunks only to the ranks whose queries reach them, in rounds by rank distance,
one round in flight while the one before it is attended (runtime/ring_transfers.py), so a
rank holds its own shard and at most two other ranks' chunks. It attends its query chunks to
every reachable key chunk with positions (`q_start=` / `k_start=`: the pattern sees global
positions) and merges the partial outputs as they come by log-sum-exp (sigmoid: by sum).
What is about a whole row or the whole sequence — q_len and k_len, a softmax sink, `select
topk` — is taken apart in runtime/ring_patterns.py; top-k's thresholds come from a first pass
over every reached key chunk.

The backward keeps nothing from the forward but the merged output and log-sum-exp: it streams
the key/value chunks again, runs each pair's backward against the merged row (`Gradients`),
and sends each received chunk's dK/dV home in the matching round. Gradients of float tensor
arguments are summed over the group.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..dsl.diagnostics import SpecError
from . import ring_patterns
from .pattern import Plan
from .ring_backward import Gradients, pass_back
from .ring_patterns import Calls, Candidates
from .ring_plan import ORDERS, ShardPlan, chunks_of, plan_for
from .ring_transfers import bytes_of, stream, waited


class RingAttention(torch.autograd.Function):
    """The sharded call, forward and backward (see the module docstring). Inputs after the
    non-tensor ones: q, k, v shards and the float tensor arguments that may take gradients."""

    @staticmethod
    def forward(ctx, pattern, plan, rank, group, scalars, others, names, q, k, v, *grad_tensors):
        calls = Calls(pattern, plan, rank, dict(scalars, **others, **dict(zip(names, grad_tensors))))
        if calls.sinked.ir.topk is not None:
            calls.thresholds = _thresholds(calls, group, q, k)
        out, lse = calls.attend(q, k, v, _key_chunks(plan, rank, group, {"k": k, "v": v}))
        ctx.save_for_backward(q, k, v, out, lse, *grad_tensors)
        ctx.info = (calls, group, names, scalars, others)
        if not calls.softmax:  # sigmoid: no log-sum-exp
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        calls, group, names, scalars, others = ctx.info
        ctx.info = None
        plan, rank = calls.plan, calls.rank
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        calls.arguments = dict(scalars, **others, **dict(zip(names, leaves)))
        grads = Gradients(calls, q, k, v, out, lse, grad_out, grad_lse, leaves, names)
        pass_back(group, plan, rank, k, v, grads, k.requires_grad or v.requires_grad)
        for qc in plan.held[rank]:
            if calls.sinked.ir.sink is not None:
                grads.sink(qc, k, v)
        for g in grads.tensors:  # float tensor arguments: summed over the group
            if g is not None:
                waited(dist.all_reduce(g, group=group, async_op=True),
                       "sum the tensor arguments' gradients")
        return (None,) * 7 + (grads.dq, grads.dk, grads.dv, *grads.tensors)


def _key_chunks(plan: ShardPlan, rank: int, group, parts: dict):
    """(chunk, *its parts) of every key chunk, `parts` {name: this rank's shard} ('k', 'v'):
    this rank's first, then the others' that its queries reach, round by round as they
    arrive."""
    for c in plan.held[rank]:
        yield (c, *(t[:, :, plan.local(rank, c)] for t in parts.values()))
    for _, got in stream(group, plan.kv_rounds(rank, parts)):
        yield from plan.arrived(got, tuple(parts))


def _thresholds(calls: Calls, group, q, k) -> dict:
    """`select topk`'s first pass (`Candidates`): the keys stream by once (twice where scores
    tie at a row's threshold on some rank); the pairs' threshold tensor."""
    plan, rank = calls.plan, calls.rank
    kept = Candidates(calls.sinked, plan, rank, q, k, calls.arguments)
    for c, kk in _key_chunks(plan, rank, group, {"k": k}):
        kept.add(c, kk)
    again = torch.tensor([float(kept.settle())], device=q.device)
    # every rank takes part in a second look, or none
    waited(dist.all_reduce(again, group=group, async_op=True), "agree on top-k's thresholds")
    if again.item() > 0:
        kept.restart_below()
        for c, kk in _key_chunks(plan, rank, group, {"k": k}):
            kept.below(c, kk)
    return {ring_patterns.threshold_name(calls.sinked.ir): kept.thresholds()}


# ------------------------------------------------------------------ the call


@dataclass(frozen=True)
class Report:
    """What one sharded call did on this rank: the (query chunk, key chunk) pairs of the whole
    sequence, those the analysis proved EMPTY (neither computed nor sent), and the bytes of
    key/value chunks this rank sent in the forward (top-k's first pass sends the keys once
    more; the backward sends the key/value chunks again and their gradients home)."""

    pairs: int
    skipped: int
    bytes_sent: int


#: the report of this process's last sharded call
LAST: list[Report] = []


@torch.compiler.disable  # transfers and host-side plans: run eagerly inside compiled code
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
    problem = _at_the_door(pattern, world, order, q, k, v, scale, backend, return_lse, arguments)
    _check_alike(pattern, q, k, v, order, scale, arguments, group, problem is not None)
    if problem is not None:
        raise problem
    plan = plan_for(pattern, world, order, q, k, arguments)
    LAST[:] = [Report(len(plan.pairs) + plan.skipped, plan.skipped,
                      sum(bytes_of(sends) for sends, _ in plan.kv_rounds(rank, {"k": k, "v": v})))]
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


def _at_the_door(pattern, world, order, q, k, v, scale, backend, return_lse, arguments):
    """The error a pair's call would raise on this rank (arguments, tensors, backend, kernel
    options; checked on the first chunk), or None: found before anything is sent."""
    per = len(chunks_of(world, order)[0])
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] % per or k.shape[2] != q.shape[2]:
        return None  # the shard check says what is wrong, on every rank
    chunk = q.shape[2] // per
    given = {n: x for n, x in arguments.items() if n != "kernel_options"}
    try:
        Plan.make(ring_patterns.whole(pattern, chunk * per * world), q[:, :, :chunk],
                  k[:, :, :chunk], v[:, :, :chunk], scale, backend, return_lse,
                  arguments.get("kernel_options"), given, placed=True)
    except (ValueError, TypeError, SpecError) as e:
        return e
    return None


def _check_alike(pattern, q, k, v, order, scale, arguments, group, bad: bool = False) -> None:
    """Every rank calls with the same pattern, order, shard shapes and arguments, compared by
    one small all-gather of shapes and a digest: a mismatch is a ValueError on every rank, a
    rank that does not come a TimeoutError, never a hang. `bad`: this rank's call is in error
    (it raises its own error after this check; the others raise a ValueError naming it)."""
    def digest_of(x):
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), str(x.dtype), float(x.detach().double().sum()))
        return repr(x)
    args = tuple(sorted((n, digest_of(x)) for n, x in arguments.items()))
    digest = hashlib.sha256(repr((pattern.digest, order, repr(scale), str(q.dtype),
                                  args)).encode()).digest()
    shapes = [d for t in (q, k, v) for d in (list(t.shape) + [-1] * 4)[:4]]
    mine = torch.tensor(shapes + [int(bad)] + [int.from_bytes(digest[i:i + 7], "little")
                                               for i in (0, 7)],
                        dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    waited(dist.all_gather(everyone, mine, group=group, async_op=True),
           "check their shards and arguments")
    rows = [t.tolist() for t in everyone]
    if bad:
        return
    if any(r[12] for r in rows):
        raise ValueError(f"the call is in error on rank(s) {[i for i, r in enumerate(rows) if r[12]]}"
                         f" (that rank raised the error itself)")
    if any(r[:12] != shapes for r in rows):
        raise ValueError("the shards differ between ranks: " + "; ".join(
            f"rank {i}: q, k, v {[r[j:j + 4] for j in (0, 4, 8)]}" for i, r in enumerate(rows)))
    if any(r[13:] != rows[0][13:] for r in rows):
        bad = [i for i, r in enumerate(rows) if r[13:] != rows[0][13:]]
        raise ValueError(f"the pattern, order, scale, dtype or arguments differ between ranks "
                         f"(ranks {bad} differ from rank 0); pass the same ones, tensor "
                         f"arguments whole")
