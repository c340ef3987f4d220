"""Views of a pattern's mask: dense at small sizes, sampled for pictures; the mask's exact tile
classes.

Masks are evaluated with the reference interpreter's own evaluator, so a view means exactly what
the reference backend computes — at every position (`evaluate_masks`) or at chosen query and key
positions (`evaluate_masks_at`). `attnc show` draws the mask from `mask_cells`, whose memory and
time are bounded by the picture, not by q_len x k_len; `attnc run` counts fully masked rows; and
the brute-force tile oracle (`exact_tile_classes`, `brute_force_layout`) is what the fuzzer and
the tests check the block-sparsity analysis and the kernels against. Random arguments for trying
a pattern out are in `samples`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lowering.evaluate import Env, Evaluator
from ..lowering.ir import PatternIR, uses
from .binding import Bound
from .layout import BlockLayout
from .reference import compute_dtype


def masks_read_score(ir: PatternIR) -> bool:
    """Whether some mask depends on the (data-dependent) score."""
    return any(uses(m, "score") for m in ir.masks)


def _evaluator(ir: PatternIR, bound: Bound, fdtype, device, rows: torch.Tensor, cols: torch.Tensor,
               batch: int | None = None, head: int | None = None) -> Evaluator:
    """An evaluator at query positions `rows` x key positions `cols` (int64, 1-D), over every
    batch and head, or over the one `batch` / `head` given."""
    sizes = bound.sizes
    B, H = sizes["batch"], sizes["heads"]
    env = Env(sizes, bound.params, bound.expanded(ir), fdtype, device, 0, 0, 0, 0, 0)
    i64 = {"dtype": torch.int64, "device": device}
    env.index = {
        "b": torch.arange(B, **i64) if batch is None else torch.tensor([batch], **i64),
        "h": torch.arange(H, **i64) if head is None else torch.tensor([head], **i64),
        "q": rows.to(**i64),
        "k": cols.to(**i64),
    }
    for axis, name in enumerate(("b", "h", "q", "k")):
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        env.index[name] = env.index[name].view(shape)
    return Evaluator(env)


def _grid(ev: Evaluator) -> tuple[int, int, int, int]:
    return tuple(ev.env.index[n].numel() for n in ("b", "h", "q", "k"))


def final_score(ir: PatternIR, bound: Bound, q: torch.Tensor, k: torch.Tensor, scale: float,
                q0: int = 0) -> torch.Tensor:
    """The score after every score statement, for query rows q0 .. q0 + q.shape[2]."""
    rows = torch.arange(q0, q0 + q.shape[2], device=q.device)
    return final_score_at(ir, bound, q, k, scale, rows, torch.arange(k.shape[2], device=q.device))


def final_score_at(ir: PatternIR, bound: Bound, q: torch.Tensor, k: torch.Tensor, scale: float,
                   rows: torch.Tensor, cols: torch.Tensor, batch: int | None = None,
                   head: int | None = None) -> torch.Tensor:
    """The score after every score statement at query positions `rows` (q's rows) and key
    positions `cols` (k's rows); q and k hold every batch and head, or the one given."""
    H = q.shape[1]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    fdtype = compute_dtype(q.dtype)
    ev = _evaluator(ir, bound, fdtype, q.device, rows, cols, batch, head)
    shape = _grid(ev)
    s = torch.matmul(q.to(fdtype), k.to(fdtype).transpose(-1, -2)) * scale
    for stmt in ir.scores:
        ev.volatile[("score", None)] = s
        ev.local = {}
        s = ev.eval(stmt).expand(shape)
    return s


def evaluate_masks(ir: PatternIR, bound: Bound, q0: int = 0, q1: int | None = None,
                   score: torch.Tensor | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """bool [batch, heads, q1 - q0, k_len]: the AND of the pattern's masks (before `select`).

    `score` (the final score of those rows) is needed only when a mask reads it."""
    q1 = bound.sizes["q_len"] if q1 is None else q1
    return evaluate_masks_at(ir, bound, torch.arange(q0, q1, device=device),
                             torch.arange(bound.sizes["k_len"], device=device), score=score, device=device)


def evaluate_masks_at(ir: PatternIR, bound: Bound, rows: torch.Tensor, cols: torch.Tensor,
                      batch: int | None = None, head: int | None = None, score: torch.Tensor | None = None,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """bool [batch or 1, heads or 1, len(rows), len(cols)]: the AND of the pattern's masks at
    query positions `rows` x key positions `cols`, for every batch and head or the one given.

    `score` (the final score there) is needed only when a mask reads it."""
    if score is None and masks_read_score(ir):
        raise ValueError(f"a mask of `{ir.name}` reads `score`; pass the score to evaluate it")
    fdtype = score.dtype if score is not None else torch.float32
    ev = _evaluator(ir, bound, fdtype, device, rows, cols, batch, head)
    if score is not None:
        ev.volatile[("score", None)] = score
    keep = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    for m in ir.masks:
        keep = keep & ev.eval(m)
    return keep.expand(_grid(ev))


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


#: the most positions one mask picture evaluates (cells larger than this allows are sampled)
PICTURE_BUDGET = 1 << 22
#: the most positions evaluated at once (the picture's memory)
PICTURE_CHUNK = 1 << 18


@dataclass(frozen=True)
class MaskCells:
    """A mask drawn in cells of `rq` queries x `rk` keys: per cell, how many of the positions
    evaluated there are allowed (`allowed`) out of how many were evaluated (`evaluated`), int64
    [rows, cols]. `exact` when every position was evaluated; else each cell was sampled at
    `per_cell` evenly spaced rows and columns (its first and last among them)."""

    allowed: torch.Tensor
    evaluated: torch.Tensor
    rq: int
    rk: int
    q_len: int
    k_len: int
    per_cell: tuple[int, int]
    exact: bool


def _axis(n: int, max_cells: int, per_cell: int) -> tuple[torch.Tensor, int]:
    """The positions of an axis of n drawn in at most `max_cells` cells, at most `per_cell` of
    them per cell (all of them when a cell is that small), and the cell width."""
    step = max(1, -(-n // max(1, max_cells)))
    if step <= per_cell:
        return torch.arange(n), step
    starts = torch.arange(0, n, step)
    last = torch.clamp(starts + step, max=n) - 1
    t = torch.linspace(0, 1, per_cell)
    pos = starts[:, None] + (t[None, :] * (last - starts)[:, None]).round().long()
    return torch.unique(pos), step


def mask_cells(ir: PatternIR, bound: Bound, batch: int = 0, head: int = 0, max_rows: int = 64,
               max_cols: int = 96, score_inputs=None, budget: int = PICTURE_BUDGET) -> MaskCells:
    """The mask of one batch and head, evaluated for a picture of at most `max_rows` x
    `max_cols` cells, at no more than about `budget` positions and in chunks of
    `PICTURE_CHUNK`: memory and time are bounded by the picture, not by q_len x k_len.

    `score_inputs(rows, cols)` -> (q, k, scale), q [1, 1, len(rows), D] and k [1, 1, len(cols), D]
    at those positions, is needed when a mask reads `score`."""
    Lq, Lk = bound.sizes["q_len"], bound.sizes["k_len"]
    cells_q, cells_k = max(1, min(max_rows, Lq)), max(1, min(max_cols, Lk))
    per_cell = max(2, int((budget / (cells_q * cells_k)) ** 0.5))
    rows, rq = _axis(Lq, max_rows, per_cell)
    cols, rk = _axis(Lk, max_cols, per_cell)
    n_rows, n_cols = -(-Lq // rq) if Lq else 0, -(-Lk // rk) if Lk else 0
    row_cell, col_cell = rows // rq, cols // rk
    allowed = torch.zeros(n_rows, n_cols, dtype=torch.int64)
    score = None
    chunk = max(1, PICTURE_CHUNK // max(1, len(cols)))
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        if score_inputs is not None and masks_read_score(ir):
            q, k, scale = score_inputs(r, cols)
            score = final_score_at(ir, bound, q, k, scale, r, cols, batch, head)
        keep = evaluate_masks_at(ir, bound, r, cols, batch, head, score=score)[0, 0].to(torch.int64)
        per_col_cell = torch.zeros(len(r), n_cols, dtype=torch.int64).index_add_(1, col_cell, keep)
        allowed.index_add_(0, row_cell[i:i + chunk], per_col_cell)
    evaluated = torch.bincount(row_cell, minlength=n_rows)[:, None] * torch.bincount(col_cell, minlength=n_cols)[None, :]
    exact = len(rows) == Lq and len(cols) == Lk
    return MaskCells(allowed, evaluated, rq, rk, Lq, Lk, (min(rq, per_cell), min(rk, per_cell)), exact)


def render_mask(mask: torch.Tensor, max_cols: int = 96, max_rows: int = 64) -> str:
    """A text picture of a 2-D bool mask: rows are queries, columns keys.

    `#` allowed, `.` excluded. Larger masks are drawn in cells of several positions: `#` all
    allowed, `+` some, `.` none."""
    Lq, Lk = mask.shape
    rows, rq = _axis(Lq, max_rows, Lq + 1)
    cols, rk = _axis(Lk, max_cols, Lk + 1)
    n_rows, n_cols = -(-Lq // rq) if Lq else 0, -(-Lk // rk) if Lk else 0
    m = mask.to(torch.int64)
    allowed = torch.zeros(Lq, n_cols, dtype=torch.int64).index_add_(1, cols // rk, m)
    allowed = torch.zeros(n_rows, n_cols, dtype=torch.int64).index_add_(0, rows // rq, allowed)
    evaluated = torch.bincount(rows // rq, minlength=n_rows)[:, None] * \
        torch.bincount(cols // rk, minlength=n_cols)[None, :]
    return render_cells(MaskCells(allowed, evaluated, rq, rk, Lq, Lk, (rq, rk), True))


def render_cells(cells: MaskCells) -> str:
    """The text picture of `mask_cells`: `#` allowed, `.` excluded; a cell of several
    positions is `#` when all of them (all sampled) are allowed, `+` some, `.` none."""
    rq, rk = cells.rq, cells.rk
    rows, cols = cells.allowed.shape
    label_w = len(str(max(cells.q_len - 1, 0)))
    if rq > 1 or rk > 1:
        what = "" if cells.exact else \
            f", sampled at {cells.per_cell[0]} x {cells.per_cell[1]} evenly spaced positions"
        lines = [(f"rows: queries q, columns: keys k; each character is {rq} quer{'y' if rq == 1 else 'ies'}"
                  f" x {rk} key{'s' if rk != 1 else ''}{what}: # all {'' if cells.exact else 'sampled '}"
                  "allowed, + some, . none")]
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
            a, t = int(cells.allowed[r, c]), int(cells.evaluated[r, c])
            line.append("#" if a == t else "." if a == 0 else "+")
        lines.append(str(r * rq).rjust(label_w) + "  " + "".join(line))
    return "\n".join(lines)
