"""PyTorch integration: attnc attention as `torch.library` custom ops with autograd.

``attnc::attention(q, k, v, tensors, pattern, ints, floats, scale, backend, kernel_options)``
runs one call; ``attnc::attention_backward(...)`` runs the generated backward kernels.
`torch.compile` traces each as one node (their fake implementations only compute shapes). What
a call is travels in the op's own arguments, typed: `pattern` is the pattern's content digest,
`ints` and `floats` its int/bool and float parameter values in declaration order, `tensors` its
tensor arguments in declaration order, `wrt` one flag per tensor argument, `kernel_options` the
call's forced launch settings as text (`policy.KernelOptions.text`, "" for none). The digest
finds a live `Pattern` with that IR through `find`, a weak map that holds no pattern alive and
forgets a digest when its last pattern dies; the eager autograd path keeps the pattern itself
on its context.

The forward runs the chosen backend; the backward runs the generated kernels (Triton backend)
or recomputes with the reference interpreter under autograd (exact, O(chunk × k_len) memory
thanks to checkpointing).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from typing import Optional

import torch

from ..lowering.derivative import differentiable_tensors, sink_tensors
from ..lowering.ir import PatternIR
from .binding import Bound, check_requires, select_count, sizes_for
from .grad_mode import autograd_inside_op
from .paging import Pages
from .positions import Positions

_LOCK = threading.Lock()
#: content digest -> the live patterns with that IR
_LIVE: dict[str, weakref.WeakSet] = {}


def track(pattern) -> str:
    """Make `pattern` findable by its digest while it lives; returns the digest."""
    digest = pattern.digest
    with _LOCK:
        live = _LIVE.get(digest)
        if live is None:
            live = _LIVE[digest] = weakref.WeakSet()
        if pattern not in live:
            live.add(pattern)
            weakref.finalize(pattern, _forget, digest)
    return digest


def _forget(digest: str) -> None:
    with _LOCK:
        live = _LIVE.get(digest)
        if live is not None and not len(live):
            del _LIVE[digest]


def find(digest: str):
    """A live pattern with this digest."""
    with _LOCK:
        for pattern in _LIVE.get(digest, ()):
            return pattern
    raise RuntimeError(f"attnc: no live pattern has digest {digest[:16]}…; a compiled graph that "
                       f"calls a pattern must not outlive every Pattern object with that IR")


def pack_params(ir: PatternIR, params: dict) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Parameter values as the ops take them: (int and bool ones, float ones), in declaration
    order."""
    ints = tuple(int(params[p.name]) for p in ir.params if p.type in ("int", "bool"))
    floats = tuple(float(params[p.name]) for p in ir.params if p.type == "float")
    return ints, floats


def unpack_params(ir: PatternIR, ints, floats) -> dict:
    it, ft = iter(ints), iter(floats)
    out = {}
    for p in ir.params:
        if p.type == "float":
            out[p.name] = float(next(ft))
        else:
            value = int(next(it))
            out[p.name] = bool(value) if p.type == "bool" else value
    return out


def rebind(ir: PatternIR, q, k, ints, floats, tensors, positions=None,
           block_table=None) -> Bound:
    """The Bound of a call the op already checked: sizes from q and k (k a page pool when
    `block_table` is given: the logical cache's length), parameters unpacked; `positions` a
    `Positions`, or its table (an op's argument), or None."""
    pages = None
    k_shape = tuple(k.shape)
    if block_table is not None:
        pages = Pages(block_table, k.shape[2])
        k_shape = (q.shape[0], k.shape[1], pages.k_len, k.shape[3])
    sizes, params, topk = _bound_parts(ir, tuple(q.shape), k_shape, tuple(ints), tuple(floats))
    if isinstance(positions, torch.Tensor):
        positions = Positions(positions, None)
    return Bound(sizes, params, {t.name: x for t, x in zip(ir.tensors, tensors)}, topk,
                 positions, pages)


@functools.lru_cache(maxsize=256)
def _bound_parts(ir: PatternIR, q_shape, k_shape, ints, floats):
    sizes = sizes_for(q_shape, k_shape)
    params = unpack_params(ir, ints, floats)
    check_requires(ir, sizes, params)  # a traced call meets its sizes only here
    return sizes, params, select_count(ir, sizes, params)


def _table(positions: Positions | None):
    """A call's positions as an op argument: their int32 [batch, 3] table, or None."""
    return None if positions is None else positions.table


