"""The reference interpreter: the definition of what every pattern means.

It evaluates a pattern's IR with dense PyTorch, one chunk of query rows at a time, so memory is
O(chunk × k_len) however long the sequence. Semantics (see docs/language.md):

1. ``s = (Q Kᵀ) * scale`` in fp32 (fp64 for fp64 inputs).
2. Score statements in order; then all masks (AND-ed).
3. ``select topk(n)``: keep allowed keys whose score is ≥ the n-th largest allowed score.
4. Softmax over kept keys (an empty row gives output 0 and LSE −inf); a `sink` adds exp(sink)
   to each row's denominator (an empty row then gives LSE = sink). Or sigmoid(s + bias).
5. ``out = P V``.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..lowering.evaluate import Env, Evaluator
from ..lowering.ir import PatternIR
from .binding import Bound, broadcast_kv

#: elements of one [B, H, chunk, k_len] score block; bounds the interpreter's memory
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sink_logits(ir: PatternIR, bound: Bound, tensors: dict, dtype: torch.dtype, shape,
                device) -> torch.Tensor:
    """The softmax sink of every row, [B, H, Lq] for `shape` (B, H, Lq, Lk), in `dtype`
    (differentiable in `tensors`)."""
    B, H, Lq, Lk = shape
    tensors = Bound(bound.sizes, bound.params, tensors).expanded(ir)
    env = Env(bound.sizes, bound.params, tensors, dtype, device, 0, Lq, B, H, Lk,
              _table(bound))
    sink = torch.as_tensor(Evaluator(env).eval(ir.sink), dtype=dtype, device=device)
    return sink.expand(B, H, Lq, 1).squeeze(-1)


def _table(bound: Bound):
    """The call's per-batch (q_start, k_start, k_len), or None."""
    return None if bound.positions is None else bound.positions.table


def _allowed(ir, q_chunk, k, bound: Bound, tensors, scale, q0):
    """One chunk of query rows' final scores [B, H, C, Lk] (fp32/fp64), which keys the masks
    allow (before `select topk`), and the evaluator (for the normalizer's expressions)."""
    B, H, C, _ = q_chunk.shape
    Lk = k.shape[2]
    fdtype = compute_dtype(q_chunk.dtype)
    env = Env(bound.sizes, bound.params, tensors, fdtype, q_chunk.device, q0, q0 + C, B, H, Lk,
              _table(bound))
    ev = Evaluator(env)
    s = torch.matmul(q_chunk.to(fdtype), k.to(fdtype).transpose(-1, -2)) * scale
    for stmt in ir.scores:
        ev.volatile[("score", None)] = s
        ev.local = {}
        s = ev.eval(stmt).expand(B, H, C, Lk)
    ev.volatile[("score", None)] = s
    ev.local = {}
    keep = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=s.device)
    if bound.positions is not None:  # keys past the sequence's k_len are never attended
        keep = torch.arange(Lk, device=s.device).view(1, 1, 1, Lk) < env.per_batch["k_len"]
    for m in ir.masks:
        keep = keep & ev.eval(m)
    return s, keep.expand(B, H, C, Lk), ev


