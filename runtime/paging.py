"""Paged KV caches: ``p(q, k_pages, v_pages, block_table=..., k_lens=...)``.

k and v are page pools `[pages, kv_heads, page_size, head_dim]`; `block_table` (int,
`[batch, max_pages]`) lists each sequence's pages in order, so key j of sequence b is row
`j % page_size` of page `block_table[b, j // page_size]`. The pattern sees the logical cache
`[batch, kv_heads, max_pages * page_size, head_dim]` (its `k_len`; `k_lens=` says how many of
those keys each sequence has). The generated forward kernels gather the pages themselves; the
reference interpreter reads the gathered cache. Paged calls are for inference: forward only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: a page holds a multiple of this many rows (the kernels' smallest key tile)
PAGE_MULTIPLE = 16


@dataclass(frozen=True, eq=False)
class Pages:
    """A paged call's block table (int32 `[batch, max_pages]`, contiguous, on q's device) and
    page size."""

    table: torch.Tensor
    page_size: int

    @property
    def k_len(self) -> int:
        return self.table.shape[1] * self.page_size

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        """The logical cache `[batch, kv_heads, max_pages * page_size, d]` of a page pool."""
        B, n = self.table.shape
        rows = pool[self.table.reshape(-1).long()]               # [B * n, kv_heads, page, d]
        rows = rows.view(B, n, pool.shape[1], self.page_size, pool.shape[3])
        return rows.permute(0, 2, 1, 3, 4).reshape(B, pool.shape[1], self.k_len, pool.shape[3])

    def view(self, batch: int, pool: torch.Tensor) -> torch.Tensor:
        """A stand-in of the logical cache's shape, dtype and device, without memory (what
        shape checks and planning read)."""
        return torch.as_strided(pool, (batch, pool.shape[1], self.k_len, pool.shape[3]),
                                (0, pool.stride(1), 0, pool.stride(3)))


def pages_of(q, k, v, block_table) -> Pages:
    """The `Pages` of a call, checked: a ValueError names the argument."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"with block_table=, `{name}` must be a page pool [pages, kv_heads, "
                             f"page_size, head_dim], got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"`k` and `v` page pools differ: {list(k.shape)} and {list(v.shape)} "
                         f"(pages, kv_heads and page_size must agree)")
    page = k.shape[2]
    if page == 0 or page % PAGE_MULTIPLE:
        raise ValueError(f"the page size (dimension 2 of k and v) must be a positive multiple of "
                         f"{PAGE_MULTIPLE}, got {page}")
    t = block_table
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"`block_table` must be an int tensor [batch, max_pages], got "
                         f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"`block_table` must have int elements, got {t.dtype}")
    if t.shape[0] != q.shape[0]:
        raise ValueError(f"`block_table` has {t.shape[0]} rows; q has batch {q.shape[0]}")
    if t.device != q.device:
        raise ValueError(f"`block_table` is on {t.device}, but q is on {q.device}")
    tracing = torch.compiler.is_compiling() or (
        q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    if not tracing and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= k.shape[0]:
            raise ValueError(f"`block_table` names page {lo if lo < 0 else hi}; the pools have "
                             f"{k.shape[0]} pages (0 .. {k.shape[0] - 1})")
    return Pages(t.to(torch.int32).contiguous(), page)


def needs_grad(q, k, v, arguments: dict) -> bool:
    """Whether autograd would record this call."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (q, k, v, *arguments.values()))