def scale_for(scale: float | None, q) -> float:
    """The scale of a call: as given, else 1/sqrt(head_dim) (1 for head_dim 0)."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0


def forward(pattern, q, k, v, bound: Bound, scale, backend, want_lse: bool = True,
            kernel_options: str = ""):
    """Run `pattern` on `backend` without autograd: (out, lse). The LSE is float32 (float64 for
    float64 inputs); zeros for sigmoid, and None when not `want_lse`."""
    ir = pattern.ir
    softmax = ir.normalizer == "softmax"
    if bound.pages is not None and backend != "triton":  # the interpreter reads the gathered cache
        k, v = bound.pages.gather(k), bound.pages.gather(v)
        bound = dataclasses.replace(bound, pages=None)
    if backend == "triton":
        from .dispatch import triton_attention
        out, lse = triton_attention(ir, q, k, v, bound, scale, softmax, kernel_options)
    else:
        from .reference import reference_attention
        out, lse = reference_attention(ir, q, k, v, bound, scale=scale,
                                       return_lse=softmax and want_lse)
    if not want_lse:
        return out, None
    if lse is None:
        lse = q.new_zeros(q.shape[:3], dtype=torch.float32)
    return out, lse.to(torch.float32) if q.dtype != torch.float64 else lse


@torch.library.custom_op("attnc::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
               pattern: str, ints: list[int], floats: list[float], scale: Optional[float],
               backend: str, kernel_options: str, positions: Optional[torch.Tensor],
               block_table: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    p = find(pattern)
    out, lse = forward(p, q, k, v, rebind(p.ir, q, k, ints, floats, tensors, positions,
                                          block_table),
                       scale_for(scale, q), backend, kernel_options=kernel_options)
    return out.contiguous(), lse.contiguous()


@_attention.register_fake
def _(q, k, v, tensors, pattern, ints, floats, scale, backend, kernel_options, positions,
      block_table):
    B, H, Lq, _ = q.shape
    out = q.new_empty((B, H, Lq, v.shape[-1]))
    lse = q.new_empty((B, H, Lq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, digest, ints, floats, scale, backend, kernel_options, positions, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.positions = positions
    ctx.pattern = find(digest)  # held here, so the backward never looks it up again
    ctx.ints, ctx.floats, ctx.scale, ctx.backend = ints, floats, scale, backend
    ctx.kernel_options = kernel_options


def _backward(ctx, grad_out, grad_lse):
    dq, dk, dv, grads = _gradients(ctx, ctx.needs_input_grad[3], grad_out, grad_lse)
    # no gradient for the digest, parameters, scale, backend, kernel options; torch's structure
    # check takes a list of numbers as one leaf (None), but an empty list as a list
    return (dq, dk, dv, grads, None, None if ctx.ints else [], None if ctx.floats else [], None,
            None, None, None, None)


def _gradients(ctx, needs, grad_out, grad_lse):
    """(dq, dk, dv, [gradient or None per tensor argument]) from a context that saved
    (q, k, v, out, lse, *tensors) and holds pattern, ints, floats, scale, backend,
    kernel_options; `needs` has one flag per tensor argument."""
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    if ctx.backend == "triton":
        return _triton_backward(ctx, needs, q, k, v, out, lse, tensors, grad_out, grad_lse)
    return _reference_backward(ctx, needs, q, k, v, tensors, grad_out, grad_lse)


def _reference_backward(ctx, needs, q, k, v, tensors, grad_out, grad_lse):
    """Autograd through the reference interpreter, behind its own custom op so that a compiled
    backward holds one opaque node whatever the lengths."""
    ir = ctx.pattern.ir
    flags = [bool(need) and t.dtype.is_floating_point for need, t in zip(needs, tensors)]
    if ir.normalizer != "softmax":
        grad_lse = None
    if grad_out is None:
        grad_out = q.new_zeros(q.shape[:3] + (v.shape[-1],))
    got = _attention_reference_backward(q, k, v, list(tensors), grad_out, grad_lse,
                                        ctx.pattern.digest, list(ctx.ints), list(ctx.floats),
                                        ctx.scale, flags, _table(ctx.positions))
    it = iter(got[3:])
    grads = [next(it) if flag else None for flag in flags]
    return got[0], got[1], got[2], grads


@torch.library.custom_op("attnc::attention_reference_backward", mutates_args=())
def _attention_reference_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  tensors: list[torch.Tensor], grad_out: torch.Tensor,
                                  grad_lse: Optional[torch.Tensor], pattern: str, ints: list[int],
                                  floats: list[float], scale: Optional[float],
                                  wrt: list[bool],
                                  positions: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[dq, dk, dv, gradient of each tensor argument flagged in `wrt`], by autograd through the
    reference interpreter (exact; O(chunk × k_len) memory thanks to its checkpointing)."""
    from .reference import reference_attention
    ir = find(pattern).ir
    with autograd_inside_op(), torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        leaves += [t.detach().requires_grad_(flag) for t, flag in zip(tensors, wrt)]
        bound = rebind(ir, q, k, ints, floats, leaves[3:], positions)
        want_lse = grad_lse is not None
        out, lse = reference_attention(ir, *leaves[:3], bound, scale=scale_for(scale, q),
                                       return_lse=want_lse)
        outputs, grads = [out], [grad_out]
        if want_lse:
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
            grads.append(torch.where(finite, grad_lse.to(lse.dtype), torch.zeros_like(lse)))
        wrt_leaves = [t for t in leaves if t.requires_grad]
        # an output the pattern cut off from every input (e.g. through `floor(score)`) has no graph
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt_leaves, [g for _, g in pairs],
                                  allow_unused=True) if pairs else [None] * len(wrt_leaves)
    # contiguous, as the fake says: autograd's gradient layout varies with the graph
    return [t.new_zeros(t.shape) if g is None else g.contiguous() for g, t in zip(got, wrt_leaves)]


