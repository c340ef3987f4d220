"""Compile generated kernels for a GPU target without a GPU (ahead of time).

`forward_launches` / `backward_launches` build the launches the CUDA backend would make for one
call — the generated kernel, its arguments as `runtime/dispatch.py` and `runtime/backward.py`
pass them (CPU tensors of the call's shapes and dtypes stand in for the CUDA ones), the
constexprs and the CUDA tile shapes, warps and stages. `compile_launch` specializes a launch the
way Triton's JIT would (pointer alignment, ints equal to 1 or divisible by 16, None arguments)
and runs Triton's whole NVIDIA pipeline for a `GPUTarget`: TTIR, TTGIR, LLVM IR, PTX, and a
cubin from the `ptxas` shipped with Triton. Only the device-dependent last steps are left out:
loading the cubin (registers per thread are known only then) and running it.

The process must not run under Triton's interpreter: the generated modules read
TRITON_INTERPRET when imported and would compile their interpreter branches instead of the GPU
ones. `compile_launch` refuses to run with TRITON_INTERPRET=1.

Uses two Triton internals that have kept their shape from 3.6 to 3.9 (the supported range):
`create_function_from_signature` (the JIT's argument binder) and `JITFunction._pack_args`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..lowering.derivative import differentiable_tensors
from ..lowering.ir import walk
from .backward import _lists, backward_tiles
from .binding import Bound
from .dispatch import Tiles, _extra_arguments, _next_pow2, choose_tiles
from .jit import backward_kernel, forward_kernel
from .layout import build_layout

#: the largest shared memory one block may use (opt-in), in bytes, by compute capability
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

_CUDA = torch.device("cuda")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the JIT function, its positional arguments and keyword constexprs
    (num_warps / num_stages included)."""

    name: str
    fn: object
    args: tuple
    meta: dict = field(hash=False)


def _qkv(shape: dict, dtype: torch.dtype):
    B, H, Hkv = shape["batch"], shape["heads"], shape["kv_heads"]
    Lq, Lk, D, Dv = shape["q_len"], shape["k_len"], shape["head_dim"], shape["v_dim"]
    return (torch.empty((B, H, Lq, D), dtype=dtype), torch.empty((B, Hkv, Lk, D), dtype=dtype),
            torch.empty((B, Hkv, Lk, Dv), dtype=dtype))


