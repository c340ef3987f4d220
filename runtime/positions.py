"""Where a call's queries and keys sit in their sequences: the `q_start=`, `k_start=` and
`k_lens=` call keywords.

Row i of q is the query at absolute position `q_start + i`, row j of k and v the key at
`k_start + j`; with `k_lens`, only the first `k_lens[b]` rows of sequence b's keys are valid
(the rest are never attended) and the pattern's `k_len` is `k_lens[b]` in that sequence. Each
keyword is an int (every sequence) or an int tensor `[batch]`. Decoding and chunked prefill with
a KV cache then use the patterns unchanged: `causal` with `q_start = k_lens - q_len` is
bottom-right causal.

A call with any of them carries `Positions`: one int32 tensor `[batch, 3]` (q_start, k_start,
k_len per sequence) on q's device, which the generated kernels read per program and the
reference interpreter per batch element, and host copies of the values when they were checked
(the block layout of a pattern that reads tensors is built per sequence from them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: the call keywords that place queries and keys
KEYWORDS = ("q_start", "k_start", "k_lens")
#: the largest position (generated kernels index in int32)
MAX_POSITION = 2**31 - 1


@dataclass(frozen=True, eq=False)
class Positions:
    """`table`: int32 [batch, 3] of (q_start, k_start, k_len) per sequence, on q's device;
    `values`: the same as a tuple of per-sequence triples on the host, or None when reading
    them would need a device sync that the call skipped (under torch.compile or CUDA graph
    capture)."""

    table: torch.Tensor
    values: tuple[tuple[int, int, int], ...] | None

    def host(self) -> tuple[tuple[int, int, int], ...]:
        """The per-sequence triples (reads the device when they are not on the host yet)."""
        if self.values is not None:
            return self.values
        return tuple(tuple(int(x) for x in row) for row in self.table.tolist())

    def ends(self, q_len: int) -> tuple[int, int]:
        """One past the largest query and key position (`MAX_POSITION` when the values are not
        on the host): what index arithmetic must hold."""
        if self.values is None or not self.values:
            return MAX_POSITION, MAX_POSITION
        return (max(v[0] for v in self.values) + q_len, max(v[1] + v[2] for v in self.values))


def _as_column(name: str, value, batch: int, device) -> torch.Tensor:
    """`value` (an int, or an int tensor [batch] / [1] / 0-dim) as int64 [batch] on `device`."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise ValueError(f"`{name}` must be an int or an int tensor [batch], got "
                         f"{type(value).__name__}")
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    t = value
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"`{name}` must have int elements, got {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (batch, 1)):
        raise ValueError(f"`{name}` must be an int or an int tensor of shape [batch] = [{batch}], "
                         f"got shape {list(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"`{name}` is on {t.device}, but q is on {device}")
    return t.reshape(-1).to(torch.int64).expand(batch)


def positions_of(q, k, q_start=None, k_start=None, k_lens=None) -> Positions | None:
    """The call's `Positions` (None when no keyword was given): checked against q and k — a
    ValueError names the keyword — except for the values of tensors while torch.compile traces
    or a CUDA graph is captured, which cannot be read then (a generated kernel clamps `k_lens`
    into [0, k's length] whatever it gets)."""
    if q_start is None and k_start is None and k_lens is None:
        return None
    B, Lk = q.shape[0], k.shape[2]
    given = (0 if q_start is None else q_start, 0 if k_start is None else k_start,
             Lk if k_lens is None else k_lens)
    tracing = torch.compiler.is_compiling() or (
        q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    if not tracing and all(type(x) is int for x in given):  # every sequence alike: no tensor ops
        rows = [list(given)] * B
        table = None
    else:
        cols = [_as_column(n, x, B, q.device) for n, x in zip(KEYWORDS, given)]
        table = torch.stack(cols, dim=1)
        if tracing:
            return Positions(table.to(torch.int32), None)
        rows = table.tolist()
    for j, name in enumerate(KEYWORDS):
        col = [r[j] for r in rows]
        if not col:
            continue
        lo, hi = min(col), max(col)
        if name == "k_lens":
            if lo < 0 or hi > Lk:
                bad = lo if lo < 0 else hi
                raise ValueError(f"`k_lens` must lie in [0, {Lk}] (the length of k and v), got {bad}")
        elif lo < 0:
            raise ValueError(f"`{name}` must be nonnegative, got {lo}")
    ends = [max(r[0] + q.shape[2], r[1] + r[2]) for r in rows]
    if ends and max(ends) > MAX_POSITION:
        raise ValueError(f"positions reach {max(ends)}; they must stay below 2**31")
    table = (torch.tensor(rows, dtype=torch.int32, device=q.device) if table is None
             else table.to(torch.int32).contiguous())
    return Positions(table, tuple(tuple(int(x) for x in r) for r in rows))


def placement(q_start=None, k_start=None, k_lens=None) -> dict:
    """The position keywords a call gave (those not None), for `positions_of`."""
    return {n: x for n, x in (("q_start", q_start), ("k_start", k_start), ("k_lens", k_lens))
            if x is not None}
