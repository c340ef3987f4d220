"""Launch of the generated backward kernels (FlashAttention-2 recomputation from the saved LSE).

`triton_attention_backward` runs, for one bound call of a pattern:
  1. `attn_bwd_kth` (only for `select topk`): each row's keep threshold, with the forward's tiles;
  2. `attn_bwd_dq` over the layout's key tiles per query tile: dQ and the gradients of float
     tensor arguments (fp32 atomics, or program-private slices summed by torch when
     deterministic);
  3. `attn_bwd_dkdv` over the transposed layout per key tile: dK and dV, summed over the query
     heads of a GQA group inside the program (no atomics).
`delta = rowsum(dO ∘ O) − dLSE` is formed with torch. Deterministic mode (no atomics anywhere)
is on when `deterministic=True` or `torch.are_deterministic_algorithms_enabled()`.

`attnc::attention_backward` wraps it as a custom op (with a fake implementation), so the
backward of a compiled graph stays one node too.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..lowering.derivative import differentiable_tensors
from ..lowering.ir import walk
from . import dispatch
from .binding import Bound
from .dispatch import (MAX_HEAD_DIM, SUPPORTED_DTYPES, Tiles, _check_backend, _extra_arguments,
                       _next_pow2, _strides, choose_tiles, launch, triton_cdiv)
from .jit import backward_kernel

def backward_tiles(device: torch.device, head_dim: int, v_dim: int, topk: int,
                   reads_score: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[Tiles, Tiles]:
    """(dQ-pass tiles, dK/dV-pass tiles). Where a keep decision reads the score (`select topk`,
    a mask on `score`), both passes use the forward's tiles, so every score is formed by the
    same dot as in the forward and the keep sets agree bit for bit."""
    fwd = choose_tiles(device, head_dim, v_dim, topk, dtype)
    forced = getattr(dispatch._OVERRIDE, "tiles", None) is not None
    if device.type != "cuda" or topk or reads_score or forced:
        return fwd, fwd
    d = max(head_dim, v_dim)
    if d <= 128:
        return Tiles(128, 32, 4, 3), Tiles(32, 128, 4, 3)
    return Tiles(64, 32, 4, 2), Tiles(32, 64, 4, 2)


def _layout(ir, bound, q_len, k_len, tiles: Tiles, device):
    from .layout import build_layout
    return build_layout(ir, bound, q_len, k_len, tiles.block_m, tiles.block_n, device)


def _lists(num_p, idx_p, num_f, idx_f) -> list:
    if num_p.stride() != num_f.stride() or idx_p.stride() != idx_f.stride():
        num_p, idx_p, num_f, idx_f = (t.contiguous() for t in (num_p, idx_p, num_f, idx_f))
    return [num_p, idx_p, num_f, idx_f, *_strides(num_p, 3), *_strides(idx_p, 4)]


def triton_attention_backward(pattern, q, k, v, out, lse, grad_out, grad_lse, bound: Bound,
                              scale: float, wrt=(), deterministic: bool | None = None):
    """Gradients of one attention call. q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv]; `out` and
    `lse` are the forward's outputs (lse ignored for sigmoid); `grad_lse` may be None.

    Returns (dq, dk, dv, {name: gradient}) for the float tensor arguments named in `wrt` (those
    the score does not read get zeros). fp64 inputs are accepted under the interpreter only."""
    _check_backend(q)
    fp64 = q.dtype == torch.float64
    if not (q.dtype in SUPPORTED_DTYPES or (fp64 and q.device.type == "cpu")):
        raise ValueError(f"the Triton backward supports float16, bfloat16 and float32 inputs, got {q.dtype}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    ir = pattern.ir
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got q/k {D}, v {Dv}")
    differentiable = set(differentiable_tensors(ir))
    grad_names = tuple(sorted(n for n in wrt if n in differentiable))
    spec = {p.name: bound.params[p.name] for p in ir.params if p.type in ("int", "bool")}
    compiled = backward_kernel(ir, spec, grad_names)
    kernel, module = compiled.kernel, compiled.module
    topk = kernel.topk

    acc = torch.float64 if fp64 else torch.float32
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grads = {n: torch.zeros(bound.tensors[n].shape, dtype=acc, device=q.device) for n in grad_names}
    result = lambda: (dq, dk, dv, {n: g.to(bound.tensors[n].dtype) for n, g in grads.items()})
    if Lq == 0 or Lk == 0 or B * H == 0:
        return result()
    if grad_out is None:
        grad_out = torch.zeros_like(out)

    softmax = ir.normalizer == "softmax"
    if softmax:
        lse = lse.to(acc).contiguous()
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:  # d lse / d s = P: folds into delta
            delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(acc), torch.zeros_like(lse))
        delta = delta.contiguous()
    else:
        lse = delta = torch.zeros((B, H, Lq), dtype=acc, device=q.device)
    stat_strides = list(lse.stride())

    reads_score = any(n.op == "score" for m in ir.masks for n in walk(m))
    t_dq, t_kv = backward_tiles(q.device, D, Dv, topk, reads_score, q.dtype)
    common = dict(BLOCK_D=max(16, _next_pow2(D)),
                  INPUT_PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
                  FP64=fp64)
    extra = _extra_arguments(kernel.arguments, bound)
    sizes = [float(scale), B, H, Hkv, Lq, Lk, D]

    kth = lse
    lay_dq = _layout(ir, bound, Lq, Lk, t_dq, q.device)
    if topk:
        kth = torch.empty((B, H, Lq), dtype=acc, device=q.device)
        args = [q, k, kth, *q.stride(), *k.stride(), *kth.stride(),
                *_lists(lay_dq.kv_partial_num, lay_dq.kv_partial_idx, lay_dq.kv_full_num,
                        lay_dq.kv_full_idx), *sizes, *extra]
        launch(compiled, module.attn_bwd_kth, (triton_cdiv(Lq, t_dq.block_m), B * H), args,
                dict(common, BLOCK_M=t_dq.block_m, BLOCK_N=t_dq.block_n), t_dq, q.device)

    grid_dq = (triton_cdiv(Lq, t_dq.block_m), B * H)
    programs = grid_dq[0] * grid_dq[1]
    buffers = {}
    for n in grad_names:
        numel = bound.tensors[n].numel()
        buffers[n] = (torch.zeros((programs, numel), dtype=acc, device=q.device) if deterministic
                      else grads[n])
    meta = dict(common, BLOCK_DV=max(16, _next_pow2(Dv)))
    args = [q, k, v, grad_out, lse, delta, kth, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *stat_strides,
            *_lists(lay_dq.kv_partial_num, lay_dq.kv_partial_idx, lay_dq.kv_full_num,
                    lay_dq.kv_full_idx), *sizes, Dv, *extra, *(buffers[n] for n in grad_names)]
    launch(compiled, module.attn_bwd_dq, grid_dq, args,
            dict(meta, BLOCK_M=t_dq.block_m, BLOCK_N=t_dq.block_n, DETERMINISTIC=deterministic),
            t_dq, q.device)
    if deterministic:
        for n in grad_names:
            grads[n] = buffers[n].sum(0).view(bound.tensors[n].shape)

    lay_kv = lay_dq if t_kv == t_dq else _layout(ir, bound, Lq, Lk, t_kv, q.device)
    args = [q, k, v, grad_out, lse, delta, kth, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *stat_strides,
            *_lists(lay_kv.q_partial_num, lay_kv.q_partial_idx, lay_kv.q_full_num,
                    lay_kv.q_full_idx), *sizes, Dv, *extra]
    launch(compiled, module.attn_bwd_dkdv, (triton_cdiv(Lk, t_kv.block_n), B * Hkv), args,
            dict(meta, BLOCK_M=t_kv.block_m, BLOCK_N=t_kv.block_n), t_kv, q.device)
    return result()


# ------------------------------------------------------------------ the custom op


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                        tensors: list[torch.Tensor], key: str, scale: float,
                        wrt: str) -> list[torch.Tensor]:
    from .autograd import _PATTERNS
    from .binding import sizes_for
    pattern, params, names = _PATTERNS[key]
    bound = Bound(sizes_for(q.shape, k.shape), params, dict(zip(names, tensors)))
    want = [n for n in wrt.split(",") if n]
    dq, dk, dv, grads = triton_attention_backward(pattern, q, k, v, out, lse, grad_out, grad_lse,
                                                  bound, scale, want)
    return [dq, dk, dv] + [grads[n] if n in grads else torch.zeros_like(t)
                           for n, t in zip(names, tensors) if n in want]


@_attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, tensors, key, scale, wrt):
    want = [n for n in wrt.split(",") if n]
    from .autograd import _PATTERNS
    names = _PATTERNS[key][2]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + [
        torch.empty_like(t) for n, t in zip(names, tensors) if n in want]


def attention_backward_op(q, k, v, out, lse, grad_out, grad_lse, tensors, key: str, scale: float,
                          wrt: list[str]):
    """The custom op: [dq, dk, dv, gradient of each tensor named in `wrt`, in `tensors` order]."""
    return _attention_backward(q, k, v, out, lse, grad_out, grad_lse, list(tensors), key, scale,
                               ",".join(wrt))