def _meta(tiles: Tiles, **constexprs) -> dict:
    return dict(constexprs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_launches(pattern, shape: dict, dtype: torch.dtype, arguments: dict,
                     return_lse: bool) -> list[Launch]:
    """The forward launch of `pattern` on CUDA for a call of this shape (batch, heads, kv_heads,
    q_len, k_len, head_dim, v_dim), dtype and arguments (tensor arguments as CPU tensors)."""
    q, k, v = _qkv(shape, dtype)
    bound = pattern.bind(q, k, v, arguments)
    ir = pattern.ir
    spec = {p.name: bound.params[p.name] for p in ir.params if p.type in ("int", "bool")}
    compiled = forward_kernel(ir, spec)
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    tiles = choose_tiles(_CUDA, D, Dv, compiled.kernel.topk, dtype)
    if compiled.kernel.closed_form is not None:
        layout_args = [None, None, None, None, 0, 0, 0, 0, 0, 0, 0]
    else:
        lay = build_layout(ir, bound, Lq, Lk, tiles.block_m, tiles.block_n, "cpu")
        layout_args = _lists(lay.kv_partial_num, lay.kv_partial_idx, lay.kv_full_num,
                             lay.kv_full_idx)
    out = torch.empty((B, H, Lq, Dv), dtype=dtype)
    lse = torch.empty((B, H, Lq), dtype=torch.float32) if return_lse else None
    args = [q, k, v, out, lse if lse is not None else out,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *(lse.stride() if lse is not None else (0, 0, 0)),
            *layout_args, 1.0 / D ** 0.5, B, H, Hkv, Lq, Lk, D, Dv,
            *_extra_arguments(compiled.kernel.arguments, bound)]
    meta = _meta(tiles, BLOCK_D=max(16, _next_pow2(D)), BLOCK_DV=max(16, _next_pow2(Dv)),
                 RETURN_LSE=return_lse, INPUT_PRECISION=_precision(dtype))
    return [Launch("attn_fwd", compiled.module.attn_fwd, tuple(args), meta)]


def backward_launches(pattern, shape: dict, dtype: torch.dtype, arguments: dict,
                      wrt: tuple[str, ...] = (), deterministic: bool = False) -> list[Launch]:
    """The backward launches (`attn_bwd_kth` for top-k, `attn_bwd_dq`, `attn_bwd_dkdv`) of
    `pattern` on CUDA, with gradients for the float tensor arguments named in `wrt`."""
    q, k, v = _qkv(shape, dtype)
    bound: Bound = pattern.bind(q, k, v, arguments)
    ir = pattern.ir
    grad_names = tuple(sorted(set(wrt) & set(differentiable_tensors(ir))))
    spec = {p.name: bound.params[p.name] for p in ir.params if p.type in ("int", "bool")}
    compiled = backward_kernel(ir, spec, grad_names)
    module, topk = compiled.module, compiled.kernel.topk
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    reads_score = any(n.op == "score" for m in ir.masks for n in walk(m))
    t_dq, t_kv = backward_tiles(_CUDA, D, Dv, topk, reads_score, dtype)
    stats = torch.empty((B, H, Lq), dtype=torch.float32)
    dq, dk, dv, do = (torch.empty_like(x) for x in (q, k, v, torch.empty((B, H, Lq, Dv), dtype=dtype)))
    common = dict(BLOCK_D=max(16, _next_pow2(D)), INPUT_PRECISION=_precision(dtype), FP64=False)
    sizes = [1.0 / D ** 0.5, B, H, Hkv, Lq, Lk, D]
    extra = _extra_arguments(compiled.kernel.arguments, bound)
    lay = build_layout(ir, bound, Lq, Lk, t_dq.block_m, t_dq.block_n, "cpu")
    q_lists = _lists(lay.kv_partial_num, lay.kv_partial_idx, lay.kv_full_num, lay.kv_full_idx)
    launches = []
    if topk:
        args = [q, k, stats, *q.stride(), *k.stride(), *stats.stride(), *q_lists, *sizes, *extra]
        launches.append(Launch("attn_bwd_kth", module.attn_bwd_kth, tuple(args),
                               _meta(t_dq, **common)))
    programs = -(-Lq // t_dq.block_m) * B * H
    grads = [torch.empty((programs, bound.tensors[n].numel()) if deterministic
                         else bound.tensors[n].shape, dtype=torch.float32) for n in grad_names]
    args = [q, k, v, do, stats, stats, stats, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *stats.stride(),
            *q_lists, *sizes, Dv, *extra, *grads]
    launches.append(Launch("attn_bwd_dq", module.attn_bwd_dq, tuple(args),
                           _meta(t_dq, **common, BLOCK_DV=max(16, _next_pow2(Dv)),
                                 DETERMINISTIC=deterministic)))
    lay = build_layout(ir, bound, Lq, Lk, t_kv.block_m, t_kv.block_n, "cpu")
    args = [q, k, v, do, stats, stats, stats, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            *stats.stride(),
            *_lists(lay.q_partial_num, lay.q_partial_idx, lay.q_full_num, lay.q_full_idx),
            *sizes, Dv, *extra]
    launches.append(Launch("attn_bwd_dkdv", module.attn_bwd_dkdv, tuple(args),
                           _meta(t_kv, **common, BLOCK_DV=max(16, _next_pow2(Dv)))))
    return launches


def compile_launch(launch: Launch, capability: int = 90):
    """Compile one launch for `cuda` at this compute capability (e.g. 90 for sm_90) through
    Triton's full pipeline; returns Triton's `CompiledKernel` (its `asm` holds ttir, ttgir,
    llir, ptx and cubin). Raises Triton's error when a stage fails, and RuntimeError when the
    kernel needs more shared memory than one block of that target may use."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_launch needs a process without TRITON_INTERPRET=1: the "
                           "generated modules would compile their interpreter branches")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.meta, debug=bool(fn.debug))
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    limit = MAX_SHARED.get(capability)
    if limit is not None and kernel.metadata.shared > limit:
        raise RuntimeError(f"{launch.name} needs {kernel.metadata.shared} bytes of shared memory; "
                           f"sm_{capability} allows {limit} per block")
    return kernel
