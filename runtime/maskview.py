"""Dense views of a pattern at small sizes, and plausible random arguments for trying one out.

Used by `attnc show` (the mask as a picture) and `attnc run` (random inputs). Masks are evaluated
with the reference interpreter's own evaluator, so the picture means exactly what the reference
backend computes.
"""
from __future__ import annotations

import torch

from ..lowering.ir import PatternIR, uses
from .binding import Bound, tensor_shapes
from ..lowering.evaluate import Env, Evaluator
from .reference import compute_dtype


def random_tensor_arguments(ir: PatternIR, sizes: dict[str, int], params: dict, *,
                            generator: torch.Generator | None = None,
                            device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Plausible random values for the pattern's tensor arguments.

    - int tensors look like packed-document ids: along the last dimension they start at 0 and
      step up by one at random boundaries (about four documents per row);
    - bool tensors are random flags (about one in four true, e.g. global tokens);
    - float tensors hold small positive values in [0.1, 1) (slopes, widths, per-head scales).
    """
    out = {}
    for name, shape in tensor_shapes(ir, sizes, params).items():
        elem = ir.tensor(name).elem
        if any(s < 0 for s in shape):
            raise ValueError(f"tensor `{name}` would have a negative shape {shape}")
        if elem == "int":
            last = shape[-1] if shape else 1
            p = min(0.5, 4.0 / max(last, 1))
            steps = torch.rand(shape, generator=generator) < p
            if shape and last > 0:
                steps[..., 0] = False
            value = torch.cumsum(steps.to(torch.int64), dim=-1) if shape else steps.to(torch.int64)
        elif elem == "bool":
            value = torch.rand(shape, generator=generator) < 0.25
        else:
            value = 0.1 + 0.9 * torch.rand(shape, generator=generator)
        out[name] = value.to(device)
    return out


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
    ev = Evaluator(Env(bound.sizes, bound.params, bound.tensors, fdtype, q.device, q0, q0 + C, B, H, Lk))
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
    ev = Evaluator(Env(sizes, bound.params, bound.tensors, fdtype, device, q0, q1, B, H, Lk))
    if score is not None:
        ev.volatile[("score", None)] = score
    keep = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    for m in ir.masks:
        keep = keep & ev.eval(m)
    return keep.expand(B, H, q1 - q0, Lk)


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
