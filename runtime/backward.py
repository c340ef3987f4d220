"""Launch of the generated backward kernels (FlashAttention-2 recomputation from the saved LSE).

`triton_attention_backward` runs, for one bound call of a pattern:
  1. `attn_kth` (only for `select topk`): each row's keep threshold, with the forward's tiles;
  2. `attn_bwd_dq` over the layout's key tiles per query tile: dQ and the gradients of float
     tensor arguments (fp32 atomics, or program-private slices summed by torch when
     deterministic);
  3. `attn_bwd_dkdv` over the transposed layout per key tile: dK and dV, summed over the query
     heads of a GQA group inside the program (no atomics).
`delta = rowsum(dO ∘ O) − dLSE` is formed with torch. Deterministic mode (no atomics anywhere)
is on when `deterministic=True` or `torch.are_deterministic_algorithms_enabled()`.
"""
from __future__ import annotations

import torch

from ..lowering.derivative import differentiable_tensors, sink_tensors
from .binding import Bound, broadcast_kv
from .dispatch import call_sizes, call_specialization, check_backend, check_head_dims, layouts
from .grad_mode import autograd_inside_op
from .jit import Compiled, backward_kernel
from .launch import Call, Launch, grid, launch, run_launch
from .policy import SUPPORTED_DTYPES, KernelOptions, Target, config_for, forced_configs
from .tune import chosen, configure


def triton_attention_backward(ir, q, k, v, out, lse, grad_out, grad_lse, bound: Bound,
                              scale: float, wrt=(), deterministic: bool | None = None,
                              options: str = ""):
    """Gradients of one attention call of the pattern `ir`. q [B,H,Lq,D], k [B,Hkv,Lk,D],
    v [B,Hkv,Lk,Dv]; `out` and `lse` are the forward's outputs (lse ignored for sigmoid);
    `grad_lse` may be None; `options` the call's kernel options (`KernelOptions.text`).

    Returns (dq, dk, dv, {name: gradient}) for the float tensor arguments named in `wrt` (those
    the score does not read get zeros). fp64 inputs are accepted under the interpreter only."""
    fp64 = q.dtype == torch.float64 and q.device.type == "cpu"
    check_backend(q.device, q.dtype, SUPPORTED_DTYPES + ((torch.float64,) if fp64 else ()))
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    check_head_dims(D, Dv)
    differentiable = set(differentiable_tensors(ir))
    grad_names = tuple(sorted(n for n in wrt if n in differentiable))
    spec, wide, positions = call_specialization(ir, bound)
    compiled = backward_kernel(ir, spec, grad_names, wide, positions)

    acc = torch.float64 if fp64 else torch.float32
    shared = k.shape[0] != B  # k and v of batch 1 serve every query batch: sum their gradients
    k, v = broadcast_kv(q, k, v)
    dq = torch.zeros_like(q)
    dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    grads = {n: torch.zeros_like(bound.tensors[n]) for n in grad_names}
    if Lq == 0 or B * H == 0:
        return (dq, *_home(dk, dv, shared), grads)
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

    if Lk > 0:
        launches, buffers = backward_launches(compiled, ir, bound, q, k, v, grad_out, lse, delta,
                                              dq, dk, dv, deterministic, scale, Target.of(q.device),
                                              KernelOptions.parse(options))
        for L in launches:
            run_launch(compiled, L)
        for n in grad_names:
            shape, dtype = bound.tensors[n].shape, bound.tensors[n].dtype
            grads[n] = (buffers[n].sum(0).view(shape) if deterministic else buffers[n]).to(dtype)
    sink_names = [n for n in wrt if n in sink_tensors(ir)]
    if sink_names:  # the sink's share of each row, formed here (the kernels see only keys)
        for n, g in sink_gradients(ir, bound, lse, delta, sink_names, (B, H, Lq, Lk)).items():
            g = g.to(bound.tensors[n].dtype)
            grads[n] = grads[n] + g if n in grads else g
    return (dq, *_home(dk, dv, shared), grads)


