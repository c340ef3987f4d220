"""Context parallelism on torch.distributed: attention over sequences sharded across ranks.

    import attnc.parallel as cp
    q_shard = cp.shard(q, group, order="zigzag")               # this rank's part of dimension 2
    out = cp.ring_attention(p, q_shard, k_shard, v_shard, group=group, order="zigzag", **args)
    out_full = cp.unshard(out, group, order="zigzag")

The pattern's sparsity decides which (query shard, key shard) pairs are computed and which
key/value shards travel at all (`runtime/ring.py`; `last_report()` says how many pairs were
skipped and how many bytes this rank sent). Differentiable in q, k, v and float tensor
arguments (summed over the group). Tensor arguments are passed whole on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime.ring import LAST, Report, ring_attention
from .runtime.ring_plan import ORDERS
from .runtime.ring_plan import shard as _shard_of
from .runtime.ring_plan import unshard as _join
from .runtime.ring_transfers import waited

__all__ = ["ORDERS", "Report", "last_report", "ring_attention", "shard", "unshard"]


def _group_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("attnc.parallel needs torch.distributed initialized")
    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: torch.Tensor, group=None, order: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """This rank's shard of the whole sequence `x` (the same on every rank) along `dim`."""
    world, rank = _group_size(group)
    return _shard_of(x, world, rank, order, dim)


def unshard(x: torch.Tensor, group=None, order: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard `x` (an all-gather; not differentiable)."""
    world, _ = _group_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    waited(dist.all_gather(parts, x.contiguous(), group=group, async_op=True), "gather the shards")
    return _join(parts, order, dim)


def last_report() -> Report | None:
    """What this process's last `ring_attention` call did: pairs, pairs skipped, bytes sent."""
    return LAST[0] if LAST else None
