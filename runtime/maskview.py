"""Dense views of a pattern at small sizes: its mask, the mask's exact tile classes, a picture.

Masks are evaluated with the reference interpreter's own evaluator, so a view means exactly what
the reference backend computes. `attnc show` draws the mask, `attnc run` counts fully masked
rows, and the brute-force tile oracle (`exact_tile_classes`, `brute_force_layout`) is what the
fuzzer and the tests check the block-sparsity analysis and the kernels against. Random arguments
for trying a pattern out are in `samples`.
"""
from __future__ import annotations

import torch

from ..lowering.evaluate import Env, Evaluator
from ..lowering.ir import PatternIR, uses
from .binding import Bound
from .layout import BlockLayout
from .reference import compute_dtype


def masks_read_score(ir: PatternIR) -> bool:
    """Whether some mask depends on the (data-dependent) score."""
    return any(uses(m, "score") for m in ir.masks)


def final_score(ir: PatternIR, bound: Bound, q: torch.Tensor, k: torch.Tensor, scale: float,
                q0: int = 0) -> torch.Tensor:
    """The score after every score statement, for query rows q0 .. q0 + q.shape[2]."""
    B, H, C, _ = q.shape
    Lk = k.shape[2]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    fdtype = compute_dtype(q.dtype)
    ev = Evaluator(Env(bound.sizes, bound.params, bound.expanded(ir), fdtype, q.device, q0, q0 + C, B, H,
                       Lk))
    s = torch.matmul(q.to(fdtype), k.to(fdtype).transpose(-1, -2)) * scale
    for stmt in ir.scores:
        ev.volatile[("score", None)] = s
        ev.local = {}
        s = ev.eval(stmt).expand(B, H, C, Lk)
    return s


def evaluate_masks(ir: PatternIR, bound: Bound, q0: int = 0, q1: int | None = None,
                   score: torch.Tensor | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """bool [batch, heads, q1 - q0, k_len]: the AND of the pattern's masks (before `select`).

    `score` (the final score of those rows) is needed only when a mask reads it."""
    sizes = bound.sizes
    B, H, Lk = sizes["batch"], sizes["heads"], sizes["k_len"]
    q1 = sizes["q_len"] if q1 is None else q1
    if score is None and masks_read_score(ir):
        raise ValueError(f"a mask of `{ir.name}` reads `score`; pass the score to evaluate it")
    fdtype = score.dtype if score is not None else torch.float32
    ev = Evaluator(Env(sizes, bound.params, bound.expanded(ir), fdtype, device, q0, q1, B, H, Lk))
    if score is not None:
        ev.volatile[("score", None)] = score
    keep = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    for m in ir.masks:
        keep = keep & ev.eval(m)
    return keep.expand(B, H, q1 - q0, Lk)


def allowed_mask(ir: PatternIR, bound: Bound, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """bool [batch, heads, q_len, k_len]: `evaluate_masks` over all rows, with the final score of
    q and k when a mask reads it."""
    score = final_score(ir, bound, q, k, scale) if masks_read_score(ir) else None
    return evaluate_masks(ir, bound, score=score, device=q.device)


def exact_tile_classes(keep: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """int8 [B, H, nQ, nK] tile classes of a dense bool mask [B, H, Lq, Lk], by brute force:
    0 EMPTY (nothing allowed), 1 PARTIAL, 2 FULL (every in-range element allowed)."""
    B, H, Lq, Lk = keep.shape
    nq, nk = -(-Lq // block_m), -(-Lk // block_n)
    pad = torch.full((B, H, nq * block_m, nk * block_n), -1, dtype=torch.int8, device=keep.device)
    pad[:, :, :Lq, :Lk] = keep.to(torch.int8)
    t = pad.view(B, H, nq, block_m, nk, block_n).transpose(3, 4).reshape(B, H, nq, nk, -1)
    any_true, any_false = (t == 1).any(-1), (t == 0).any(-1)
    return torch.where(~any_true, 0, torch.where(~any_false, 2, 1)).to(torch.int8)


def brute_force_layout(ir: PatternIR, bound: Bound, q_len: int, k_len: int, block_m: int, block_n: int,
                       device=None) -> BlockLayout:
    """The exact block layout, from the dense mask; called like `layout.build_layout`, so a test
    can put it in the analysis's place. Masks that read `score` have no layout of their own."""
    device = torch.device("cpu" if device is None else device)
    inner = Bound(dict(bound.sizes, q_len=q_len, k_len=k_len), bound.params, bound.tensors, bound.topk)
    classes = exact_tile_classes(evaluate_masks(ir, inner, device=device), block_m, block_n)
    return BlockLayout(classes, block_m, block_n, q_len, k_len, (), (), (), None, device)


def render_mask(mask: torch.Tensor, max_cols: int = 96, max_rows: int = 64) -> str:
    """A text picture of a 2-D bool mask: rows are queries, columns keys.

    `#` allowed, `.` excluded. Larger masks are drawn in cells of several positions: `#` all
    allowed, `+` some, `.` none."""
    Lq, Lk = mask.shape
    rq = max(1, -(-Lq // max_rows))
    rk = max(1, -(-Lk // max_cols))
    rows = -(-Lq // rq) if Lq else 0
    cols = -(-Lk // rk) if Lk else 0
    m = mask.to(torch.int32)
    pad = torch.zeros((rows * rq, cols * rk), dtype=torch.int32)
    cnt = torch.zeros_like(pad)
    pad[:Lq, :Lk] = m
    cnt[:Lq, :Lk] = 1
    allowed = pad.view(rows, rq, cols, rk).sum(dim=(1, 3))
    total = cnt.view(rows, rq, cols, rk).sum(dim=(1, 3))
    label_w = len(str(max(Lq - 1, 0)))
    if rq > 1 or rk > 1:
        lines = [f"rows: queries q, columns: keys k; each character is {rq} quer{'y' if rq == 1 else 'ies'}"
                 f" x {rk} key{'s' if rk != 1 else ''}: # all allowed, + some, . none"]
    else:
        lines = ["rows: queries q, columns: keys k; # allowed, . excluded"]
    ticks = [" "] * cols
    for c in range(0, cols, 8):
        for i, ch in enumerate(str(c * rk)):
            if c + i < cols:
                ticks[c + i] = ch
    lines.append(" " * (label_w + 2) + "".join(ticks).rstrip())
    for r in range(rows):
        line = []
        for c in range(cols):
            a, t = int(allowed[r, c]), int(total[r, c])
            line.append("#" if a == t else "." if a == 0 else "+")
        lines.append(str(r * rq).rjust(label_w) + "  " + "".join(line))
    return "\n".join(lines)