def _chunk_rows(ir, q_chunk, k, v, bound: Bound, tensors, scale, q0, want_lse):
    B, H, C, _ = q_chunk.shape
    Lk = k.shape[2]
    fdtype = compute_dtype(q_chunk.dtype)
    s, keep, ev = _allowed(ir, q_chunk, k, bound, tensors, scale, q0)
    if bound.topk is not None:
        n = bound.topk
        masked = torch.where(keep, s, torch.full_like(s, float("-inf")))
        kth = torch.topk(masked, min(n, Lk), dim=-1).values[..., -1:]
        keep = keep & (s >= kth)
    vv = v.to(fdtype)
    if ir.normalizer == "sigmoid":
        bias = ev.eval(ir.bias) if ir.bias is not None else 0.0
        p = torch.where(keep, torch.sigmoid(s + bias), torch.zeros_like(s))
        return torch.matmul(p, vv), None
    neg_inf = torch.full_like(s, float("-inf"))
    sm = torch.where(keep, s, neg_inf)
    m = sm.amax(dim=-1, keepdim=True) if Lk else s.new_full((B, H, C, 1), float("-inf"))
    sink = None
    if ir.sink is not None:  # one more logit per row, in the denominator only
        sink = torch.as_tensor(ev.eval(ir.sink), dtype=fdtype, device=s.device).expand(B, H, C, 1)
        m = torch.maximum(m, sink)
    finite = torch.isfinite(m)
    m_safe = torch.where(finite, m, torch.zeros_like(m)).detach()
    p = torch.exp(sm - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    if sink is not None:
        l = l + torch.exp(sink - m_safe)
    nonempty = l > 0
    l_safe = torch.where(nonempty, l, torch.ones_like(l))
    out = torch.matmul(p, vv) / l_safe
    lse = None
    if want_lse:
        lse = torch.where(nonempty, m_safe + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)
    return out, lse


def reference_attention(ir: PatternIR, q, k, v, bound: Bound, *, scale: float,
                        return_lse: bool = False, chunk: int | None = None):
    """Dense evaluation of a bound pattern. q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv];
    `bound` holds the call's sizes, parameter values, tensors and top-k count.

    Returns (out [B,H,Lq,Dv] in q's dtype, lse [B,H,Lq] in fp32/fp64 or None)."""
    B, H, Lq, _ = q.shape
    k, v = _per_head(q, k, v)
    Lk = k.shape[2]
    if chunk is None:
        chunk = _rows_per_chunk(B, H, Lk)
    tensors = bound.expanded(ir)  # size-1 broadcast dims as views of the declared shapes
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in [q, k, v, *tensors.values()] if isinstance(t, torch.Tensor))
    outs, lses = [], []
    for q0 in range(0, Lq, chunk):
        qc = q[:, :, q0:q0 + chunk]
        if grad and Lq > chunk:
            def run(qc, k, v, *tvals, q0=q0):
                tt = dict(zip(tensors.keys(), tvals))
                o, l = _chunk_rows(ir, qc, k, v, bound, tt, scale, q0, return_lse)
                return (o, l) if l is not None else (o,)
            res = checkpoint(run, qc, k, v, *tensors.values(), use_reentrant=False)
            o, l = res[0], (res[1] if return_lse else None)
        else:
            o, l = _chunk_rows(ir, qc, k, v, bound, tensors, scale, q0, return_lse)
        outs.append(o)
        lses.append(l)
    Dv = v.shape[-1]
    out = torch.cat(outs, dim=2) if outs else q.new_zeros((B, H, 0, Dv))
    out = out.to(q.dtype)
    lse = None
    if return_lse:
        lse = torch.cat(lses, dim=2) if lses else q.new_zeros((B, H, 0), dtype=compute_dtype(q.dtype))
    return out, lse


def _per_head(q, k, v):
    """k and v with one head per query head (batch broadcast, grouped-query heads repeated)."""
    k, v = broadcast_kv(q, k, v)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return k, v


def _rows_per_chunk(B: int, H: int, Lk: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, B * H * max(Lk, 1)))


@torch.no_grad()
def allowed_scores(ir: PatternIR, q, k, bound: Bound, *, scale: float):
    """The final scores of the keys the masks allow, -inf elsewhere (before `select topk`):
    yields (q0, [B, H, rows, k_len] in fp32/fp64) for each chunk of query rows, without
    gradients. `bound` as for `reference_attention` (its positions place the rows)."""
    B, H, Lq, _ = q.shape
    k, _ = _per_head(q, k, k)
    chunk = _rows_per_chunk(B, H, k.shape[2])
    tensors = bound.expanded(ir)
    for q0 in range(0, Lq, chunk):
        s, keep, _ = _allowed(ir, q[:, :, q0:q0 + chunk], k, bound, tensors, scale, q0)
        yield q0, torch.where(keep, s, torch.full_like(s, float("-inf")))
