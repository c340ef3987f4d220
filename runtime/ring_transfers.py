"""Moving chunks between the ranks of a sharded call (runtime/ring.py) with torch.distributed's
asynchronous point-to-point operations (NCCL on GPUs, gloo on CPUs).

Messages go in *rounds*: round d carries what each rank sends to the rank d after it, so each
rank receives from the rank d before it. A rank posts a round as one batch
(`batch_isend_irecv`: one NCCL group), and skips a round in which it neither sends nor
receives. Both ranks of a pair list a round's messages in the same (sorted) order, and every
rank posts its batches in one global order — a call's key/value rounds by increasing d, each
gradient round d right after key/value round d + 1 — so the batches match, without
deadlock, even where a backend runs them in the order they were posted.

`stream` keeps one round in flight while the caller works on the one before it: a rank holds
at most two rounds' chunks (the chunks of one other rank each), not every chunk it needs.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

#: how long a transfer or a check may wait for the other ranks before it fails
TIMEOUT = datetime.timedelta(seconds=300)


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


class Batch:
    """One posted round: `sends` {(dst, chunk, part): tensor}, `recv_like` {(src, chunk,
    part): a tensor shaped as what arrives}."""

    def __init__(self, group, sends: dict, recv_like: dict):
        ops = [dist.P2POp(dist.isend, t.contiguous(), _global(group, key[0]), group)
               for key, t in sorted(sends.items(), key=lambda kv: kv[0])]
        self.bufs = {}
        for key, like in sorted(recv_like.items(), key=lambda kv: kv[0]):
            self.bufs[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.irecv, self.bufs[key], _global(group, key[0]), group))
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> dict:
        """The received tensors, once every transfer of the round is done."""
        for w in self.works:
            waited(w, "send or receive a chunk")
        return self.bufs


def waited(work, what: str) -> None:
    """Wait for an asynchronous transfer or collective at most `TIMEOUT`: a peer that never
    comes is a TimeoutError saying what was waited for, not a hang."""
    try:
        work.wait(TIMEOUT)
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise TimeoutError(f"a sharded call waited {TIMEOUT.total_seconds():.0f} s for the other "
                           f"ranks to {what}; did every rank of the group call ring_attention "
                           f"with its shard?") from None


def post(group, messages) -> Batch | None:
    """Post one round, (sends, recv_like); None when it is empty."""
    sends, recv_like = messages
    return Batch(group, sends, recv_like) if sends or recv_like else None


def stream(group, rounds: list):
    """Post `rounds` (one (sends, recv_like) per distance d = 1, 2, ..., possibly empty) one
    ahead of the caller: yields (d, received tensors of round d) in order of d, round d + 1
    already posted meanwhile."""
    ahead = post(group, rounds[0]) if rounds else None
    for d in range(1, len(rounds) + 1):
        current = ahead
        ahead = post(group, rounds[d]) if d < len(rounds) else None
        yield d, (current.wait() if current is not None else {})


def drain(batches) -> list[dict]:
    """Wait for posted batches (None: nothing posted); their received tensors."""
    return [b.wait() for b in batches if b is not None]


def bytes_of(messages: dict) -> int:
    return sum(t.numel() * t.element_size() for t in messages.values())
