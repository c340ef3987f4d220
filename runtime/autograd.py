"""PyTorch integration: attnc attention as a `torch.library` custom op with autograd.

`attention_op(pattern, q, k, v, bound, scale, backend)` calls the op ``attnc::attention``, which
`torch.compile(fullgraph=True)` traces as one node (its fake implementation only computes
shapes). The forward runs the chosen backend; the backward recomputes with the reference
interpreter under autograd (exact, O(chunk × k_len) memory thanks to checkpointing) unless the
backend provides its own backward.
"""
from __future__ import annotations

import json
import threading

import torch

from .binding import Bound

_LOCK = threading.Lock()
#: key -> (pattern, parameter values, tensor argument names in op order)
_PATTERNS: dict[str, tuple[object, dict, list[str]]] = {}


def _key(pattern, bound: Bound) -> str:
    digest = pattern.digest[:16]
    params = json.dumps(sorted(bound.params.items()), default=repr)
    return f"{pattern.ir.name}:{digest}:{params}"


def register(pattern, bound: Bound) -> tuple[str, list[str]]:
    key = _key(pattern, bound)
    names = sorted(bound.tensors)
    with _LOCK:
        _PATTERNS.setdefault(key, (pattern, dict(bound.params), names))
    return key, names


def _forward(key, q, k, v, tensors, scale, backend):
    pattern, params, names = _PATTERNS[key]
    from .binding import sizes_for
    bound = Bound(sizes_for(q.shape, k.shape), params, dict(zip(names, tensors)))
    if backend == "triton":
        from .dispatch import triton_attention
        out, lse = triton_attention(pattern, q, k, v, bound, scale, pattern.ir.normalizer == "softmax")
    else:
        from .reference import reference_attention
        out, lse = reference_attention(pattern.ir, q, k, v, scale=scale, sizes=bound.sizes, params=params,
                                       tensors=bound.tensors, return_lse=pattern.ir.normalizer == "softmax")
    if lse is None:
        lse = q.new_zeros(q.shape[:3], dtype=torch.float32)
    return out, lse.to(torch.float32) if q.dtype != torch.float64 else lse


@torch.library.custom_op("attnc::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
               key: str, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward(key, q, k, v, tensors, scale, backend)
    return out.contiguous(), lse.contiguous()


@_attention.register_fake
def _(q, k, v, tensors, key, scale, backend):
    B, H, Lq, _ = q.shape
    out = q.new_empty((B, H, Lq, v.shape[-1]))
    lse = q.new_empty((B, H, Lq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, key, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.key, ctx.scale, ctx.backend = key, scale, backend
    ctx.n_tensors = len(tensors)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    pattern, params, names = _PATTERNS[ctx.key]
    if ctx.backend == "triton":
        return _triton_backward(ctx, q, k, v, out, lse, tensors, grad_out, grad_lse)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.dtype.is_floating_point) for t in (q, k, v, *tensors)]
        from .binding import sizes_for
        from .reference import reference_attention
        want_lse = pattern.ir.normalizer == "softmax"
        out, lse = reference_attention(pattern.ir, *leaves[:3], scale=ctx.scale,
                                       sizes=sizes_for(q.shape, k.shape), params=params,
                                       tensors=dict(zip(names, leaves[3:])), return_lse=want_lse)
        outputs, grads = [out], [grad_out]
        if want_lse and grad_lse is not None:
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
            grads.append(torch.where(finite, grad_lse.to(lse.dtype), torch.zeros_like(lse)))
        wrt = [t for t in leaves if t.requires_grad]
        # an output the pattern cut off from every input (e.g. through `floor(score)`) has no graph
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                  allow_unused=True) if pairs else [None] * len(wrt)
    it = iter(got)
    result = [next(it) if t.requires_grad else None for t in leaves]
    result = [torch.zeros_like(t) if g is None and t.requires_grad else g for g, t in zip(result, leaves)]
    return result[0], result[1], result[2], result[3:], None, None, None


def _triton_backward(ctx, q, k, v, out, lse, tensors, grad_out, grad_lse):
    """The generated backward kernels (runtime.backward) for a forward that ran them too."""
    from ..lowering.derivative import differentiable_tensors
    from .backward import attention_backward_op
    pattern, _, names = _PATTERNS[ctx.key]
    usable = set(differentiable_tensors(pattern.ir))
    needs = ctx.needs_input_grad[3]  # one flag per tensor of the list
    wrt = [n for n, t, need in zip(names, tensors, needs) if need and n in usable]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if pattern.ir.normalizer != "softmax":
        grad_lse = None
    got = attention_backward_op(q, k, v, out, lse, grad_out.contiguous(), grad_lse, tensors, ctx.key,
                                ctx.scale, wrt)
    by_name = dict(zip(wrt, got[3:]))
    grads = [by_name[n] if n in by_name else (torch.zeros_like(t) if need else None)
             for n, t, need in zip(names, tensors, needs)]
    return got[0], got[1], got[2], grads, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def run_op(q, k, v, tensors: list, key: str, scale: float, backend: str):
    """Call the custom op for a pattern `register`ed under `key`; returns (out, lse)."""
    return _attention(q, k, v, tensors, key, scale, backend)


def attention_op(pattern, q, k, v, bound: Bound, scale: float, backend: str):
    """Run `pattern` with an already bound call; returns (out, lse) (lse zeros for sigmoid)."""
    key, names = register(pattern, bound)
    return _attention(q, k, v, [bound.tensors[n] for n in names], key, float(scale), backend)