@_attention_reference_backward.register_fake
def _(q, k, v, tensors, grad_out, grad_lse, pattern, ints, floats, scale, wrt, positions):
    return [t.new_empty(t.shape) for t in (q, k, v)] + [
        t.new_empty(t.shape) for t, flag in zip(tensors, wrt) if flag]


def _triton_backward(ctx, needs, q, k, v, out, lse, tensors, grad_out, grad_lse):
    """The generated backward kernels, through the backward custom op."""
    ir = ctx.pattern.ir
    usable = set(differentiable_tensors(ir)) | set(sink_tensors(ir))
    wrt = [t.name for t, need in zip(ir.tensors, needs) if need and t.name in usable]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if ir.normalizer != "softmax":
        grad_lse = None
    flags = [t.name in wrt for t in ir.tensors]
    got = _attention_backward(q, k, v, out, lse, grad_out.contiguous(), grad_lse, list(tensors),
                              ctx.pattern.digest, list(ctx.ints), list(ctx.floats), ctx.scale,
                              flags, ctx.kernel_options, _table(ctx.positions))
    by_name = dict(zip(wrt, got[3:]))
    grads = [by_name[t.name] if t.name in by_name else (torch.zeros_like(x) if need else None)
             for t, x, need in zip(ir.tensors, tensors, needs)]
    return got[0], got[1], got[2], grads


_attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                        tensors: list[torch.Tensor], pattern: str, ints: list[int],
                        floats: list[float], scale: Optional[float],
                        wrt: list[bool], kernel_options: str,
                        positions: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[dq, dk, dv, gradient of each tensor argument flagged in `wrt`, in declaration order]."""
    from .backward import triton_attention_backward
    ir = find(pattern).ir
    bound = rebind(ir, q, k, ints, floats, tensors, positions)
    wrt = tuple(t.name for t, flag in zip(ir.tensors, wrt) if flag)
    dq, dk, dv, grads = triton_attention_backward(ir, q, k, v, out, lse, grad_out, grad_lse,
                                                  bound, scale_for(scale, q), wrt,
                                                  options=kernel_options)
    return [dq, dk, dv] + [grads[n] if n in grads else torch.zeros_like(bound.tensors[n])
                           for n in wrt]


@_attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, tensors, pattern, ints, floats, scale, wrt,
      kernel_options, positions):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + [
        torch.empty_like(t) for t, flag in zip(tensors, wrt) if flag]


class _EagerAttention(torch.autograd.Function):
    """The custom op's autograd without the custom op: what an eager call with gradients runs
    (torch's custom-op dispatch costs about 100 µs of Python per call; this, a few)."""

    @staticmethod
    def forward(ctx, pattern, bound, ints, floats, scale, backend, kernel_options, q, k, v,
                *tensors):
        out, lse = forward(pattern, q, k, v, bound, scale, backend, kernel_options=kernel_options)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.positions = bound.positions
        ctx.pattern, ctx.ints, ctx.floats, ctx.scale, ctx.backend = (pattern, ints, floats,
                                                                     scale, backend)
        ctx.kernel_options = kernel_options
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        dq, dk, dv, grads = _gradients(ctx, ctx.needs_input_grad[10:], grad_out, grad_lse)
        return (None,) * 7 + (dq, dk, dv, *grads)


def attention_op(pattern, q, k, v, tensors: list, ints, floats, scale: float | None,
                 backend: str, bound: Bound | None = None, kernel_options: str = "",
                 positions: Positions | None = None, pages: Pages | None = None):
    """Run `pattern` (`track`ed) with autograd; returns (out, lse) (lse zeros for sigmoid).
    `tensors` are its tensor arguments in declaration order. Traced by torch.compile, it is the
    custom op; eagerly, the same forward and backward without the op's dispatch. A `scale`
    of None is 1/sqrt(head_dim), resolved inside the op (so a dynamic head_dim stays dynamic).
    `kernel_options`: `KernelOptions.text` of the call's options ("" for none); `positions`
    the call's (`bound.positions` when a bound is given), `pages` a paged call's block table
    (traced calls only: an eager paged call runs `forward` directly)."""
    if torch.compiler.is_compiling():
        return _attention(q, k, v, list(tensors), pattern.digest, list(ints), list(floats),
                          None if scale is None else float(scale), backend, kernel_options,
                          _table(positions), None if pages is None else pages.table)
    scale = scale_for(scale, q)
    if bound is None:
        bound = rebind(pattern.ir, q, k, ints, floats, tensors, positions)
    return _EagerAttention.apply(pattern, bound, tuple(ints), tuple(floats), float(scale),
                                 backend, kernel_options, q, k, v, *tensors)