def _home(dk, dv, shared: bool):
    """dK and dV at the shape of the k and v given: summed over the query batch when one k and
    v (batch 1) served them all."""
    return (dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)) if shared else (dk, dv)


def sink_gradients(ir, bound: Bound, lse, delta, names, shape) -> dict:
    """Gradients of the tensors `names` that the softmax sink reads. The sink's probability in
    row i is exp(sink_i − lse_i), and dL/dsink_i = −exp(sink_i − lse_i) · delta_i (delta already
    holds −dLSE); autograd through the sink's rows takes it to the tensors."""
    from .reference import sink_logits
    leaves = {n: bound.tensors[n].detach().to(lse.dtype).requires_grad_() for n in names}
    with autograd_inside_op():
        sink = sink_logits(ir, bound, {**bound.tensors, **leaves}, lse.dtype, shape, lse.device)
        live = torch.isfinite(lse) & torch.isfinite(sink)
        p = torch.where(live, torch.exp(torch.where(live, sink - lse, 0.0)), 0.0)
        got = torch.autograd.grad(sink, list(leaves.values()), -(p * delta).detach(),
                                  allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, got)}


def backward_launches(compiled: Compiled, ir, bound: Bound, q, k, v, grad_out, lse, delta,
                      dq, dk, dv, deterministic: bool, scale: float, target: Target,
                      options: KernelOptions | None = None) -> tuple[list[Launch], dict]:
    """The launches of one backward call on `target` (q's device, or a GPU for `runtime/aot.py`,
    which passes CPU tensors of the call's shapes), in order: `attn_kth` (top-k only),
    `attn_bwd_dq`, `attn_bwd_dkdv`; and {name: buffer} for the gradients of the module's
    tensor arguments (`Kernel.grads`), zeroed, in lse's dtype: the gradient's shape, or
    [programs, numel] slices to sum when deterministic. `lse` and `delta` are [B, H, Lq],
    contiguous. `options`: the call's kernel options."""
    kernel = compiled.kernel
    D, Dv = q.shape[3], v.shape[3]
    forced = forced_configs(options, target, D, Dv, q.dtype, kernel.constraints) if options else {}
    kth = torch.empty_like(lse) if kernel.topk else None
    call = Call(dict(q=q, k=k, v=v, do=grad_out, lse=lse, delta=delta, kth=kth, dq=dq, dk=dk, dv=dv,
                     pos=None if bound.positions is None else bound.positions.table),
                call_sizes(bound, v), scale, bound)

    def bind(name: str, **facts) -> Launch:
        layout_for = layouts(ir, bound, q, k, kernel.signature(name))
        cfg = configure(compiled, name, target, call, layout_for,
                        forced=forced.get(kernel.signature(name).config), **facts)
        return launch(compiled, name, call, cfg, target, layout_for(cfg), **facts)

    launches = [bind("attn_kth")] if kernel.topk else []
    # gradient buffers first (a tuning run of dQ times scratch copies of them)
    # sized by the configuration dQ launches with when deterministic (see `tune.configure`)
    dq_sig = kernel.signature("attn_bwd_dq")
    dq_cfg = (forced.get(dq_sig.config)
              or chosen(kernel.pattern_key, dq_sig.config, target, D, Dv, q.dtype, q.device,
                        kernel.constraints)
              or config_for(dq_sig.config, target, D, Dv, q.dtype, kernel.constraints))
    tiles_m, heads = grid(dq_sig, dq_cfg, call)
    programs = tiles_m * heads  # one gradient slice per dQ program when deterministic
    buffers = {n: torch.zeros((programs, bound.tensors[n].numel()) if deterministic
                              else bound.tensors[n].shape, dtype=lse.dtype, device=q.device)
               for n in kernel.grads}
    call.grads.update(buffers)
    launches.append(bind("attn_bwd_dq", DETERMINISTIC=deterministic))
    launches.append(bind("attn_bwd_dkdv"))
    return launches, buffers
