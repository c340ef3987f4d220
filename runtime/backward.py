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
from .dispatch import (MAX_HEAD_DIM, SUPPORTED_DTYPES, Launch, Tiles, _check_backend,
                       _extra_arguments, _layout, _next_pow2, call_specialization, choose_tiles,
                       input_precision, launch_meta, layout_lists, run_launch, triton_cdiv)
from .jit import Compiled, backward_kernel


def backward_tiles(device: torch.device, head_dim: int, v_dim: int, topk: int,
                   reads_score: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[Tiles, Tiles]:
    """(dQ-pass tiles, dK/dV-pass tiles). Where a keep decision reads the score (`select topk`,
    a mask on `score`), both passes use the forward's tiles, so every score is formed by the
    same dot as in the forward and the keep sets agree bit for bit.

    The CUDA shapes are the ones without register spills (or the fewest) when compiled for sm_90
    by the Triton in use: `python bench/static.py` shows registers, spills, shared memory and
    the MMA instructions of each kernel (bench/RESULTS.md has the figures)."""
    fwd = choose_tiles(device, head_dim, v_dim, topk, dtype)
    forced = getattr(dispatch._OVERRIDE, "tiles", None) is not None
    if device.type != "cuda" or topk or reads_score or forced:
        return fwd, fwd
    d = max(head_dim, v_dim)
    if d <= 64:
        t_dq, t_kv = Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 3)
    elif d <= 128:
        t_dq, t_kv = Tiles(128, 32, 8, 3), Tiles(32, 128, 8, 3)
    else:
        t_dq, t_kv = Tiles(64, 32, 8, 2), Tiles(32, 64, 8, 2)
    if dtype.itemsize >= 4:  # as in choose_tiles: 4-byte tiles double each stage's shared memory
        t_dq, t_kv = (Tiles(t.block_m, t.block_n, t.num_warps, min(t.num_stages, 2))
                      for t in (t_dq, t_kv))
    return t_dq, t_kv


def key_major(topk: int, reads_score: bool) -> bool:
    """Whether the dK/dV pass forms its score tiles keys-first (`KEY_MAJOR` in the skeleton):
    only when no keep decision reads the score, since the transposed dot may round differently
    from the forward's and flip a decision at a tie."""
    return not (topk or reads_score)


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
    Lk, Dv = k.shape[2], v.shape[3]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got q/k {D}, v {Dv}")
    differentiable = set(differentiable_tensors(ir))
    grad_names = tuple(sorted(n for n in wrt if n in differentiable))
    spec, wide = call_specialization(ir, bound)
    compiled = backward_kernel(ir, spec, grad_names, wide)

    acc = torch.float64 if fp64 else torch.float32
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if Lq == 0 or Lk == 0 or B * H == 0:
        return dq, dk, dv, {n: torch.zeros_like(bound.tensors[n]) for n in grad_names}
    if grad_out is None:
        grad_out = torch.zeros_like(out)

    if ir.normalizer == "softmax":
        lse = lse.to(acc).contiguous()
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:  # d lse / d s = P: folds into delta
            delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(acc), torch.zeros_like(lse))
        delta = delta.contiguous()
    else:
        lse = delta = torch.zeros((B, H, Lq), dtype=acc, device=q.device)

    launches, buffers = backward_launches(compiled, ir, bound, q, k, v, grad_out, lse, delta,
                                          dq, dk, dv, grad_names, deterministic, scale, q.device)
    for L in launches:
        run_launch(compiled, L)
    grads = {}
    for n in grad_names:
        shape, dtype = bound.tensors[n].shape, bound.tensors[n].dtype
        grads[n] = (buffers[n].sum(0).view(shape) if deterministic else buffers[n]).to(dtype)
    return dq, dk, dv, grads


def backward_launches(compiled: Compiled, ir, bound: Bound, q, k, v, grad_out, lse, delta,
                      dq, dk, dv, grad_names: tuple[str, ...], deterministic: bool, scale: float,
                      target: torch.device) -> tuple[list[Launch], dict]:
    """The launches of one backward call on `target` (q's device, or CUDA for `runtime/aot.py`,
    which passes CPU tensors of the call's shapes), in order: `attn_bwd_kth` (top-k only),
    `attn_bwd_dq`, `attn_bwd_dkdv`; and {name: buffer} for the tensor-argument gradients,
    zeroed, in lse's dtype: the gradient's shape, or [programs, numel] slices to sum when
    deterministic. `lse` and `delta` are [B, H, Lq], contiguous."""
    module, topk = compiled.module, compiled.kernel.topk
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    reads_score = any(n.op == "score" for m in ir.masks for n in walk(m))
    t_dq, t_kv = backward_tiles(target, D, Dv, topk, reads_score, q.dtype)
    common = dict(BLOCK_D=max(16, _next_pow2(D)), INPUT_PRECISION=input_precision(q.dtype),
                  FP64=q.dtype == torch.float64)
    extra = _extra_arguments(compiled.kernel.arguments, bound)
    sizes = [float(scale), B, H, Hkv, Lq, Lk, D]
    stats = list(lse.stride())
    launches = []

    lay = _layout(ir, bound, Lq, Lk, t_dq, q.device)
    q_tiles = layout_lists(lay.kv_partial_num, lay.kv_partial_idx, lay.kv_full_num, lay.kv_full_idx)
    grid_dq = (triton_cdiv(Lq, t_dq.block_m), B * H)
    kth = lse
    if topk:
        kth = torch.empty((B, H, Lq), dtype=lse.dtype, device=q.device)
        args = [q, k, kth, *q.stride(), *k.stride(), *kth.stride(), *q_tiles, *sizes, *extra]
        launches.append(Launch("attn_bwd_kth", module.attn_bwd_kth, grid_dq, tuple(args),
                               launch_meta(target, t_dq, **common)))

    programs = grid_dq[0] * grid_dq[1]
    buffers = {n: torch.zeros((programs, bound.tensors[n].numel()) if deterministic
                              else bound.tensors[n].shape, dtype=lse.dtype, device=q.device)
               for n in grad_names}
    args = [q, k, v, grad_out, lse, delta, kth, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *stats,
            *q_tiles, *sizes, Dv, *extra, *(buffers[n] for n in grad_names)]
    launches.append(Launch("attn_bwd_dq", module.attn_bwd_dq, grid_dq, tuple(args),
                           launch_meta(target, t_dq, **common, BLOCK_DV=max(16, _next_pow2(Dv)),
                                       DETERMINISTIC=deterministic)))

    if t_kv != t_dq:
        lay = _layout(ir, bound, Lq, Lk, t_kv, q.device)
    args = [q, k, v, grad_out, lse, delta, kth, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *stats,
            *layout_lists(lay.q_partial_num, lay.q_partial_idx, lay.q_full_num, lay.q_full_idx),
            *sizes, Dv, *extra]
    launches.append(Launch("attn_bwd_dkdv", module.attn_bwd_dkdv,
                           (triton_cdiv(Lk, t_kv.block_n), B * Hkv), tuple(args),
                           launch_meta(target, t_kv, **common, BLOCK_DV=max(16, _next_pow2(Dv)),
                                       KEY_MAJOR=key_major(topk, reads_score))))
    return launches, buffers


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
